"""Resume, invalidation and atomicity of the artifact store (docs/store.md)."""

import shutil
from pathlib import Path

import numpy as np
import pytest

import stages.box_seeds as box_seeds
import stages.crf as crf_stage
from pipeline.runner import make_run, run_local
from pipeline.store import StageStore, atomic_write

from .conftest import demo_config


class Counter:
    def __init__(self, fn, interrupt_after=None):
        self.fn, self.calls, self.interrupt_after = fn, [], interrupt_after

    def __call__(self, *args, **kwargs):
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt  # like a kill: nothing after this point runs
        self.calls.append(args[0].shape)
        return self.fn(*args, **kwargs)


@pytest.fixture
def counters(monkeypatch):
    seeds = Counter(box_seeds.grabcut_seeds)
    crf = Counter(crf_stage.crf_from_probs)  # the CRF refines A²GNN's probabilities
    monkeypatch.setattr(box_seeds, "grabcut_seeds", seeds)
    monkeypatch.setattr(crf_stage, "crf_from_probs", crf)
    return seeds, crf


def test_interrupted_stage_resumes_with_only_the_rest(tmp_path, counters):
    seeds, _ = counters
    run = make_run(demo_config(tmp_path))
    n, k = len(run.ids("box_seeds")), 4
    seeds.interrupt_after = k
    with pytest.raises(KeyboardInterrupt):
        run_local(run, ["box_seeds"])
    store = run.store("box_seeds")
    assert len(store.done_ids()) == k and store.read_manifest()["status"] == "partial"
    seeds.calls.clear()
    seeds.interrupt_after = None
    manifest = run_local(make_run(demo_config(tmp_path)), ["box_seeds"])["box_seeds"]
    assert len(seeds.calls) == n - k
    assert manifest["status"] == "complete" and manifest["counts"] == {"total": n, "done": n, "failed": 0}
    import torch  # the manifest says where it ran (float results depend on it)

    env = manifest["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] >= 1
    assert env["cpu"] and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The artifacts of the tiny demo DAG run to its end once; each test starts from a copy."""
    root = tmp_path_factory.mktemp("finished")
    run = make_run(demo_config(root))
    run_local(run, run.names)
    return root / "artifacts"


def finished_copy(tmp_path: Path, finished: Path):
    """The finished run, copied into ``tmp_path`` (``current`` links are relative)."""
    shutil.copytree(finished, tmp_path / "artifacts", symlinks=True)
    return make_run(demo_config(tmp_path))


def test_config_change_recomputes_stage_and_downstream_only(tmp_path, counters, finished):
    seeds, crf = counters
    run = finished_copy(tmp_path, finished)
    n = len(run.ids("box_seeds"))
    run_local(make_run(demo_config(tmp_path)), run.names)  # unchanged: all cached
    assert (len(seeds.calls), len(crf.calls)) == (0, 0)
    changed = make_run(demo_config(tmp_path, crf__iterations=3))
    assert changed.fingerprints["box_seeds"] == run.fingerprints["box_seeds"]
    assert changed.fingerprints["crf"] != run.fingerprints["crf"]
    run_local(changed, changed.names)
    assert (len(seeds.calls), len(crf.calls)) == (0, n)
    # Upstream change: both recompute (crf's fingerprint follows its input's).
    up = make_run(demo_config(tmp_path, box_seeds__iterations=2))
    assert up.fingerprints["crf"] != run.fingerprints["crf"]
    seeds.calls.clear(), crf.calls.clear()
    run_local(up, up.names)
    assert (len(seeds.calls), len(crf.calls)) == (n, n)
    # Back to the first config: all cached, and `current` points at its folders again.
    run_local(run, run.names)
    assert (run.run_dir / "crf" / "current").resolve() == run.store("crf").dir.resolve()


def test_deleted_stage_folder_is_recomputed(tmp_path, counters, finished):
    seeds, crf = counters
    run = finished_copy(tmp_path, finished)
    n = len(run.ids("box_seeds"))
    shutil.rmtree(run.store("crf").dir)
    seeds.calls.clear(), crf.calls.clear()
    run_local(make_run(demo_config(tmp_path)), run.names)
    assert (len(seeds.calls), len(crf.calls)) == (0, n)
    assert (run.run_dir / "crf" / "current").resolve() == run.store("crf").dir.resolve()


def test_force_recomputes_stage_and_downstream(tmp_path, counters, finished):
    from pipeline.runner import forced

    seeds, crf = counters
    run = finished_copy(tmp_path, finished)
    assert forced(run, ["box_seeds"]) == {
        "box_seeds",
        "seeds",
        "affinity_train",
        "graph",
        "random_walk",
        "a2gnn",
        "crf",
        "final_train",
        "final_eval",
        "instances",
    }
    run_local(run, run.names, forced(run, ["box_seeds"]))
    assert len(seeds.calls) == len(crf.calls) == len(run.ids("crf"))


def test_half_written_file_is_never_read(tmp_path):
    store = StageStore(tmp_path, "s", "fp")
    store.write_label("a", np.zeros((4, 4), np.uint8))

    def crash(f):
        f.write(b"\x89PNG partial")
        raise OSError("disk died mid-write")

    with pytest.raises(OSError):
        atomic_write(store.item_path("b"), crash)
    assert store.done_ids() == {"a"}  # "b" never appears
    assert not store.item_path("b").exists()
    assert [p.name for p in store.items_dir.iterdir()] == ["a.png"]  # temp file cleaned up
    # A stray temp file from a killed process is ignored as well.
    (store.items_dir / ".c.png.x1y2.tmp").write_bytes(b"junk")
    assert store.done_ids() == {"a"}


def test_label_png_roundtrip_and_soft_maps(tmp_path):
    store = StageStore(tmp_path, "s", "fp")
    lab = np.array([[0, 1, 255], [20, 3, 0]], np.uint8)
    store.write_label("x", lab)
    assert (store.read_label("x") == lab).all()
    soft = StageStore(tmp_path, "p", "fp", output="soft")
    probs = np.random.default_rng(0).random((3, 2, 5)).astype(np.float32)
    soft.write_soft("x", probs, np.array([0, 2, 7]))
    p, ids = soft.read_soft("x")
    assert p.dtype == np.float16 and ids.tolist() == [0, 2, 7]
    assert (soft.labels_of("x") == np.array([0, 2, 7])[probs.argmax(0)]).all()


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path):
    import torch

    store = StageStore(tmp_path, "train", "fp", output="model")
    assert store.latest_checkpoint() is None
    for step in (10, 20, 30):
        store.save_checkpoint(step, {"w": torch.full((2,), float(step)), "rng": torch.get_rng_state()})
    assert [p.name for p in store.checkpoints()] == ["ckpt-00000020.pt", "ckpt-00000030.pt"]
    step, state = store.latest_checkpoint()
    assert step == 30 and state["w"].tolist() == [30.0, 30.0]

"""Runs you can trust: bad input never stops a run, the cache never serves the
wrong thing. One test (or more) per numbered case of the issue; the subprocess tests drive
the real ``wsss`` command (signals, two runs at once)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

import stages.box_seeds as box_seeds
from pipeline.config import Config, ConfigError, MasksDataset, VocDataset, WeakConfig, config_from_dict, load_config
from pipeline.datasets import MasksData, VocData, read_image
from pipeline.runner import RESULT_NEUTRAL, PipelineError, StageFailed, Work, WorkKind, make_run, needs_work, run_local
from pipeline.store import StageStore, atomic_write
from stages.base import STAGES, DataError

from .conftest import ROOT, demo_config, horse_config, horse_subset

WSSS = str(Path(sys.executable).with_name("wsss"))


# --------------------------------------------------------------------------- helpers
class Calls:
    """Counts the images a stage function computes."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args, **kwargs):
        self.n += 1
        return self.fn(*args, **kwargs)


# --------------------------------------------------------------------------- 1: errors cross processes
def test_data_error_survives_pickling():
    err = pickle.loads(pickle.dumps(DataError("a/b.jpg", "truncated")))
    assert isinstance(err, DataError) and (err.path, err.problem, str(err)) == (
        "a/b.jpg",
        "truncated",
        "a/b.jpg: truncated",
    )
    failed = pickle.loads(pickle.dumps(StageFailed("seeds", {"x": "bad"})))
    assert failed.failures == {"x": "bad"} and "every image failed" in str(failed)


def test_bad_inputs_under_two_workers_are_recorded_by_name(tmp_path, horses):
    root = horse_subset(tmp_path, horses, 8)
    rgb, masks = root / "rgb", root / "figure_ground"
    data = (rgb / "horse002.jpg").read_bytes()
    (rgb / "horse002.jpg").write_bytes(data[: len(data) // 3])  # truncated
    (rgb / "horse003.jpg").write_bytes(b"")  # zero bytes
    (rgb / "horse004.jpg").write_text("not an image at all")
    (masks / "horse005.jpg").write_bytes((masks / "horse005.jpg").read_bytes()[:200])  # corrupt mask
    Image.fromarray(np.zeros((50, 300, 3), np.uint8)).save(rgb / "horse006.jpg")  # other aspect ratio
    cfg = config_from_dict(horse_config(tmp_path, root, workers=2))
    out = run_local(make_run(cfg), ["box_seeds"])["box_seeds"]
    assert out["status"] == "complete" and out["counts"] == {"total": 8, "done": 3, "failed": 5}
    f = out["failures"]
    assert "horse002.jpg" in f["horse002"] and "truncated" in f["horse002"]
    assert "horse003.jpg" in f["horse003"] and "horse004.jpg" in f["horse004"]
    assert "figure_ground/horse005.jpg: unreadable" in f["horse005"]
    assert "horse006.jpg" in f["horse006"] and "aspect ratio" in f["horse006"]


# --------------------------------------------------------------------------- 2, 3: failures are skipped, then retried
def test_bad_train_image_does_not_stop_affinity_train_and_a_fix_recomputes_only_it(tmp_path, horses, monkeypatch):
    root = horse_subset(tmp_path, horses, 6)
    good = (root / "rgb" / "horse002.jpg").read_bytes()
    (root / "rgb" / "horse002.jpg").write_bytes(good[: len(good) // 3])
    calls = Calls(box_seeds.grabcut_seeds)
    monkeypatch.setattr(box_seeds, "grabcut_seeds", calls)
    names = ["box_seeds", "seeds", "affinity_train"]
    out = run_local(make_run(config_from_dict(horse_config(tmp_path, root))), names)
    aff = out["affinity_train"]
    assert aff["status"] == "complete" and aff["counts"] == {"total": 6, "done": 5, "failed": 1}
    assert (
        aff["failures"]["horse002"].startswith("skipped: box_seeds failed for it: ")
        and "horse002.jpg" in aff["failures"]["horse002"]
    )
    assert calls.n == 5
    # A rerun retries the failed image only, and while it still fails nothing is retrained.
    model = make_run(config_from_dict(horse_config(tmp_path, root))).store("affinity_train").model_path
    stamp = model.stat().st_mtime_ns
    again = run_local(make_run(config_from_dict(horse_config(tmp_path, root))), names)
    assert again["box_seeds"]["timings"]["last_run_images"] == 1 and again["box_seeds"]["counts"]["failed"] == 1
    assert calls.n == 5 and model.stat().st_mtime_ns == stamp  # it failed again on reading, before GrabCut
    # Fixed: that image alone is computed; the training stage that skipped it trains again.
    (root / "rgb" / "horse002.jpg").write_bytes(good)
    run = make_run(config_from_dict(horse_config(tmp_path, root)))
    assert needs_work(run, "box_seeds") == Work(WorkKind.RETRY, "retrying 1 failed image(s)")
    out = run_local(run, names)
    assert calls.n == 6
    assert out["box_seeds"]["counts"] == {"total": 6, "done": 6, "failed": 0}
    assert out["affinity_train"]["counts"] == {"total": 6, "done": 6, "failed": 0} and model.stat().st_mtime_ns != stamp
    assert out["affinity_train"]["info"]["resumed_from"] == 0
    # Now everything stands: nothing to do.
    assert [n for n in names if needs_work(run, n)] == []


def test_too_few_usable_images_stop_the_training_stage(tmp_path, horses):
    root = horse_subset(tmp_path, horses, 4)
    for k in (1, 2, 3):
        (root / "rgb" / f"horse{k:03d}.jpg").write_bytes(b"")
    run = make_run(config_from_dict(horse_config(tmp_path, root, min_usable=0.5)))
    run_local(run, ["box_seeds", "seeds"])
    with pytest.raises(
        PipelineError,
        match=r"affinity_train: only 1 of 4 train images are usable, below min_usable "
        r"0.5 \(e\.g\. horse001: skipped: box_seeds failed for it: [^;]*horse001\.jpg: unreadable",
    ):
        run_local(run, ["affinity_train"])


def test_stage_where_every_image_failed_is_failed_and_run_exits_1(tmp_path, horses):
    root = horse_subset(tmp_path, horses, 3)
    for k in (1, 2, 3):
        (root / "rgb" / f"horse{k:03d}.jpg").write_text("junk")
    cfg = horse_config(tmp_path, root)
    with pytest.raises(StageFailed, match=r"box_seeds: every image failed, e\.g\. horse001: .*horse001\.jpg"):
        run_local(make_run(config_from_dict(cfg)), ["box_seeds", "seeds"])
    assert make_run(config_from_dict(cfg)).store("box_seeds").read_manifest()["status"] == "failed"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from typer.testing import CliRunner

    from pipeline.cli import app

    res = CliRunner().invoke(app, ["run", str(path), "--until", "seeds"])
    assert res.exit_code == 1 and "every image failed" in res.output and "horse002.jpg" in res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------- 4: fingerprints cover what a stage reads
# Read from the stage code by hand: the top-level fields beyond its own section that each
# stage's results depend on (load_weak -> weak, ctx.config.seed -> seed, ...).
READS = {
    "box_seeds": {"dataset", "weak", "seed"},
    "cam_train": {"dataset", "weak", "seed"},
    "cam": {"dataset", "weak"},
    "seeds": {"dataset", "weak", "labels"},
    "affinity_train": {"dataset", "seed", "labels"},
    "graph": {"dataset"},
    "random_walk": {"dataset", "labels"},
    "a2gnn": {"dataset", "weak", "seed", "labels"},
    "crf": {"dataset", "seed", "labels"},
    "final_train": {"dataset", "seed"},
    "final_eval": {"dataset"},
    "instances": {"dataset", "weak"},
    "instance_train": {"dataset", "weak", "seed"},
    "dfr_train": {"dataset", "weak", "seed", "labels"},
    "dfr_eval": {"dataset"},
    "blpseg_train": {"dataset", "weak", "seed", "labels"},
    "blpseg_eval": {"dataset"},
    "rrm_train": {"dataset", "weak", "seed"},
    "rrm_eval": {"dataset", "weak"},
    "rrm_labels": {"dataset", "weak"},  # the tags of their CAM + CRF maps
    "spml_train": {"dataset", "weak", "seed"},
    "spml": {"dataset", "weak"},  # weak: the classes an image names
    "fewshot_train": {"dataset", "seed"},
    "fewshot_eval": {"dataset"},
}
FLIPS = {
    "run": "u",
    "output_root": "elsewhere",
    "device": "cpu",
    "workers": 3,
    "shard_size": 5,
    "engine": "prefect",
    "task_runner": "process",
    "threads": 2,
    "dask": {"n_workers": 3},
    "lock": "refuse",
    "min_usable": 0.9,
    "notes": {"crf": "why"},
    "imports": ["json"],
    "seed": 1,
    "weak": {"seed": 1},
    "dataset": {"kind": "demo", "num_train": 6, "num_val": 2, "seed": 1},
    "labels": "scribble",
    "method": "scl",
}  # another DAG, no stage in common


def test_each_top_level_field_changes_exactly_the_stages_that_read_it(tmp_path):
    assert {n: set(STAGES.get(n).reads) for n in STAGES.names()} == READS
    sections = set(STAGES.names())
    shared = {"dataset", "weak", "seed", "labels", "method"}
    assert set(Config.model_fields) == sections | shared | set(RESULT_NEUTRAL)
    assert set(FLIPS) == shared | set(RESULT_NEUTRAL)  # a new top-level field needs a flip here
    base = make_run(demo_config(tmp_path, cam__enabled=True, instance_train__enabled=False))
    for field, value in FLIPS.items():
        if field == "labels":  # scribble runs have no box_seeds / instances: compare the rest
            other = make_run(demo_config(tmp_path, cam__enabled=True, labels=value))
        else:
            other = make_run(demo_config(tmp_path, cam__enabled=True, instance_train__enabled=False, **{field: value}))
        common = [n for n in base.names if n in other.names]
        changed = {n for n in common if base.fingerprints[n] != other.fingerprints[n]}
        readers = {n for n in common if field in READS[n]}
        expected = readers | {d for r in readers for d in base.downstream(r) if d in common}
        if field == "labels":  # seeds' input list changes too (no box_seeds): still seeds and downstream
            expected |= {d for d in base.downstream("seeds") if d in common}
        assert changed == expected, field


def test_scribble_and_point_runs_get_different_seeds_fingerprints(tmp_path):
    scribble = make_run(demo_config(tmp_path, labels="scribble"))
    point = make_run(demo_config(tmp_path, labels="point"))
    assert scribble.fingerprints["seeds"] != point.fingerprints["seeds"]
    assert scribble.fingerprints["cam_train"] == point.fingerprints["cam_train"]


def test_editing_a_weak_label_file_changes_the_stages_that_read_it(tmp_path, horses):
    from pipeline.prepare import write_weak_labels

    root = horse_subset(tmp_path, horses, 3)
    cfg = horse_config(tmp_path, root)
    write_weak_labels(config_from_dict(cfg), ["train"], tmp_path / "weak")
    cfg["dataset"]["weak_dir"] = str(tmp_path / "weak")
    before = make_run(config_from_dict(cfg)).fingerprints
    boxes = json.loads((tmp_path / "weak" / "boxes.json").read_text())
    boxes["horse001"][0][0] += 1
    (tmp_path / "weak" / "boxes.json").write_text(json.dumps(boxes))
    after = make_run(config_from_dict(cfg)).fingerprints
    assert before["box_seeds"] != after["box_seeds"] and before["crf"] != after["crf"]
    scribble = tmp_path / "weak" / "scribbles" / "horse002.png"
    scribble.write_bytes(scribble.read_bytes() + b"")  # same bytes: same fingerprint
    assert make_run(config_from_dict(cfg)).fingerprints == after
    # a scribble run: one edited scribble PNG is that image's edit (its stamp), not the whole
    # dataset's, so no command reads every scribble file
    cfg["labels"] = "scribble"
    run = make_run(config_from_dict(cfg))
    run_local(run, ["seeds"])
    drawn = np.asarray(Image.open(scribble))
    Image.fromarray(np.where(drawn == 1, 255, drawn).astype(np.uint8)).save(scribble)  # a stroke erased
    again = make_run(config_from_dict(cfg))
    assert again.fingerprints == run.fingerprints
    work = needs_work(again, "seeds")
    assert work.kind is WorkKind.EDITED and "horse002" in work.why and "horse001" not in work.why


# --------------------------------------------------------------------------- 5: the manifest knows its items
def test_deleted_or_truncated_item_is_recomputed_and_shown(tmp_path, monkeypatch):
    from pipeline.cli import status_table
    from rich.console import Console

    calls = Calls(box_seeds.grabcut_seeds)
    monkeypatch.setattr(box_seeds, "grabcut_seeds", calls)
    run = make_run(demo_config(tmp_path))
    run_local(run, ["box_seeds"])
    n = calls.n
    store = run.store("box_seeds")
    store.item_path("train_0001").unlink()
    data = store.item_path("train_0002").read_bytes()
    store.item_path("train_0002").write_bytes(data[: len(data) // 2])
    assert store.damaged() == {
        "items/train_0001.png": "missing",
        "items/train_0002.png": f"{len(data) // 2} bytes, the manifest says {len(data)}",
    }
    assert not store.is_complete()
    console = Console(width=200, record=True)
    console.print(status_table(run))
    assert "damaged: 2 file(s) missing or changed" in console.export_text()
    out = run_local(make_run(demo_config(tmp_path)), ["box_seeds"])["box_seeds"]
    assert calls.n == n + 2 and out["counts"]["done"] == len(run.ids("box_seeds")) and not store.damaged()
    assert store.item_path("train_0002").read_bytes() == data


# --------------------------------------------------------------------------- 6: input guards
def test_16bit_and_palette_images_read_correctly(tmp_path):
    ramp = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)  # 0..59950
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = read_image(tmp_path / "g16.png")
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[..., 0], ramp * 255.0 / 65535.0, atol=0.51)
    assert (rgb == 255).mean() < 0.01  # not the clipped, all-white picture
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 200, 0, 0, 0, 250, 5] + [0] * 759)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0], [[10, 20, 30], [200, 0, 0]])
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: floating-point image"):
        read_image(tmp_path / "f.tif")


def make_masks(tmp_path: Path, size=(300, 200), values=(0, 255)) -> Path:
    root = tmp_path / "m"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    w, h = size
    for name in ("a", "b"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.png"
        )
        m = np.full((h, w), values[0], np.uint8)
        m[h // 4 : h // 2, w // 3 : 2 * w // 3] = values[1]
        Image.fromarray(m).save(root / "masks" / f"{name}.png")
    return root


@pytest.mark.parametrize(
    "limits, shape, message, box",
    [
        (
            {"max_side": 100},
            (67, 100),
            "above dataset.max_side 100; working at 100x67",
            (33, 16, 67, 34),
        ),  # (100, 50, 200, 100) * 1/3, grown to whole pixels
        ({"min_side": 400}, (400, 600), "upscaled to work on (first: a.png 300x200 -> 600x400)", (200, 100, 400, 200)),
    ],
)
def test_images_outside_the_size_limits_are_resized_with_their_labels(tmp_path, caplog, limits, shape, message, box):
    root = make_masks(tmp_path)  # 300x200
    data = MasksData(MasksDataset(root=str(root), val_fraction=0.0, **limits), WeakConfig())
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        image = data.load_image("a")
    assert image.shape == (*shape, 3) and message in caplog.text
    gt = data.load_gt("a")
    assert gt.shape == shape and set(np.unique(gt)) == {0, 1}
    b = data.load_weak("a").boxes[0]
    assert (b.x0, b.y0, b.x1, b.y1) == box


def test_oversize_fail_and_the_min_side_limits(tmp_path):
    root = make_masks(tmp_path)
    strict = MasksData(MasksDataset(root=str(root), max_side=100, oversize="fail", val_fraction=0.0), WeakConfig())
    with pytest.raises(DataError, match=r"a\.png: image is 300x200, above dataset.max_side 100"):
        strict.load_image("a")
    capped = MasksData(MasksDataset(root=str(root), min_side=400, max_side=450, val_fraction=0.0), WeakConfig())
    assert capped.load_image("a").shape == (300, 450, 3)  # never past max_side
    big = MasksData(MasksDataset(root=str(root), min_side=200, val_fraction=0.0), WeakConfig())
    assert big.load_image("a").shape == (200, 300, 3)  # already large enough: as it is


def test_unexpected_mask_values_are_warned_about_once_per_dataset(tmp_path, caplog):
    root = make_masks(tmp_path, size=(60, 40), values=(0, 1))  # class indices, read with the default threshold 128
    data = MasksData(MasksDataset(root=str(root), val_fraction=0.0), WeakConfig())
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        assert data.load_gt("a").max() == 0 and data.load_gt("b").max() == 0
    assert caplog.text.count("every mask value is below dataset.threshold 128") == 1
    caplog.clear()
    mapped = MasksData(MasksDataset(root=str(root), val_fraction=0.0, threshold=None, class_map={0: 0}), WeakConfig())
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        gt = mapped.load_gt("a"), mapped.load_gt("b")
    assert caplog.text.count("mask values [1] are not in dataset.class_map") == 1 and gt[0].max() == 255
    caplog.clear()
    voc = tmp_path / "VOC"
    for d in ("JPEGImages", "ImageSets/Segmentation", "SegmentationClass"):
        (voc / d).mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(np.full((4, 6), 40, np.uint8), mode="L").save(voc / "SegmentationClass" / f"{name}.png")
    data = VocData(VocDataset(root=str(voc)), WeakConfig())
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        assert (data.load_gt("a") == 255).all() and (data.load_gt("b") == 255).all()
    assert caplog.text.count("GT values [40] are not class ids (0..20)") == 1


# --------------------------------------------------------------------------- 7: names stay inside the artifacts folder
def test_run_names_and_image_ids_cannot_leave_the_artifacts_folder(tmp_path):
    for bad in ("..", ".", "a/b", "../x", ".hidden"):
        with pytest.raises(ConfigError, match="run name .* cannot name a file inside the artifacts folder"):
            config_from_dict({"run": bad})
    root = tmp_path / "VOC"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n../../x\n")
    voc = VocData(VocDataset(root=str(root)), WeakConfig())
    with pytest.raises(DataError, match=r"train\.txt: line 2: image id '\.\./\.\./x' cannot name a file"):
        voc.ids("train")
    with pytest.raises(ValueError, match="image id '../x' cannot name a file"):
        StageStore(tmp_path, "s", "fp").item_path("../x")


# --------------------------------------------------------------------------- 8: locks, temp files, modes, signals
def test_stale_temp_files_are_removed_when_the_stage_starts(tmp_path):
    run = make_run(demo_config(tmp_path, dataset__num_train=2))
    store = run.store("box_seeds")
    store.items_dir.mkdir(parents=True)
    stale = store.items_dir / ".train_0000.png.abc123.tmp"
    stale.write_bytes(b"half")
    run_local(run, ["box_seeds"])
    assert not stale.exists() and store.done_ids() == {"train_0000", "train_0001"}


def test_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "x.bin", lambda f: f.write(b"1"))
    finally:
        os.umask(old)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o640
    atomic_write(tmp_path / "y.bin", lambda f: f.write(b"1"))
    assert (tmp_path / "y.bin").stat().st_mode & 0o777 == 0o666 & ~old


def _cli_env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "PREFECT_HOME": str(tmp_path / "prefect")}


def _wait_for(predicate, seconds: float, what: str) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_second_concurrent_run_waits_and_does_not_recompute(tmp_path, horses):
    root = horse_subset(tmp_path, horses, 40)  # ~15 s of GrabCut on one worker: time for two more runs to start
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(horse_config(tmp_path, root)))
    run = make_run(config_from_dict(horse_config(tmp_path, root)))
    store = run.store("box_seeds")
    cmd = [WSSS, "run", str(path), "--until", "seeds"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env(tmp_path))
    _wait_for(lambda: len(store.done_ids()) >= 1, 120, "the first run's first item")
    refusing = subprocess.Popen(
        [*cmd, "--set", "lock=refuse"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(tmp_path),
    )
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env(tmp_path))
    _, refused = refusing.communicate(timeout=300)
    assert len(store.done_ids()) < 40  # the first run was still at work
    out1, err1 = first.communicate(timeout=300)
    out2, err2 = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert (
        refusing.returncode == 2
        and f"box_seeds (fingerprint {store.fingerprint}) is being computed by another run (pid {first.pid}"
        in " ".join(refused.split())
    )
    assert "is being computed by another run" in " ".join(err2.split()) and "waiting for it" in " ".join(err2.split())
    m = store.read_manifest()
    assert m["timings"]["last_run_images"] == 40 and m["timings"]["total_s"] == m["timings"]["last_run_s"]
    assert "GrabCut seeds" not in err2 + out2  # the second run computed nothing


def _start_box_seeds(tmp_path: Path, horses: Path, n: int, engine: str, **popen: Any):
    """``wsss run --until box_seeds`` on ``n`` horses (2 workers, one shard) in a subprocess:
    (the process, the box_seeds store, the config's path)."""
    cfg = horse_config(tmp_path, horse_subset(tmp_path, horses, n), engine=engine, workers=2, shard_size=n)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = make_run(config_from_dict(cfg)).store("box_seeds")
    proc = subprocess.Popen(
        [WSSS, "run", str(path), "--until", "box_seeds"], text=True, env=_cli_env(tmp_path), **popen
    )
    return proc, store, path


@pytest.mark.parametrize("engine,sig,code", [("local", signal.SIGTERM, 143), ("prefect", signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_promptly_and_lose_nothing(tmp_path, horses, engine, sig, code):
    import psutil

    n = 12  # GrabCut on real photographs: seconds of work left when the signal comes
    proc, store, path = _start_box_seeds(tmp_path, horses, n, engine, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: len(store.done_ids()) >= 2, 180, "two items")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children  # the process pool (and Prefect's server)
    stamps = {p.name: p.stat().st_mtime_ns for p in store.items_dir.glob("*.png")}
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and time.time() - t0 < 10
    said = "interrupted" if sig == signal.SIGINT else "stopped"
    assert err.strip().splitlines()[-1] == f"{said}; run again to resume" and "Traceback" not in err
    _wait_for(
        lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
        10,
        "the child processes to end",
    )
    finished = len(store.done_ids())
    assert finished < n
    # the rerun in this process: the same store and config as `wsss run` (its startup is the
    # kill -9 test's), on the test process's preloaded worker pool
    rerun = run_local(make_run(load_config(path, ["engine=local"])), ["box_seeds"])
    assert rerun["box_seeds"]["status"] == "complete"
    assert rerun["box_seeds"]["timings"]["last_run_images"] == n - finished
    assert len(store.done_ids()) == n and not list(store.dir.rglob("*.tmp"))
    assert all(store.item_path(k[:-4]).stat().st_mtime_ns == v for k, v in stamps.items())  # kept, not recomputed


def _alive(procs: list) -> list:
    import psutil

    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_kill_9_of_the_command_leaves_no_child_and_no_later_write(tmp_path, horses):
    import psutil

    n, quiet = 12, subprocess.DEVNULL
    proc, store, _ = _start_box_seeds(tmp_path, horses, n, "local", stdout=quiet, stderr=quiet)
    _wait_for(lambda: len(store.done_ids()) >= 1, 120, "an item")
    children = psutil.Process(proc.pid).children(recursive=True)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    assert len(children) >= 4 and "forkserver" in names and "reaper" in names, names  # pool, tracker, watchdog
    proc.kill()
    killed = time.time()
    proc.wait()
    _wait_for(lambda: not _alive(children), 5, "every child of the killed command to end")
    assert time.time() - killed < 5
    done = store.done_ids()
    time.sleep(1.0)
    assert store.done_ids() == done and len(done) < n  # nothing written after the parent died
    assert all(p.stat().st_mtime < killed + 0.5 for p in store.items_dir.rglob("*.png"))


WATCHED = """
import subprocess, sys, time
from pipeline.reaper import start
start()
nap = "import time; time.sleep(60)"
sleeper = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {nap!r}]); time.sleep(60)"
subprocess.Popen([sys.executable, "-c", sleeper], start_new_session=True)  # a server with a child of its own
print("ready", flush=True)
time.sleep(60)
"""


def test_the_watchdog_ends_every_process_a_killed_command_started_in_any_session(tmp_path):
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", WATCHED], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready"
    _wait_for(lambda: len(psutil.Process(proc.pid).children(recursive=True)) >= 3, 10, "the server's child")
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    killed = time.time()
    proc.wait()
    _wait_for(lambda: not _alive(children), 5, "the watchdog to end the server and its child")
    assert time.time() - killed < 5

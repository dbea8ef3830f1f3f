"""``task_runner: dask`` (prefect-dask on local clusters of 2 worker processes): the same
items as the local engine, shards spread over workers, training on the resourced worker, a
killed worker loses nothing, and workers that cannot see the run are refused up front."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.runner import PipelineError, make_run, run_local

from .conftest import demo_config

# The tiny demo DAG up to the CRF; threads fixed, so both engines round alike.
STAGES = ["box_seeds", "cam_train", "cam", "seeds", "affinity_train", "graph", "random_walk", "a2gnn", "crf"]
COMMON = dict(threads=1, shard_size=1, cam__enabled=True)


@pytest.fixture
def keep_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def item_hashes(run_dir: Path, stage: str) -> dict[str, str]:
    items = run_dir / stage / "current" / "items"
    return {
        str(p.relative_to(items)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(items.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The tiny demo run with the local engine (2 pool workers, 1 thread each)."""
    import torch

    before = torch.get_num_threads()
    run = make_run(demo_config(tmp_path_factory.mktemp("local"), workers=2, **COMMON))
    run_local(run, STAGES)
    torch.set_num_threads(before)
    return run


def worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def test_dask_run_writes_the_local_engines_items_from_two_worker_processes(tmp_path, local_reference, prefect_harness):
    from pipeline.flow import run_prefect

    run = make_run(
        demo_config(
            tmp_path, engine="prefect", task_runner="dask", dask={"n_workers": 2, "threads_per_worker": 1}, **COMMON
        )
    )
    out = run_prefect(run, STAGES, set())
    for stage in STAGES:
        assert out[stage]["status"] == "complete", stage
        if run.spec(stage).per_image:
            assert item_hashes(run.run_dir, stage) == item_hashes(local_reference.run_dir, stage), stage
    # every per-image shard (one image each) ran in a worker process, not in this one
    spread = {p for stage in ("box_seeds", "a2gnn", "crf") for p in out[stage]["ran_on"]}
    assert len(spread) >= 2 and all(not p.endswith(f":{os.getpid()}") for p in spread)
    assert out["crf"]["metrics"]["miou"] == local_reference.store("crf").read_manifest()["metrics"]["miou"]


@pytest.fixture
def gpu_and_cpu_workers(tmp_path):
    """A scheduler with one plain worker (LocalCluster) and one started like a GPU machine's,
    `dask worker ADDRESS --resources GPU=1` (a label: no GPU is used)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster.scheduler_address, set_as_default=False) as client,
    ):
        cli = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dask")),
                "worker",
                cluster.scheduler_address,
                "--nthreads",
                "1",
                "--resources",
                "GPU=1",
                "--no-dashboard",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=os.getcwd(),
        )
        try:
            client.wait_for_workers(2, timeout=60)
            yield cluster.scheduler_address, client
        finally:
            cli.terminate()
            cli.wait(timeout=30)


def test_training_lands_on_the_gpu_worker_and_a_killed_worker_loses_nothing(
    tmp_path, local_reference, gpu_and_cpu_workers, prefect_harness
):
    from pipeline.flow import run_prefect

    address, client = gpu_and_cpu_workers
    info = client.scheduler_info(n_workers=-1)["workers"]
    gpu = next(a for a, w in info.items() if w.get("resources", {}).get("GPU"))
    pids = worker_pids(client)
    # the upstream stages of the reference run, then a slower A²GNN (another fingerprint) on the cluster
    out_root = tmp_path / "artifacts"
    shutil.copytree(local_reference.config.output_root, out_root, symlinks=True)
    cfg = demo_config(
        tmp_path,
        engine="prefect",
        task_runner="dask",
        a2gnn__epochs=30,
        dask={"address": address, "resources": {"GPU": 1}},
        **COMMON,
    )
    run = make_run(cfg)
    out = run_prefect(run, ["affinity_train"], {"affinity_train"})
    trained_on = out["affinity_train"]["ran_on"]
    assert len(trained_on) == 1 and trained_on[0].endswith(f":{pids[gpu]}")

    items = run.store("a2gnn").dir / "items"
    victim = next(a for a in pids if a != gpu)
    killed: list[int] = []

    def kill_when_one_item_is_written() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if items.is_dir() and any(not p.name.startswith(".") for p in items.iterdir()):
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(pids[victim])
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_one_item_is_written)
    watcher.start()
    try:  # Dask may rerun the lost shard on the other worker, or give up on it and stop the run
        first = run_prefect(run, ["a2gnn"], set())["a2gnn"]["status"]
    except Exception as err:  # noqa: BLE001 - KilledWorker or a crashed task run, whichever comes first
        first = f"stopped: {err!r}"
    watcher.join()
    assert killed, "no A²GNN item appeared within 2 minutes"
    store = run.store("a2gnn")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in items.iterdir() if not p.name.startswith(".")}
    for image_id in store.done_ids():  # every item there is whole
        probs, _ = store.read_soft(image_id)
        assert probs.shape[0] >= 2
    second = make_run(demo_config(tmp_path, a2gnn__epochs=30, workers=1, **COMMON))
    manifest = run_local(second, ["a2gnn"])["a2gnn"]
    assert manifest["status"] == "complete" and manifest["counts"]["done"] == len(run.ids("a2gnn"))
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in items.iterdir() if not p.name.startswith(".")}
    assert {k: after[k] for k in before} == before  # finished items were not recomputed
    if first == "complete":  # the first run finished every image: nothing left to compute
        assert len(before) == len(run.ids("a2gnn"))
        assert all(not p.endswith(f":{os.getpid()}") for p in manifest["ran_on"])  # computed on the workers only
    else:
        assert first.startswith("stopped: ") and len(before) < len(run.ids("a2gnn")), first
        assert manifest["timings"]["last_run_images"] == len(run.ids("a2gnn")) - len(before)


def test_workers_that_cannot_see_the_run_or_offer_no_gpu_are_refused(tmp_path, monkeypatch, prefect_harness):
    from distributed import LocalCluster

    from pipeline.flow import run_prefect

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the workers start here; the run's relative output_root is not there
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.chdir(tmp_path)
        cfg = demo_config(tmp_path, engine="prefect", task_runner="dask", dask={"address": cluster.scheduler_address})
        cfg.output_root = "artifacts"
        with pytest.raises(
            PipelineError,
            match=r"1 of 1 workers cannot use the run's files.*cannot read "
            r"artifacts/t/\.dask-probe-.*worker cwd .*elsewhere",
        ):
            run_prefect(make_run(cfg), ["box_seeds"], set())
        assert not list((tmp_path / "artifacts" / "t").glob(".dask-probe-*"))
        (elsewhere / "artifacts").symlink_to(tmp_path / "artifacts")  # now they share it
        cfg.dask.resources = {"GPU": 1}
        with pytest.raises(PipelineError, match=r"ask for resources \{'GPU': 1\.0\}, which no worker offers"):
            run_prefect(make_run(cfg), ["box_seeds"], set())
    assert not (tmp_path / "artifacts" / "t" / "box_seeds").exists()  # refused before any work


def test_training_stages_ask_for_the_configured_resources_and_per_image_stages_do_not(tmp_path):
    import dask

    from pipeline.cluster import placement

    cfg = demo_config(tmp_path, task_runner="dask", dask={"resources": {"GPU": 1}})
    with placement(cfg, per_image=False):
        assert dask.get_annotations() == {"resources": {"GPU": 1.0}}
    with placement(cfg, per_image=True):
        assert dask.get_annotations() == {}
    with placement(demo_config(tmp_path, task_runner="process", dask={"resources": {"GPU": 1}}), per_image=False):
        assert dask.get_annotations() == {}


def test_bench_scale_out_rows(tmp_path, prefect_harness):
    from .conftest import bench_rows

    pool, dask_row = bench_rows(
        tmp_path, "scale_out", "--images", "4", "--size", "64x48", "--opt", "stage=box_seeds", "--opt", "workers=[2]"
    )
    assert pool["case"] == "box_seeds: local engine, process pool of 2" and pool["processes"] == 1
    assert dask_row["case"] == "box_seeds: Prefect + Dask, 2 worker processes" and dask_row["processes"] >= 1
    assert all(r["images"] == 4 and r["images_per_s"] > 0 for r in (pool, dask_row))

"""Orchestration at dataset scale: what a per-image task costs must not grow with the dataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.runner import make_run, stage_context


def tiny_set(root: Path, n: int) -> Path:
    """``n`` 16x12 image + mask pairs (masks kind)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((12, 16), np.uint8)
    mask[3:9, 4:12] = 255
    Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(root / "images" / "0.png")
    Image.fromarray(mask).save(root / "masks" / "0.png")
    image, label = (root / "images" / "0.png").read_bytes(), (root / "masks" / "0.png").read_bytes()
    for k in range(1, n):
        (root / "images" / f"{k}.png").write_bytes(image)
        (root / "masks" / f"{k}.png").write_bytes(label)
    return root


def task_bytes(tmp_path: Path, n: int) -> int:
    """Bytes pickled for one per-image task of ``box_seeds`` (what the pool sends per image)."""
    root = tiny_set(tmp_path / f"n{n:05d}", n)
    cfg = config_from_dict(
        {"output_root": str(tmp_path / "out"), "dataset": {"kind": "masks", "root": str(root), "val_fraction": 0.0}}
    )
    run = make_run(cfg)
    ids = run.ids("box_seeds")
    assert len(ids) == n
    ctx = stage_context(run, "box_seeds", ids)
    again = pickle.loads(pickle.dumps(ctx))
    assert again.dataset.ids("train") == ids and again.dataset.load_image(ids[-1]).shape == (12, 16, 3)
    return len(pickle.dumps((ctx, ids[0])))


def test_the_bytes_pickled_per_task_do_not_grow_with_the_dataset(tmp_path):
    small, large = task_bytes(tmp_path, 20), task_bytes(tmp_path, 2000)
    assert abs(large - small) < 64, (small, large)


def test_auto_shards_are_a_few_per_slot_at_any_size(tmp_path):
    from pipeline.runner import shards

    ids = [f"{k:05d}" for k in range(10582)]  # VOC's train_aug
    for extra, count in (({}, 4), ({"task_runner": "dask"}, 8), ({"shard_size": 16}, 662)):
        run = make_run(config_from_dict({"output_root": str(tmp_path), **extra}))
        parts = shards(run, "crf", ids)
        assert len(parts) == count and sum(parts, []) == ids
    run = make_run(config_from_dict({"output_root": str(tmp_path)}))
    assert [len(p) for p in shards(run, "crf", ids[:40])] == [16, 16, 8]


def test_the_manifest_splits_a_per_image_stage_into_its_items_work_and_the_rest(tmp_path):
    """``timings.last_run_work_s``: the seconds inside the item functions (on the pool's two
    workers too), never more than the stage's time on its processes; a training stage has none."""
    import time

    from pipeline.runner import run_local

    from .conftest import demo_config

    one = run_local(make_run(demo_config(tmp_path / "w1")), ["box_seeds", "cam_train"])
    two = run_local(make_run(demo_config(tmp_path / "w2", workers=2)), ["box_seeds"])
    for workers, m in ((1, one), (2, two)):
        t = m["box_seeds"]["timings"]
        assert 0 < t["last_run_work_s"] <= t["last_run_s"] * workers, t
    assert "last_run_work_s" not in one["cam_train"]["timings"]

    def slow(ctx, image_id):  # in this process: a known cost per item
        time.sleep(0.05)
        return image_id

    run = make_run(demo_config(tmp_path / "slow"))
    ctx = stage_context(run, "box_seeds", run.ids("box_seeds"))
    ctx.mapper = None
    assert [i for i, _ in ctx.map_items(slow)] == ctx.todo and ctx.work_s >= 0.05 * len(ctx.todo)


def test_bench_orchestration_rows(tmp_path):
    from .conftest import bench_rows

    args = ["--size", "32x24", "--opt", 'engines=[pool, "workers: 1"]']
    rows = bench_rows(tmp_path, "orchestration", *args, "--opt", "sizes=[12, 24]", "--opt", "cli=false")
    sized = [r for r in rows if "growth" not in r["case"]]
    assert [r["case"] for r in sized] == ["pool N=12", "workers: 1 N=12", "pool N=24", "workers: 1 N=24"]
    for r in sized:
        assert r["seconds"] > 0 and 0 < r["work_s_per_image"] and r["overhead_s_per_image"] >= 0, r
        assert r["manifest_kb"] > 0 and r["peak_rss_mb"] > 0 and "status_s" not in r, r
    (one,) = bench_rows(tmp_path, "orchestration", *args, "--opt", "sizes=[6]", "--opt", 'engines=["workers: 1"]')
    assert one["status_s"] > 0 and one["cached_run_s"] > 0  # a fresh `wsss status` and cached `wsss run`
    growth = {r["case"]: r for r in rows if "growth" in r["case"]}
    assert set(growth) == {"pool: growth N=12 -> 24", "workers: 1: growth N=12 -> 24"}
    assert all(g["overhead_growth"] > 0 and g["s_per_image_growth"] > 0 for g in growth.values())

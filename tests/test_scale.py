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

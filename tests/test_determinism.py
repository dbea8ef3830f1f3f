"""Reruns are identical: every training stage, run twice on tiny data in two fresh processes
(other hash seeds, other allocation histories), ends with the same weights bit for bit and
the same loss curve. RRM's online CRFs run in a process pool in one of the two runs and in
the training process in the other: where its labels are computed does not change them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

# (run name, ``demo_config`` overrides, the stages to run); every training stage of every
# method appears once (instance_train needs torchvision's compiled ops, absent on this torch).
RUNS: list[tuple[str, dict, list[str]]] = [
    (
        "box",
        {"method": "spml", "crf__input": "a2gnn"},
        [
            "box_seeds",
            "cam_train",
            "cam",
            "seeds",
            "affinity_train",
            "graph",
            "random_walk",
            "a2gnn",
            "crf",
            "final_train",
            "spml_train",
        ],
    ),
    ("dfr", {"method": "dfr"}, ["dfr_train"]),
    ("blpseg", {"method": "blpseg"}, ["blpseg_train"]),
    ("rrm", {"method": "rrm"}, ["rrm_train"]),
    ("fewshot", {"method": "scl", "dataset": {"kind": "demo", "num_train": 6, "num_val": 6}}, ["fewshot_train"]),
]


def _runs(root: Path, crf_workers: int) -> list[tuple[object, list[str]]]:
    """The runs of :data:`RUNS` under ``root`` (local engine, one torch thread, 2 pool workers);
    RRM trains 4 steps, the last 2 joint, its CRFs on ``crf_workers`` processes."""
    from pipeline.runner import make_run

    from .conftest import demo_config

    return [
        (
            make_run(
                demo_config(
                    root,
                    run=name,
                    workers=2,
                    threads=1,
                    rrm_train__iterations=4,
                    rrm_train__cls_only_fraction=0.5,
                    rrm_train__crf_workers=crf_workers,
                    **overrides,
                )
            ),
            stages,
        )
        for name, overrides, stages in RUNS
    ]


def train_all(root: str, crf_workers: int) -> None:
    from pipeline.runner import run_local

    for run, stages in _runs(Path(root), crf_workers):
        run_local(run, stages)


def _start(root: Path, hash_seed: str, crf_workers: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    code = f"from tests.test_determinism import train_all; train_all({str(root)!r}, {crf_workers})"
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_every_training_stage_reruns_bit_for_bit(tmp_path):
    procs = [_start(tmp_path / "a", "1", 1), _start(tmp_path / "b", "2", 2)]
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    trained = 0
    for (run_a, stages), (run_b, _) in zip(_runs(tmp_path / "a", 1), _runs(tmp_path / "b", 2)):
        for stage in stages:
            a, b = run_a.store(stage), run_b.store(stage)
            if run_a.spec(stage).output == "model":
                sa, sb = a.read_model(), b.read_model()
                assert sa["state_dict"].keys() == sb["state_dict"].keys(), stage
                for key, value in sa["state_dict"].items():
                    assert torch.equal(sb["state_dict"][key], value), f"{stage}: {key} differs between the two runs"
                assert sa.get("history") == sb.get("history"), stage
                trained += 1
            if stage == "a2gnn":  # the per-image transductive training, too
                assert a.done_ids() and a.done_ids() == b.done_ids()
                for image_id in sorted(a.done_ids()):
                    for x, y in zip(a.read_soft(image_id), b.read_soft(image_id)):
                        assert np.array_equal(x, y), image_id
    assert trained == 8  # cam, affinity, final, spml, dfr, blpseg, rrm, fewshot

"""Reruns are identical: every training stage, run twice on tiny data in two fresh processes
(other hash seeds, other allocation histories), ends with the same weights bit for bit and
the same loss curve. RRM's online CRFs run in a process pool in one of the two runs and in
the training process in the other: where its labels are computed does not change them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# (run name, the config's overrides, the stages to run); every training stage of every
# method appears once (instance_train needs torchvision's compiled ops, absent on this torch).
RUNS: list[tuple[str, dict, list[str]]] = [
    ("box", {"spml_train": {"enabled": True}, "crf": {"input": "a2gnn"}},
     ["box_seeds", "cam_train", "cam", "seeds", "affinity_train", "graph", "random_walk", "a2gnn", "crf",
      "final_train", "spml_train"]),
    ("dfr", {"supervision": "dfr"}, ["dfr_train"]),
    ("blpseg", {"supervision": "blpseg"}, ["blpseg_train"]),
    ("rrm", {"supervision": "rrm"}, ["rrm_train"]),
    ("fewshot", {"task": "fewshot", "dataset": {"kind": "demo", "num_train": 6, "num_val": 6}}, ["fewshot_train"]),
]
TRAINED = ["cam_train", "affinity_train", "final_train", "spml_train", "dfr_train", "blpseg_train", "rrm_train",
           "fewshot_train"]


def train_all(root: str, crf_workers: int) -> None:
    """Run :data:`RUNS` under ``root`` (local engine, one torch thread, 2 pool workers); RRM
    trains 4 steps, the last 2 joint, its CRFs on ``crf_workers`` processes."""
    from pipeline.bench import TINY_TRAINING
    from pipeline.config import config_from_dict
    from pipeline.runner import make_run, run_local

    for name, overrides, stages in RUNS:
        data = {"run": name, "output_root": root, "engine": "local", "workers": 2, "threads": 1,
                "dataset": {"kind": "demo", "num_train": 6, "num_val": 2}, **json.loads(json.dumps(TINY_TRAINING))}
        for key, value in overrides.items():  # a section's keys over the tiny ones
            data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
        data["rrm_train"].update(iterations=4, cls_only_fraction=0.5, crf_workers=crf_workers)
        run = make_run(config_from_dict(data, "<determinism>"))
        run_local(run, stages)


def _start(root: Path, hash_seed: str, crf_workers: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    code = f"from tests.test_determinism import train_all; train_all({str(root)!r}, {crf_workers})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _models(root: Path) -> dict[str, Path]:
    found = {p.parent.parent.name: p for p in root.glob("*/*/*/model.pt")}
    assert set(TRAINED) <= set(found), sorted(found)
    return found


def test_every_training_stage_reruns_bit_for_bit(tmp_path):
    procs = [_start(tmp_path / "a", "1", 1), _start(tmp_path / "b", "2", 2)]
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-3000:]
    a, b = _models(tmp_path / "a"), _models(tmp_path / "b")
    assert a.keys() == b.keys()
    for stage in a:
        sa, sb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a[stage], b[stage]))
        weights_a = sa.get("state_dict", {})
        weights_b = sb.get("state_dict", {})
        assert weights_a.keys() == weights_b.keys(), stage
        for key, value in weights_a.items():
            assert torch.equal(weights_b[key], value), f"{stage}: {key} differs between the two runs"
        assert sa.get("history") == sb.get("history"), stage
    a2gnn_a = sorted((tmp_path / "a" / "box" / "a2gnn").glob("*/items/*.npz"))
    assert a2gnn_a, "a2gnn wrote no maps"
    for path in a2gnn_a:  # the per-image transductive training, too
        other = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert path.read_bytes() == other.read_bytes(), path.name

"""Quality floors of the box ladder on small real subsets (the shipped configs, training
shortened): a propagation stage must not fall below the seeds it starts from, and the CRF
must not fall below what it refines (thesis Table 3.4 climbs at every stage)."""
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runner import make_run, run_local

ROOT = Path(__file__).resolve().parent.parent
LADDER = ["box_seeds", "seeds", "affinity_train", "graph", "random_walk", "a2gnn", "crf"]
SHORT = ["affinity_train.epochs=3", "affinity_train.crop=128", "affinity_train.batch_size=4",
         "a2gnn.epochs=30", "a2gnn.hidden=64", "engine=local", "workers=2"]


@pytest.mark.parametrize("config, data, limit, floor", [
    ("horses_box.yaml", "weizmann_horse", 8, 0.6),
    ("camvid_box.yaml", "camvid", 3, 0.3),
])
def test_box_ladder_never_drops_below_its_seeds(tmp_path, horses, config, data, limit, floor):
    cfg = load_config(ROOT / "configs" / config, [f"dataset.root={horses.parent / data}", f"dataset.limit={limit}",
                                                  f"output_root={tmp_path}", *SHORT])
    run = make_run(cfg)
    run_local(run, LADDER)
    m = {s: run.store(s).read_manifest()["metrics"] for s in ("box_seeds", "random_walk", "a2gnn", "crf")}
    seeds = m["box_seeds"]["miou"]
    assert m["random_walk"]["miou"] >= seeds, m
    assert m["a2gnn"]["miou"] >= seeds, m
    assert m["crf"]["miou"] >= m["a2gnn"]["miou"] - 0.01 and m["crf"]["miou"] > floor, m

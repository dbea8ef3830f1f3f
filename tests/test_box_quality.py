"""Quality floors of the box ladder on small real subsets: the shipped configs with their
training shortened. Each stage is held against the map it starts from (thesis Table 3.4
climbs at every stage), and the last one against one plain GrabCut call per box."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.runner import make_run, run_local

ROOT = Path(__file__).resolve().parent.parent
LADDER = ["box_seeds", "seeds", "affinity_train", "graph", "random_walk", "a2gnn", "crf"]
SHORT = [
    "affinity_train.epochs=3",
    "affinity_train.crop=128",
    "affinity_train.batch_size=4",
    "a2gnn.epochs=30",
    "a2gnn.hidden=64",
    "engine=local",
    "workers=2",
]
SUBSETS = {"horses": ("horses_box.yaml", "weizmann_horse", 8), "camvid": ("camvid_box.yaml", "camvid", 8)}
pytestmark = pytest.mark.claims  # the method tier: trained from scratch on real photographs
_RUNS: dict[str, dict] = {}
_RUN_OF: dict = {}


def ladder(name: str, horses: Path, tmp_path_factory) -> dict[str, float]:
    """mIoU of each box stage on the subset (one run per subset and session)."""
    if name not in _RUNS:
        config, data, limit = SUBSETS[name]
        run = make_run(
            load_config(
                ROOT / "configs" / config,
                [
                    f"dataset.root={horses.parent / data}",
                    f"dataset.limit={limit}",
                    f"output_root={tmp_path_factory.mktemp(name)}",
                    *SHORT,
                ],
            )
        )
        run_local(run, LADDER)
        _RUN_OF[name] = run
        metrics = {s: run.store(s).read_manifest()["metrics"] for s in ("box_seeds", "random_walk", "a2gnn", "crf")}
        _RUNS[name] = {s: m["miou"] for s, m in metrics.items()}
        _RUNS[name]["grabcut_filled"] = metrics["box_seeds"]["maps"]["grabcut_filled"]["miou"]
        if "dense_crf" in metrics["crf"].get("maps", {}):  # crf.grabcut_refine: the CRF before GrabCut
            _RUNS[name]["dense_crf"] = metrics["crf"]["maps"]["dense_crf"]["miou"]
    return _RUNS[name]


# (subset, stage, the map it must not fall below). One point of slack: a stage that only
# reorders float sums moves these 8-image runs by a few thousandths between environments.
CASES = [
    ("horses", "random_walk", "box_seeds"),
    ("horses", "a2gnn", "box_seeds"),
    ("horses", "crf", "a2gnn"),
    ("horses", "crf", "dense_crf"),  # the horses config refines the CRF with GrabCut
    ("horses", "crf", "grabcut_filled"),
    ("camvid", "random_walk", "box_seeds"),
    ("camvid", "a2gnn", "box_seeds"),
    ("camvid", "a2gnn", "grabcut_filled"),
    # CamVid's CRF is held against GrabCut, not against A2GNN: on the box-constrained maps of
    # the full schedule it adds 0.015 on these 8 frames (docs/results.md), on this shortened one's
    # softer maps it takes a few points off the small pedestrians.
    ("camvid", "crf", "grabcut_filled"),
]
SLACK = 0.01


@pytest.mark.parametrize("subset, stage, start", CASES, ids=[f"{c[0]}-{c[1]}-vs-{c[2]}" for c in CASES])
def test_box_stage_does_not_fall_below_what_it_starts_from(horses, tmp_path_factory, subset, stage, start):
    m = ladder(subset, horses, tmp_path_factory)
    assert m[stage] >= m[start] - SLACK, m


def test_a2gnn_keeps_each_class_inside_its_own_boxes(horses, tmp_path_factory):
    ladder("camvid", horses, tmp_path_factory)
    run = _RUN_OF["camvid"]
    store, checked = run.store("a2gnn"), 0
    for image_id in sorted(store.done_ids()):
        probs, class_ids = store.read_soft(image_id)
        boxes = run.dataset.load_weak(image_id).boxes
        for k, c in enumerate(class_ids):
            if c == 0:
                continue
            inside = np.zeros(probs.shape[1:], bool)
            for b in boxes:
                if b.cls == c:
                    inside[b.y0 : b.y1, b.x0 : b.x1] = True
            assert inside.any() and probs[k][~inside].max() == 0, (image_id, int(c))
            checked += 1
        assert np.allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3), image_id
    assert checked >= 8

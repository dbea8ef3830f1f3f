"""Seed quality end to end: the demo config's CAM + box fusion, scribble/point expansion on
the demo and on the Weizmann horses."""

import os

import numpy as np
import pytest
import torch

from models.affinity import window_offsets
from models.metrics import confusion_matrix, scores
from pipeline.config import config_from_dict
from pipeline.runner import make_run, run_local

from .conftest import demo_config


def _all_background_miou(run) -> float:
    ds = run.dataset
    conf = sum(confusion_matrix(np.zeros_like(ds.load_gt(i)), ds.load_gt(i), ds.num_classes) for i in run.ids("cam"))
    return scores(conf)["miou"]


def _untrained_cam_miou(run) -> float:
    """The same CAM inference with the classifier's initial (untrained) weights."""
    import torch

    from stages.cam import cam_probs
    from stages.cam_train import build_model

    cfg = run.config
    torch.manual_seed(cfg.seed)
    model = build_model(
        {
            "num_fg": run.dataset.num_classes - 1,
            "depth": cfg.cam_train.depth,
            "output_stride": cfg.cam_train.output_stride,
        }
    ).eval()
    ds = run.dataset
    conf = 0
    for i in run.ids("cam"):
        probs, ids = cam_probs(model, ds.load_image(i), ds.load_weak(i).tags, cfg.cam, "cpu")
        conf = conf + confusion_matrix(ids.astype(np.uint8)[probs.argmax(0)], ds.load_gt(i), ds.num_classes)
    return scores(conf)["miou"]


@pytest.mark.claims
def test_trained_cam_beats_constant_background_and_untrained(demo_box_run):
    cam = demo_box_run.store("cam").read_manifest()["metrics"]
    assert cam["images"] == 32
    baseline = _all_background_miou(demo_box_run)
    assert cam["miou"] > baseline + 0.08, (cam["miou"], baseline)
    assert cam["miou"] > _untrained_cam_miou(demo_box_run) + 0.05
    assert (
        set(cam["threshold_sweep"]) == {f"{0.05 * k:.2f}".rstrip("0") for k in range(1, 13)}
        or len(cam["threshold_sweep"]) == 12
    )
    assert cam["best_threshold_miou"] >= max(cam["threshold_sweep"].values())


@pytest.mark.claims
def test_confident_seeds_are_more_precise_than_fused_than_cam(demo_box_run):
    seeds = demo_box_run.store("seeds").read_manifest()["metrics"]
    m_g, maps = seeds, seeds["maps"]
    assert set(maps) == {"M_I", "M_I_reliable", "M_F"}
    assert m_g["precision"] > maps["M_F"]["precision"] > maps["M_I"]["precision"]
    assert maps["M_I_reliable"]["precision"] > maps["M_I"]["precision"]
    assert maps["M_I"]["coverage"] == 1.0 and maps["M_I_reliable"]["coverage"] < 0.5
    assert m_g["coverage"] < maps["M_F"]["coverage"]


@pytest.mark.claims
def test_random_walk_beats_the_seeds_it_starts_from(demo_box_run):
    """Table 3.4's "+L_Ac +RW" step at demo scale: propagating the confident seeds M_g over
    the affinity graph labels every pixel and raises mIoU."""
    seeds = demo_box_run.store("seeds").read_manifest()["metrics"]
    walk = demo_box_run.store("random_walk").read_manifest()
    assert walk["info"]["source"] == "seeds"
    assert walk["metrics"]["coverage"] == 1.0
    assert walk["metrics"]["miou"] > seeds["miou"] + 0.05, (walk["metrics"]["miou"], seeds["miou"])
    graph = demo_box_run.store("graph").read_manifest()
    assert graph["metrics"]["nodes_per_image"] == 20 * 15  # 160x120 at stride 8
    assert 1 < graph["metrics"]["edges_per_node"] <= 1 + len(window_offsets(4))  # box radius 4
    assert graph["bytes_per_image"] > 0


@pytest.mark.parametrize("sup", ["scribble", "point"])
def test_demo_superpixel_seeds_without_cam(tmp_path, sup):
    run = make_run(demo_config(tmp_path, labels=sup, cam__enabled=False, workers=2))
    assert run.names == ["seeds", "affinity_train", "graph", "random_walk", "a2gnn", "crf", "final_train", "final_eval"]
    m = run_local(run, ["seeds"])["seeds"]["metrics"]
    assert m["precision"] > 0.9
    assert m["coverage"] > (0.12 if sup == "scribble" else 0.003)


@pytest.mark.parametrize("sup", ["scribble", "point"])
def test_demo_seeds_with_cam_write_the_affinity_map(tmp_path, sup):
    run = make_run(demo_config(tmp_path, labels=sup))
    out = run_local(run, ["cam_train", "cam", "seeds"])["seeds"]
    assert out["counts"]["failed"] == 0 and out["counts"]["done"] == 6
    assert set(out["metrics"]["maps"]) == {"M_I", "M_I_reliable", "affinity"}
    store = run.store("seeds")
    some = sorted(store.done_ids())[0]
    m_s, m_rel, aff = (store.read_label(some, v) for v in (None, "M_I_reliable", "affinity"))
    if sup == "point":  # points train the affinity CNN on M'_I alone (Sect. 3.6.1)
        np.testing.assert_array_equal(aff, m_rel)
        return
    known = m_s != 255
    np.testing.assert_array_equal(aff[known], m_s[known])
    np.testing.assert_array_equal(aff[~known], m_rel[~known])


def test_horses_scribble_seeds(tmp_path, horses):
    cfg = config_from_dict(
        {
            "run": "horses",
            "output_root": str(tmp_path / "a"),
            "engine": "local",
            "workers": 2,
            "labels": "scribble",
            "cam": {"enabled": False},
            "dataset": {
                "kind": "masks",
                "root": str(horses),
                "images": "rgb",
                "masks": "figure_ground",
                "class_names": ["background", "horse"],
                "resize": "image_to_mask",
                "limit": 16,
            },
        }
    )
    m = run_local(make_run(cfg), ["seeds"])["seeds"]["metrics"]
    assert m["precision"] > 0.9 and m["coverage"] > 0.2


@pytest.mark.claims
def test_a2gnn_beats_the_random_walk_and_the_seeds(demo_box_run):
    """Table 3.4 at demo scale: A²GNN (CE + MP + L_reg, consistency checking) on the same
    graph and seeds labels every pixel and beats both the seeds and the random walk."""
    seeds = demo_box_run.store("seeds").read_manifest()["metrics"]["miou"]
    walk = demo_box_run.store("random_walk").read_manifest()["metrics"]["miou"]
    a2gnn = demo_box_run.store("a2gnn").read_manifest()
    assert a2gnn["info"]["layer"] == "a2gnn" and a2gnn["info"]["path"] == "grid"
    assert a2gnn["metrics"]["coverage"] == 1.0
    assert a2gnn["metrics"]["miou"] > seeds + 0.1, (a2gnn["metrics"]["miou"], seeds)
    assert a2gnn["metrics"]["miou"] > walk + 0.02, (a2gnn["metrics"]["miou"], walk)
    assert 0.0 <= a2gnn["info"]["check_removed_mean"] < 0.5


@pytest.mark.claims
def test_spml_labels_above_the_seeds_it_learns_from(demo_box_run):
    """The demo ladder's SPML row (configs/demo.yaml: 150 steps from scratch, the seeds kept, a
    4-step walk): its pseudo-labels beat the seeds they are trained on. Training seeds 0 / 1 / 2
    on two torch threads (as `make demo` and this fixture) gave +0.040 / +0.015 / +0.019
    (docs/results.md); the margin is under half the smallest."""
    spml = run_local(demo_box_run, ["spml_train", "spml"])["spml"]["metrics"]
    seeds = demo_box_run.store("seeds").read_manifest()["metrics"]["miou"]
    assert spml["coverage"] == 1.0
    assert spml["miou"] > seeds + 0.007, (spml["miou"], seeds)


@pytest.mark.claims
def test_a2gnn_result_does_not_depend_on_the_batch(demo_box_run):
    """Re-training three images one at a time gives what the stage stored for them when it
    trained them stacked with others (same per-image seeds)."""
    from pipeline.runner import stage_context

    run = demo_box_run
    assert run.config.a2gnn.batch > 1
    ids = run.ids("a2gnn")[:3]
    ctx = stage_context(run, "a2gnn", ids)
    cfg = run.config.a2gnn
    # the stage trained in worker processes, each with cores // workers torch threads: the
    # same thread count gives the same float sums
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.workers))
    try:
        _refit_and_compare(run, ctx, ids, cfg)
    finally:
        torch.set_num_threads(threads)


def _refit_and_compare(run, ctx, ids, cfg) -> None:
    from models.transductive import classes_of, fit
    from stages.a2gnn import _problem

    for image_id in ids:
        weak = run.dataset.load_weak(image_id)
        class_ids = classes_of(run.store("seeds").read_label(image_id), weak)
        problem = _problem(ctx, image_id, class_ids, weak.boxes, cfg)
        probs = fit([problem], cfg, run.config.affinity_train.radius, "cpu")[0][0].numpy()
        stored, stored_ids = run.store("a2gnn").read_soft(image_id)
        assert list(stored_ids) == list(class_ids)
        np.testing.assert_allclose(stored.astype(np.float32), probs, atol=2e-3)

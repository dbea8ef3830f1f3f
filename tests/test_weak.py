"""Weak-label synthesis from GT masks, and the demo dataset."""

import numpy as np

from pipeline.config import DemoDataset, WeakConfig
from pipeline.datasets import DemoData
from models.metrics import evaluate
from pipeline.weak import image_rng, synthesize
from stages.base import IGNORE, Box


def two_objects():
    sem = np.zeros((60, 80), np.uint8)
    sem[10:40, 5:35] = 1
    sem[20:55, 45:75] = 2
    return sem


def test_boxes_points_tags_are_tight_and_interior():
    sem = two_objects()
    w = synthesize(sem, None, image_rng(0, "a"))
    assert sorted(w.boxes, key=lambda b: b.cls) == [Box(5, 10, 35, 40, 1), Box(45, 20, 75, 55, 2)]
    assert w.tags == [1, 2]
    for p in w.points:
        assert sem[p.y, p.x] == p.cls
        assert 12 <= p.y and (p.cls != 1 or 7 <= p.x <= 32)  # interior, away from the border


def test_scribbles_inside_regions_with_about_three_percent_coverage():
    sem = two_objects()
    w = synthesize(sem, None, image_rng(0, "a"), scribble_coverage=0.03)
    s = w.scribbles
    labeled = s != IGNORE
    assert (s[labeled] == sem[labeled]).all()  # strokes never cross a boundary
    for cls in (0, 1, 2):
        assert (s == cls).any()
    assert 0.015 < labeled.mean() < 0.06


def test_scribble_length_ratio_sets_the_stroke_extent():
    sem = np.kron(two_objects(), np.ones((4, 4), np.uint8))  # big enough that coverage does not cap length

    def extent(length):
        ys, xs = np.nonzero(synthesize(sem, None, image_rng(0, "a"), scribble_length=length).scribbles == 1)
        return (ys.max() - ys.min()) + (xs.max() - xs.min())

    assert extent(1.0) > 1.5 * extent(0.2)


def test_synthesis_is_deterministic_per_seed_and_id():
    sem = two_objects()
    a = synthesize(sem, None, image_rng(3, "img"))
    b = synthesize(sem, None, image_rng(3, "img"))
    c = synthesize(sem, None, image_rng(4, "img"))
    assert (a.scribbles == b.scribbles).all() and a.points == b.points
    assert not ((a.scribbles == c.scribbles).all() and a.points == c.points)


def test_boxes_and_tags_alone_skip_the_strokes_and_do_not_change():
    sem = two_objects()
    full = synthesize(sem, None, image_rng(3, "img"))
    lean = synthesize(sem, None, image_rng(3, "img"), strokes=False)
    assert (lean.tags, lean.boxes) == (full.tags, full.boxes)
    assert lean.scribbles is None and lean.points == []
    cfg = DemoDataset(num_train=2, num_val=1, height=60, width=80)
    for labels, strokes in (("box", False), ("tags", False), ("point", True), ("scribble", True)):
        weak = DemoData(cfg, WeakConfig(), labels).load_weak("train_0001")
        every = DemoData(cfg, WeakConfig()).load_weak("train_0001")
        assert (weak.tags, weak.boxes) == (every.tags, every.boxes)
        assert (weak.scribbles is not None) == strokes and (weak.points == every.points) == strokes


def test_instances_separate_touching_objects_of_one_class():
    sem = np.zeros((30, 40), np.uint8)
    sem[5:25, 5:35] = 1
    inst = np.zeros_like(sem)
    inst[5:25, 5:20], inst[5:25, 20:35] = 1, 2
    w = synthesize(sem, inst, image_rng(0, "x"))
    assert sorted((b.x0, b.x1) for b in w.boxes) == [(5, 20), (20, 35)]


def test_demo_is_deterministic_multiclass_and_not_threshold_solvable():
    d = DemoData(DemoDataset(num_train=24), WeakConfig())
    ids = d.ids("train")
    again = DemoData(DemoDataset(num_train=24), WeakConfig())
    assert (d.load_image(ids[3]) == again.load_image(ids[3])).all()
    other = DemoData(DemoDataset(num_train=24, seed=1), WeakConfig())
    assert not (d.load_image(ids[3]) == other.load_image(ids[3])).all()
    gts = [d.load_gt(i) for i in ids]
    assert set(np.unique(np.concatenate([g.ravel() for g in gts]))) == {0, 1, 2, 3}
    assert any(len(d.load_weak(i).boxes) >= 2 for i in ids)
    # Overlaps: some image has an object whose box contains another object's pixels.
    assert any(
        any(
            ((g[b.y0 : b.y1, b.x0 : b.x1] != 0) & (g[b.y0 : b.y1, b.x0 : b.x1] != b.cls)).any()
            for b in d.load_weak(i).boxes
        )
        for i, g in zip(ids, gts)
    )
    # The best global grey-level threshold for figure/ground is far from solving it.
    grey = [d.load_image(i).mean(-1) for i in ids]
    fg = [(g > 0).astype(np.uint8) for g in gts]
    best = max(
        max(
            evaluate([(x > t).astype(np.uint8) for x in grey], fg, 2)["miou"],
            evaluate([(x <= t).astype(np.uint8) for x in grey], fg, 2)["miou"],
        )
        for t in range(20, 240, 10)
    )
    assert best < 0.6

"""The many-class synthetic source (``dataset.kind: shapes``)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import shapes


def test_the_classes_are_distinct_shape_texture_pairs_and_colours():
    specs = shapes.classes(0, 48)
    assert len({(s["shape"], s["texture"]) for s in specs}) == 48
    colours = {(s["hue"], s["sat"], s["val"]) for s in specs}
    assert len(colours) == 48 and {s["hue"] for s in specs} == set(range(0, 180, 15))
    assert all((s["part"]["hue"], s["part"]["sat"], s["part"]["val"]) != (s["hue"], s["sat"], s["val"]) for s in specs)
    assert shapes.classes(1, 48) != specs and shapes.classes(0, 48) == specs  # dealt by the seed
    with pytest.raises(ValueError, match="num_classes must be 1..48"):
        shapes.classes(0, 49)


def test_images_are_seeded_and_hold_two_or_three_classes():
    a = shapes.generate(0, 48, "train", 3, 96, 96)
    b = shapes.generate.__wrapped__(0, 48, "train", 3, 96, 96)  # not the cached arrays
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], shapes.generate(0, 48, "val", 3, 96, 96)[0])
    seen = np.zeros(49, int)
    for i in range(200):
        image, semantic, instance = shapes.generate(0, 48, "train", i, 96, 96)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        present = set(np.unique(semantic)) - {0}
        assert 1 <= len(present) <= 3 and len(set(np.unique(instance)) - {0}) == len(present)
        assert ((semantic > 0) == (instance > 0)).all()
        seen[list(present)] += 1
    assert (seen[1:] > 0).all()  # every class appears in 200 images


def test_each_object_has_its_part_in_the_part_colour():
    specs = shapes.classes(0, 48)
    image, semantic, instance = shapes.generate(0, 48, "train", 0, 96, 96, part_fraction=0.3)
    flat, *_ = shapes.generate(0, 48, "train", 0, 96, 96, part_fraction=0.0)
    assert np.array_equal(semantic, shapes.generate(0, 48, "train", 0, 96, 96, part_fraction=0.0)[1])
    changed = np.abs(image.astype(int) - flat.astype(int)).sum(2) > 30
    for k in set(np.unique(instance)) - {0}:
        obj = instance == k
        assert 0.1 < changed[obj].mean() < 0.5  # about the part's share, less what later objects hide
    mask = np.zeros((20, 20), bool)
    mask[5:15, 2:18] = True
    part = shapes.part_of(mask, 0.3, np.random.default_rng(0))
    assert (part <= mask).all() and part.sum() == pytest.approx(0.3 * mask.sum(), abs=12)
    assert specs[0]["part"]["hue"] != specs[0]["hue"]


def test_the_shapes_reader_serves_every_label_kind(tmp_path):
    from pipeline.config import load_config
    from pipeline.datasets import ShapesData, build_dataset

    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: {kind: shapes, num_classes: 40, num_train: 4, num_val: 2}\nlabels: box\n")
    data = build_dataset(load_config(cfg))
    assert isinstance(data, ShapesData) and data.num_classes == 41 and data.class_names[40] == "c40"
    assert data.ids("val") == ["val_0000", "val_0001"]
    gt = data.load_gt("train_0001")
    assert gt.shape == (96, 96) and gt.max() <= 40
    weak = data.load_weak("train_0001")
    assert {b.cls for b in weak.boxes} == set(np.unique(gt)) - {0} and set(weak.tags) == {b.cls for b in weak.boxes}
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {kind: shapes, num_classes: 60}\n")
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.num_classes: .*less than or equal to 48"):
        load_config(bad)

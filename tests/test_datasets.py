"""Readers (voc, masks) and every kind of bad input, on tiny files made here."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import MasksDataset, VocDataset, WeakConfig
from pipeline.datasets import MasksData, VocData
from pipeline.store import encode_label_png
from stages.base import IGNORE, Box, DataError, Point

XML = """<annotation><filename>{id}.jpg</filename><size><width>40</width><height>30</height></size>
{objects}</annotation>"""
OBJ = (
    "<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
    "<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
)
SCRIBBLE = """<annotation><filename>a.jpg</filename>
<polygon><tag>background</tag><point><X>1</X><Y>1</Y></point><point><X>10</X><Y>1</Y></point></polygon>
<polygon><tag>plane</tag><point><X>5</X><Y>10</Y></point><point><X>15</X><Y>10</Y></point></polygon>
</annotation>"""


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOC2012"
    for d in ("JPEGImages", "Annotations", "ImageSets/Segmentation", "SegmentationClass", "scribbles"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        gt = np.zeros((30, 40), np.uint8)
        gt[5:20, 3:30] = 1
        gt[4, :] = 255
        (root / "SegmentationClass" / f"{i}.png").write_bytes(encode_label_png(gt))
    (root / "Annotations" / "a.xml").write_text(
        XML.format(
            id="a",
            objects=OBJ.format(name="aeroplane", x0=4, y0=6, x1=30, y1=20)
            + OBJ.format(name="person", x0=30, y0=1, x1=55, y1=10),
        )
    )
    (root / "Annotations" / "b.xml").write_text(
        XML.format(id="b", objects=OBJ.format(name="horse", x0=1, y0=1, x1=10, y1=10))
    )
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("b\n")
    (root / "scribbles" / "a.xml").write_text(SCRIBBLE)
    (tmp_path / "points.json").write_text(
        json.dumps({"a": [{"x": 10, "y": 12, "cls": 1}, {"x": 2, "y": 2, "cls": "bg"}]})
    )
    return root


def make_voc(root, **kw):
    return VocData(
        VocDataset(root=str(root), scribbles=str(root / "scribbles"), points=str(root.parent / "points.json"), **kw),
        WeakConfig(),
    )


def test_voc_reads_boxes_tags_gt_scribbles_points(voc, caplog):
    d = make_voc(voc)
    assert d.ids("train") == ["a", "b"] and d.ids("val") == ["b"]
    assert d.load_image("a").shape == (30, 40, 3) and d.load_gt("a")[4, 0] == IGNORE
    with caplog.at_level(logging.WARNING):
        w = d.load_weak("a")
    # 1-based inclusive VOC boxes -> half-open 0-based; the person box is clipped to the image.
    assert w.boxes == [Box(3, 5, 30, 20, 1), Box(29, 0, 40, 10, 15)]
    assert "a.xml" in caplog.text and "clipped" in caplog.text
    assert w.tags == [1, 15]
    assert w.scribbles[10, 10] == 1 and w.scribbles[1, 5] == 0 and w.scribbles[25, 35] == IGNORE
    assert w.points == [Point(10, 12, 1), Point(2, 2, 0)]


def test_voc_bad_inputs_name_the_file(voc):
    d = make_voc(voc)
    (voc / "Annotations" / "b.xml").write_text("<annotation><object><name>horse</name>")
    with pytest.raises(DataError, match=r"b\.xml: malformed XML"):
        d.load_weak("b")
    (voc / "Annotations" / "b.xml").write_text(
        XML.format(id="b", objects=OBJ.format(name="unicorn", x0=1, y0=1, x1=5, y1=5))
    )
    with pytest.raises(DataError, match=r"b\.xml: unknown class name 'unicorn'"):
        d.load_weak("b")
    data = (voc / "JPEGImages" / "b.jpg").read_bytes()
    (voc / "JPEGImages" / "b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"b\.jpg: unreadable or truncated image"):
        d.load_image("b")
    with pytest.raises(DataError, match="VOC folder not found"):
        VocData(VocDataset(root=str(voc.parent / "nowhere")), WeakConfig())


def test_box_outside_image_is_dropped_with_warning(voc, caplog):
    (voc / "Annotations" / "b.xml").write_text(
        XML.format(id="b", objects=OBJ.format(name="horse", x0=50, y0=1, x1=60, y1=10))
    )
    with caplog.at_level(logging.WARNING):
        assert make_voc(voc).load_weak("b").boxes == []
    assert "outside" in caplog.text and "b.xml" in caplog.text


@pytest.fixture
def masks(tmp_path):
    root = tmp_path / "m"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i, size in (("x", (40, 60)), ("y", (20, 30)), ("z", (40, 60))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        m = np.zeros((40, 60), np.uint8)
        m[10:30, 15:45] = 255
        Image.fromarray(m).save(root / "masks" / f"{i}.jpg")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(root / "masks" / "z.jpg")  # empty mask
    return root


def test_masks_threshold_resize_and_errors(masks):
    strict = MasksData(MasksDataset(root=str(masks), val_fraction=0.0), WeakConfig())
    assert strict.ids("train") == ["x", "y", "z"]
    gt = strict.load_gt("x")
    assert set(np.unique(gt)) == {0, 1} and gt[20, 30] == 1  # JPEG mask thresholded at 128
    with pytest.raises(DataError, match=r"y\.jpg: image is 30x20 but its mask .*y\.jpg is 60x40.*image_to_mask"):
        strict.load_image("y")
    loose = MasksData(MasksDataset(root=str(masks), val_fraction=0.0, resize="image_to_mask"), WeakConfig())
    assert loose.load_image("y").shape == (40, 60, 3)
    with pytest.raises(DataError, match=r"z\.jpg: mask has no foreground object"):
        loose.load_weak("z")
    w = loose.load_weak("x")
    assert w.boxes == [Box(15, 10, 45, 30, 1)] and w.tags == [1]
    with pytest.raises(DataError, match="dataset folder not found"):
        MasksData(MasksDataset(root=str(masks / "nope")), WeakConfig())


def test_horses_reader(horses):
    d = MasksData(
        MasksDataset(
            root=str(horses),
            images="rgb",
            masks="figure_ground",
            class_names=["background", "horse"],
            resize="image_to_mask",
        ),
        WeakConfig(),
    )
    ids = d.ids("train") + d.ids("val")
    assert len(ids) == 328 and not set(d.ids("train")) & set(d.ids("val"))
    img, gt = d.load_image("horse001"), d.load_gt("horse001")
    assert img.shape[:2] == gt.shape == (232, 315)
    strict = MasksData(MasksDataset(root=str(horses), images="rgb", masks="figure_ground"), WeakConfig())
    with pytest.raises(DataError, match=r"horse001\.jpg: image is 800x590 but its mask"):
        strict.load_image("horse001")


def test_camvid_config_keeps_its_split_lists_and_maps_stuff_to_background(horses):
    from pipeline.config import load_config
    from pipeline.datasets import build_dataset

    root = horses.parent / "camvid"
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "camvid_box.yaml", [f"dataset.root={root}"])
    data = build_dataset(cfg)
    train, val = data.ids("train"), data.ids("val")
    assert len(train) == 123 and len(val) == 51 and not set(train) & set(val)
    assert train == (root / "train.txt").read_text().split()
    gt = data.load_gt(train[0])
    assert set(np.unique(gt)) <= {0, 1, 2, 3, 255} and (gt == 1).any()  # cars
    raw = np.asarray(Image.open(root / "masks" / f"{train[0]}.png"))
    assert ((gt == 0) == np.isin(raw, range(8))).all() and ((gt == 255) == (raw == 11)).all()


def test_masks_split_lists_name_the_bad_line(masks):
    (masks / "train.txt").write_text("x\nnope\n")
    with pytest.raises(DataError, match=r"train\.txt: line 2: 'nope' has no image"):
        MasksData(MasksDataset(root=str(masks), train_list="train.txt"), WeakConfig())
    (masks / "train.txt").write_text("x\n../y\n")
    with pytest.raises(DataError, match=r"train\.txt: line 2: image id '\.\./y' cannot name a file"):
        MasksData(MasksDataset(root=str(masks), train_list="train.txt"), WeakConfig())
    (masks / "train.txt").write_text("x\ny\n")
    (masks / "val.txt").write_text("z\n")
    data = MasksData(MasksDataset(root=str(masks), train_list="train.txt", val_list="val.txt"), WeakConfig())
    assert data.ids("train") == ["x", "y"] and data.ids("val") == ["z"]

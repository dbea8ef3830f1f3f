"""Hostile and damaged inputs: each ends in one line naming the file and what is wrong, and
none is read silently wrong (EXIF orientation, COCO / VOC boxes and ids, configs, disk full,
damaged checkpoints, edited inputs, pickled code)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, MasksDataset, WeakConfig, load_config
from pipeline.datasets import MasksData, build_dataset, read_image
from pipeline.store import read_label_png
from stages.base import DataError

from .test_datasets import OBJ, XML, make_voc, voc  # noqa: F401 (the voc fixture)
from .test_own_data import coco_config, coco_tree

ORIENT_6 = 6  # EXIF: the stored pixels are shown turned 90 degrees clockwise


def _exif6(img: Image.Image) -> Image.Image.Exif:
    exif = img.getexif()
    exif[0x0112] = ORIENT_6
    return exif


def _stored_for_orientation_6(shown: Image.Image) -> Image.Image:
    """The pixels a camera stores for ``shown`` with orientation 6 (viewers turn them clockwise)."""
    return shown.transpose(Image.Transpose.ROTATE_90)


@pytest.mark.parametrize("square", [False, True])
def test_exif_orientation_is_applied_to_images_and_masks(tmp_path, horses, square):
    shown = Image.open(horses / "rgb" / "horse001.jpg").convert("RGB")
    mask = Image.open(horses / "figure_ground" / "horse001.jpg").convert("L").resize(shown.size)
    if square:
        side = min(shown.size)
        shown, mask = shown.crop((0, 0, side, side)), mask.crop((0, 0, side, side))
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stored = _stored_for_orientation_6(shown)
    stored.save(root / "images" / "a.jpg", quality=95, exif=_exif6(stored))
    mask.save(root / "masks" / "a.png")
    data = MasksData(MasksDataset(root=str(root), val_fraction=0.0), WeakConfig(), "box")
    image = data.load_image("a")
    raw = np.asarray(Image.open(root / "images" / "a.jpg").convert("RGB"))
    assert image.shape[:2] == np.asarray(mask).shape  # upright, as the mask is drawn
    assert np.array_equal(image, np.rot90(raw, k=-1))
    # upright, the horse's pixels are where its mask is: foreground and background colours differ
    # as in the original; read as stored, a square image would mix them
    fg = np.asarray(mask) >= 128
    ref = np.asarray(shown).astype(float)
    gap = abs(ref[fg].mean() - ref[~fg].mean())
    assert abs(image[fg].astype(float).mean() - image[~fg].astype(float).mean()) > 0.8 * gap
    assert read_image(root / "images" / "a.jpg").shape == image.shape


def test_exif_orientation_of_a_label_png_turns_it_like_its_image(tmp_path):
    label = np.zeros((20, 30), np.uint8)
    label[2:5, 20:28] = 1
    stored = _stored_for_orientation_6(Image.fromarray(label, mode="L"))
    stored.save(tmp_path / "s.png", exif=_exif6(stored))
    assert np.array_equal(read_label_png(tmp_path / "s.png"), label)


# ----------------------------------------------------------------------------- COCO
def _coco_variant(root: Path, edit) -> str:
    data = json.loads((root / "train.json").read_text())
    edit(data)
    (root / "variant.json").write_text(json.dumps(data))
    return "variant.json"


def test_coco_duplicate_image_ids_are_refused_naming_both(horses, tmp_path):
    root, _ = coco_tree(tmp_path, horses)

    def dup(d):
        d["images"][1]["id"] = d["images"][0]["id"]

    with pytest.raises(DataError, match=r"variant\.json: images 'horse001\.jpg' and 'horse002\.jpg' share the id 100"):
        build_dataset(coco_config(root, tmp_path, train_json=_coco_variant(root, dup)))


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/hostname", "sub/../../outside.jpg"])
def test_coco_file_names_that_leave_the_image_folder_fail_that_image(horses, tmp_path, name):
    root, _ = coco_tree(tmp_path, horses)
    (tmp_path / "outside.jpg").write_bytes((horses / "rgb" / "horse001.jpg").read_bytes())

    def escape(d):
        d["images"][0]["file_name"] = name

    data = build_dataset(coco_config(root, tmp_path, train_json=_coco_variant(root, escape)))
    bad = Path(name).stem
    assert bad in data.ids("train")
    for read in (data.load_image, data.load_weak, data.image_path):
        with pytest.raises(DataError, match=r"variant\.json: image 100: file_name .* leaves the image folder"):
            read(bad)
    assert data.load_image("horse002").shape[2] == 3  # the other images go on


def test_coco_without_a_usable_annotation_stops_before_any_work(horses, tmp_path):
    root, _ = coco_tree(tmp_path, horses)

    def empty(d):
        d["annotations"] = []

    with pytest.raises(DataError, match=r"variant\.json: no usable annotation .* background alone"):
        build_dataset(coco_config(root, tmp_path, train_json=_coco_variant(root, empty)))


@pytest.mark.parametrize(
    "bbox,problem",
    [
        ([math.nan, 1.0, 5.0, 5.0], "not finite"),
        ([1.0, 1.0, math.inf, 5.0], "not finite"),
        ([1.0, 1.0, -5.0, 5.0], "negative width or height"),
        (["a", 1, 5, 5], "not a number"),
    ],
)
def test_coco_bad_boxes_fail_their_image_naming_the_annotation(horses, tmp_path, bbox, problem):
    root, _ = coco_tree(tmp_path, horses)

    def bad(d):
        d["annotations"][1]["bbox"] = bbox  # horse002's object

    data = build_dataset(coco_config(root, tmp_path, train_json=_coco_variant(root, bad)))
    with pytest.raises(DataError, match=rf"variant\.json: annotation 11 \(horse002\.jpg\): box .*{problem}"):
        data.load_weak("horse002")
    assert len(data.load_weak("horse001").boxes) == 1


@pytest.mark.parametrize(
    "corners,problem",
    [(("nan", 1, 5, 5), "not finite"), ((1, 1, "inf", 5), "not finite"), ((20, 1, 5, 5), "inverted")],
)
def test_voc_bad_boxes_name_the_file_and_the_object(voc, corners, problem):  # noqa: F811 (fixture)
    x0, y0, x1, y1 = corners
    (voc / "Annotations" / "b.xml").write_text(
        XML.format(id="b", objects=OBJ.format(name="horse", x0=x0, y0=y0, x1=x1, y1=y1))
    )
    with pytest.raises(DataError, match=rf"b\.xml: object 'horse': <bndbox> box .*{problem}"):
        make_voc(voc).load_weak("b")


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"# only a comment\n", "is empty"),
        (bytes(range(256)) * 4, "not a text"),
        (b"\xff\xfe\x00r\x00u\x00n", "not a text"),
        (b"- a\n- list\n", "expected a mapping"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"c\.yaml: .*{message}"):
        load_config(path)

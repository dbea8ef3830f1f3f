"""Bring your own data: COCO instances JSON, VOC trees with any classes, weak labels without
GT; results out with ``export`` and ``predict``."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.config import config_from_dict
from pipeline.datasets import build_dataset, read_image
from stages.base import IGNORE, DataError

from .conftest import TINY_TRAINING

HORSE_IDS = ["horse001", "horse002", "horse003", "horse004"]
# The runs to the CRF work at this longer side (horse001 is 800x590): the same path, a quarter of the pixels.
SMALL_SIDE = 400


def horse_mask(horses: Path, image_id: str) -> np.ndarray:
    mask = np.asarray(Image.open(horses / "figure_ground" / f"{image_id}.jpg").convert("L")) >= 128
    image = Image.open(horses / "rgb" / f"{image_id}.jpg")
    if image.size != mask.shape[::-1]:
        mask = cv2.resize(mask.astype(np.uint8), image.size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask


def coco_tree(tmp_path: Path, horses: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A COCO folder over 4 horse images (symlinked): horse 1 as compressed RLE, horse 2 as
    polygons, horse 3 with an extra crowd region, horse 4 with a box only; plus annotations
    with an unknown category and an empty segmentation. Category ids are not contiguous."""
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    images, anns, masks = [], [], {}
    for k, image_id in enumerate(HORSE_IDS):
        os.symlink(horses / "rgb" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg")
        w, h = Image.open(horses / "rgb" / f"{image_id}.jpg").size
        images.append({"id": 100 + k, "file_name": f"{image_id}.jpg", "width": w, "height": h})
        mask = horse_mask(horses, image_id)
        masks[image_id] = mask
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        box = [float(v) for v in mask_utils.toBbox(rle)]
        if k == 1:
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            seg = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
        elif k == 3:
            seg = []
        else:
            seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        anns.append(
            {
                "id": 10 * k + 1,
                "image_id": 100 + k,
                "category_id": 17,
                "bbox": box,
                "segmentation": seg,
                "iscrowd": 0,
                "area": float(mask.sum()),
            }
        )
        if k == 2:
            crowd = np.zeros_like(mask)
            crowd[:10, :10] = True
            crowd_rle = mask_utils.encode(np.asfortranarray(crowd.astype(np.uint8)))
            anns.append(
                {
                    "id": 10 * k + 2,
                    "image_id": 100 + k,
                    "category_id": 17,
                    "bbox": [0, 0, 10, 10],
                    "segmentation": {"size": crowd_rle["size"], "counts": crowd_rle["counts"].decode("ascii")},
                    "iscrowd": 1,
                }
            )
    anns.append({"id": 99, "image_id": 100, "category_id": 5, "bbox": [1, 1, 5, 5], "segmentation": [], "iscrowd": 0})
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 17, "name": "horse"}, {"id": 3, "name": "zebra"}],
    }
    (root / "train.json").write_text(json.dumps(data))
    return root, masks


def coco_config(root: Path, tmp_path: Path, **extra):
    return config_from_dict(
        {
            "run": "c",
            "output_root": str(tmp_path / "artifacts"),
            "labels": "box",
            "engine": "local",
            "workers": 1,
            "dataset": {"kind": "coco", "root": str(root), "train_json": "train.json", **extra},
            **TINY_TRAINING,
            "cam": {"enabled": False},
        },
        "<test>",
    )


def test_coco_json_round_trips_boxes_masks_and_categories(horses, tmp_path, caplog):
    root, masks = coco_tree(tmp_path, horses)
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        data = build_dataset(coco_config(root, tmp_path))
    # category ids 3 and 17 -> classes 1 and 2, in id order
    assert data.class_names == ["background", "zebra", "horse"]
    assert data.ids("train") == HORSE_IDS and data.ids("val") == []
    assert any("annotation 99 skipped: unknown category id 5" in r.message for r in caplog.records)
    assert any("annotation 31" in r.message and "no segmentation" in r.message for r in caplog.records)
    for image_id in HORSE_IDS:
        mask = masks[image_id]
        weak = data.load_weak(image_id)
        ys, xs = np.nonzero(mask)
        assert [(b.x0, b.y0, b.x1, b.y1, b.cls) for b in weak.boxes] == [
            (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 2)
        ]
        assert weak.tags == [2]
        assert read_image(Path(data.image_path(image_id))).shape[:2] == mask.shape
    gt = data.load_gt("horse001")
    assert np.array_equal(gt, mask_to_class(masks["horse001"]))  # RLE: exact
    gt = data.load_gt("horse002")
    inter = ((gt == 2) & masks["horse002"]).sum()
    # polygons trace the outer pixel centres (no holes, half a pixel in): close, not exact
    assert inter / ((gt == 2) | masks["horse002"]).sum() > 0.9 and inter / masks["horse002"].sum() > 0.9
    gt = data.load_gt("horse003")
    assert (gt[:10, :10][~masks["horse003"][:10, :10]] == IGNORE).all()  # crowd region
    gt = data.load_gt("horse004")  # a box without a mask: its pixels are unknown
    b = data.load_weak("horse004").boxes[0]
    assert (gt[b.y0 : b.y1, b.x0 : b.x1] == IGNORE).all() and (gt == IGNORE).sum() == (b.y1 - b.y0) * (b.x1 - b.x0)
    inst = data.load_instances("horse001")
    assert set(np.unique(inst)) == {0, 1}


def mask_to_class(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 2, 0).astype(np.uint8)


def test_coco_errors_name_the_file_and_the_annotation(horses, tmp_path, caplog):
    root, _ = coco_tree(tmp_path, horses)
    (root / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json.*malformed JSON"):
        build_dataset(coco_config(root, tmp_path, train_json="bad.json"))
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        data = build_dataset(coco_config(root, tmp_path, val_json="bad.json"))  # train goes on
    assert data.ids("val") == [] and len(data.ids("train")) == 4
    assert any("bad.json" in r.message and "malformed JSON" in r.message for r in caplog.records)
    data_json = json.loads((root / "train.json").read_text())
    data_json["annotations"][0]["bbox"] = [-20.0, -10.0, 60.0, 40.0]  # partly outside the image
    data_json["annotations"].append(
        {"id": 77, "image_id": 101, "category_id": 17, "bbox": [5000, 5000, 10, 10], "iscrowd": 0}
    )  # wholly outside
    (root / "edited.json").write_text(json.dumps(data_json))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        data = build_dataset(coco_config(root, tmp_path, train_json="edited.json"))
        assert [(b.x0, b.y0, b.x1, b.y1) for b in data.load_weak("horse001").boxes] == [(0, 0, 40, 30)]
        assert len(data.load_weak("horse002").boxes) == 1
    said = [r.message for r in caplog.records]
    assert any("annotation 1 (horse001.jpg)" in m and "clipped" in m for m in said)
    assert any("annotation 77 (horse002.jpg)" in m and "dropped" in m for m in said)
    (root / "other.json").write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(DataError, match="other.json.*categories differ"):
        build_dataset(coco_config(root, tmp_path, val_json="other.json"))


def test_boxes_without_masks_run_to_crf_without_scores(horses, tmp_path):
    from pipeline.runner import make_run, run_local

    root = tmp_path / "mine"
    (root / "photos").mkdir(parents=True)
    boxes = {}
    for image_id in HORSE_IDS:
        os.symlink(horses / "rgb" / f"{image_id}.jpg", root / "photos" / f"{image_id}.jpg")
        ys, xs = np.nonzero(horse_mask(horses, image_id))
        boxes[image_id] = [[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, 1]]
    (root / "weak").mkdir()
    (root / "weak" / "boxes.json").write_text(json.dumps(boxes))
    config = config_from_dict(
        {
            "run": "mine",
            "output_root": str(tmp_path / "artifacts"),
            "labels": "box",
            "engine": "local",
            "workers": 1,
            "dataset": {
                "kind": "masks",
                "root": str(root),
                "images": "photos",
                "threshold": None,
                "class_names": ["background", "horse"],
                "weak_dir": str(root / "weak"),
                "val_fraction": 0.0,
                "max_side": SMALL_SIDE,
            },
            **TINY_TRAINING,
            "cam": {"enabled": False},
        },
        "<test>",
    )
    run = make_run(config)
    assert run.dataset.ids("train") == HORSE_IDS and run.dataset.load_gt("horse001") is None
    assert run.dataset.load_weak("horse002").tags == [1]  # no tags.json: the boxes' classes
    run_local(run, ["box_seeds", "seeds", "affinity_train", "graph", "random_walk", "a2gnn", "crf"])
    manifest = run.store("crf").read_manifest()
    assert manifest["status"] == "complete" and manifest["counts"] == {"total": 4, "done": 4, "failed": 0}
    assert "miou" not in manifest.get("metrics", {})
    for image_id in HORSE_IDS:
        labels = run.store("crf").read_label(image_id)
        h, w = read_image(root / "photos" / f"{image_id}.jpg").shape[:2]
        assert labels.shape == run.dataset.load_image(image_id).shape[:2]
        assert max(labels.shape) == min(max(h, w), SMALL_SIDE)
        assert set(np.unique(labels)) <= {0, 1}


def voc_tree(tmp_path: Path, horses: Path) -> Path:
    """A VOC-style folder with its own class names, .png images, GT PNGs and no ImageSets."""
    root = tmp_path / "myvoc"
    for d in ("JPEGImages", "Annotations", "SegmentationClass"):
        (root / d).mkdir(parents=True)
    for image_id in HORSE_IDS:
        image = Image.open(horses / "rgb" / f"{image_id}.jpg").convert("RGB")
        image.save(root / "JPEGImages" / f"{image_id}.png")
        mask = horse_mask(horses, image_id)
        Image.fromarray(np.where(mask, 1, 0).astype(np.uint8)).save(root / "SegmentationClass" / f"{image_id}.png")
        ys, xs = np.nonzero(mask)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><object><name>Horse</name><bndbox><xmin>{xs.min() + 1}</xmin><ymin>{ys.min() + 1}</ymin>"
            f"<xmax>{xs.max() + 1}</xmax><ymax>{ys.max() + 1}</ymax></bndbox></object></annotation>"
        )
    return root


def test_voc_tree_with_own_classes_and_png_images_runs_to_crf(horses, tmp_path):
    from pipeline.runner import make_run, run_local

    root = voc_tree(tmp_path, horses)
    config = config_from_dict(
        {
            "run": "v",
            "output_root": str(tmp_path / "artifacts"),
            "labels": "box",
            "engine": "local",
            "workers": 1,
            "dataset": {
                "kind": "voc",
                "root": str(root),
                "class_names": ["background", "Horse"],
                "max_side": SMALL_SIDE,
            },
            **TINY_TRAINING,
            "cam": {"enabled": False},
        },
        "<test>",
    )
    run = make_run(config)
    assert run.dataset.ids("train") == HORSE_IDS and run.dataset.ids("val") == []
    mask = horse_mask(horses, "horse003")
    ys, xs = np.nonzero(mask)
    assert [(b.x0, b.y0, b.x1, b.y1, b.cls) for b in run.dataset.load_weak("horse003").boxes] == [
        (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 1)
    ]
    run_local(run, ["box_seeds", "seeds", "affinity_train", "graph", "random_walk", "a2gnn", "crf"])
    manifest = run.store("crf").read_manifest()
    assert manifest["counts"] == {"total": 4, "done": 4, "failed": 0}
    assert manifest["metrics"]["miou"] > 0.5  # scored against the GT PNGs


def test_voc_unknown_class_names_the_file_and_the_classes(horses, tmp_path):
    root = voc_tree(tmp_path, horses)
    (root / "Annotations" / "horse002.xml").write_text(
        "<annotation><object><name>zebra</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object></annotation>"
    )
    config = config_from_dict(
        {
            "run": "v",
            "output_root": str(tmp_path / "a"),
            "dataset": {"kind": "voc", "root": str(root), "class_names": ["background", "Horse"]},
        },
        "<test>",
    )
    data = build_dataset(config)
    with pytest.raises(
        DataError,
        match=r"horse002\.xml: unknown class name 'zebra' \(dataset.class_names: "
        r"background, Horse\)",
    ):
        data.load_weak("horse002")
    assert data.load_weak("horse001").boxes[0].cls == 1


@pytest.fixture(scope="module")
def small_box_run(tmp_path_factory):
    """A tiny demo box run up to the instance masks (demo images at a 2x working size, so
    export has to bring the labels back to the images' own size)."""
    from pipeline.runner import make_run, run_local

    from .conftest import demo_config

    run = make_run(demo_config(tmp_path_factory.mktemp("export"), labels="box", dataset__min_side=240))
    run_local(
        run,
        [
            n
            for n in run.names
            if n
            in (
                "box_seeds",
                "cam_train",
                "cam",
                "seeds",
                "affinity_train",
                "graph",
                "random_walk",
                "a2gnn",
                "crf",
                "instances",
                "final_train",
            )
        ],
    )
    return run


def test_export_png_reads_back_equal_to_the_items_at_the_images_own_size(small_box_run, tmp_path):
    from pipeline.export import export
    from pipeline.store import read_label_png

    run = small_box_run
    summary = export(run, "crf", tmp_path / "out", "png")
    ids = run.ids("crf")
    assert summary["images"] == len(ids) == 6
    assert (tmp_path / "out" / "splits" / "train.txt").read_text().split() == ids
    meta = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert meta["classes"] == run.dataset.class_names and meta["fingerprint"] == run.store("crf").fingerprint
    for image_id in ids:
        item = run.store("crf").read_label(image_id)
        assert item.shape == (240, 320)  # the working size
        exported = read_label_png(tmp_path / "out" / "ann_dir" / "train" / f"{image_id}.png")
        assert exported.shape == (120, 160)  # the demo image's own size
        np.testing.assert_array_equal(exported, item[::2, ::2])  # nearest, exactly 2x
        assert Image.open(tmp_path / "out" / "ann_dir" / "train" / f"{image_id}.png").mode == "P"
    # soft maps, when asked for
    export(run, "a2gnn", tmp_path / "soft", "png", soft=True)
    with np.load(tmp_path / "soft" / "soft" / "train" / f"{ids[0]}.npz") as z:
        probs, class_ids = z["probs"], z["class_ids"]
    assert probs.shape[1:] == (120, 160) and probs.shape[0] == len(class_ids)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)


def test_export_coco_loads_in_pycocotools_with_the_same_masks(small_box_run, tmp_path):
    from pycocotools.coco import COCO

    from pipeline.export import export

    run = small_box_run
    for stage in ("crf", "instances"):
        summary = export(run, stage, tmp_path / stage, "coco")
        coco_api = COCO(summary["coco_json"])
        assert sorted(c["name"] for c in coco_api.loadCats(coco_api.getCatIds())) == sorted(run.dataset.class_names[1:])
        assert len(coco_api.getImgIds()) == 6 and summary["annotations"] > 0
        for img in coco_api.loadImgs(coco_api.getImgIds()):
            if stage == "crf":
                labels = run.store("crf").read_label(img["wsss_id"])[::2, ::2]
            else:
                labels = run.store("instances").read_label(img["wsss_id"])[::2, ::2]
            for ann in coco_api.loadAnns(coco_api.getAnnIds(imgIds=img["id"])):
                mask = coco_api.annToMask(ann).astype(bool)
                if stage == "crf":
                    np.testing.assert_array_equal(mask, labels == ann["category_id"])
                else:
                    assert 0 < ann["score"] <= 1 and mask.sum() > 0
                    ids, counts = np.unique(labels[mask], return_counts=True)
                    assert len(ids) == 1 and ids[0] > 0  # one whole instance of the stored map


def test_export_refuses_what_it_cannot_write(small_box_run, tmp_path):
    from pipeline.export import ExportError, export

    with pytest.raises(ExportError, match="writes model outputs"):
        export(small_box_run, "affinity_train", tmp_path, "png")
    with pytest.raises(ExportError, match="unknown export format 'tiff'"):
        export(small_box_run, "crf", tmp_path, "tiff")


def test_predict_writes_one_png_per_image_at_its_own_size(small_box_run, tmp_path):
    from pipeline.predict import predict
    from pipeline.store import read_label_png

    folder = tmp_path / "new"
    folder.mkdir()
    sizes = {"a": (90, 130), "b": (121, 161), "c": (200, 150)}
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    summary = predict(small_box_run, folder, tmp_path / "out")
    assert summary["written"] == 3 and list(summary["failed"]) == ["broken.jpg"]
    for name, shape in sizes.items():
        labels = read_label_png(tmp_path / "out" / f"{name}.png")
        assert labels.shape == shape and labels.max() < small_box_run.dataset.num_classes


def test_predict_without_a_trained_model_says_what_to_run(tmp_path):
    from pipeline.predict import PredictError, predict
    from pipeline.runner import make_run

    from .conftest import demo_config

    with pytest.raises(PredictError, match="no trained final_train model.*--until final_train"):
        predict(make_run(demo_config(tmp_path)), tmp_path, tmp_path / "out")


@pytest.mark.parametrize("form", ["project", "coco"])
def test_coco_points_from_either_points_file(horses, tmp_path, form):
    root, _ = coco_tree(tmp_path, horses)
    if form == "project":
        points = {"horse001": [{"x": 100, "y": 80, "cls": "horse"}, {"x": 5, "y": 5, "cls": 0}]}
    else:
        points = {
            "annotations": [
                {"id": 1, "image_id": 100, "category_id": 17, "point": [100.4, 79.6]},
                {"id": 2, "image_id": 100, "category_id": 3, "point": [5, 5]},
                {"id": 3, "image_id": 555, "category_id": 17, "point": [1, 1]},
            ]
        }
    (root / "points.json").write_text(json.dumps(points))
    config = config_from_dict(
        {
            "run": "p",
            "output_root": str(tmp_path / "a"),
            "labels": "point",
            "dataset": {"kind": "coco", "root": str(root), "train_json": "train.json", "points": "points.json"},
        },
        "<test>",
    )
    data = build_dataset(config)
    got = [(p.x, p.y, p.cls) for p in data.load_weak("horse001").points]
    assert got == ([(100, 80, 2), (5, 5, 0)] if form == "project" else [(100, 80, 2), (5, 5, 1)])
    assert data.load_weak("horse002").points == [] and data.load_weak("horse001").boxes == []  # only what points need


def test_training_stages_draw_their_loss_curve(small_box_run):
    from stages.training import LOSS_CURVE, loss_curve_png

    for stage in ("affinity_train", "final_train"):
        path = small_box_run.store(stage).dir / LOSS_CURVE
        with Image.open(path) as img:
            assert img.size == (480, 300) and img.mode == "RGB"
        assert LOSS_CURVE in small_box_run.store(stage).read_manifest()["files"]
    # the curve is drawn: a falling history leaves its line's colour in the plot
    pixels = np.asarray(Image.open(io.BytesIO(loss_curve_png([3.0, 2.0, 1.5, 1.0], "t"))))
    assert ((pixels == (31, 119, 180)).all(-1)).sum() > 100


def test_export_size_is_the_image_files_not_the_masks(horses):
    """The horses' masks are larger than their photos (``resize: image_to_mask``): stages work at
    the mask's size, export writes at the photo's."""
    config = config_from_dict(
        {
            "dataset": {
                "kind": "masks",
                "root": str(horses),
                "images": "rgb",
                "masks": "figure_ground",
                "resize": "image_to_mask",
            }
        },
        "<test>",
    )
    data = build_dataset(config)
    assert data.file_size("horse002") == Image.open(horses / "rgb" / "horse002.jpg").size == (250, 197)
    assert data.load_image("horse002").shape[:2] == (212, 269)  # the mask's size

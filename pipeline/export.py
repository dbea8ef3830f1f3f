"""``wsss export``: a stage's outputs out of the artifact store, at each image's own size.

``png`` (an mmsegmentation-ready folder)::

    OUT/ann_dir/<split>/<id>.png    palette PNG: pixel = class id, 255 = unknown
    OUT/img_dir/<split>/<id>.<ext>  a link to the image (mmseg's layout)
    OUT/splits/<split>.txt          the image ids, one a line
    OUT/classes.json                class names, palette, stage, fingerprint, config
    OUT/soft/<split>/<id>.npz       with --soft, for soft stages: ``probs`` float16 (n, H, W)
                                    and the ``class_ids`` they cover

Either way, where the run's label stages were compared with the labels they started from,
``OUT/review.csv``: every image, most disagreed first (:func:`pipeline.scoring.review`), with
the columns ``rank, image, image_id, disagreement, stage, against`` and one agreement column per
(stage, reference) pair; ``image`` is the image's path, the column a labelling tool imports.

``coco``: ``OUT/<stage>_<split>.json``, COCO instances format with compressed RLE masks
(pycocotools): one annotation per (image, class) for semantic stages, one per instance for
``instances`` (with its ``score``); category ids are the dataset's own where it came from a
COCO file, else the class ids. ``--soft`` adds the npz files as above.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stages.base import IGNORE
from stages.instances import objects_of, rle_encode

from .scoring import manifests, review
from .store import encode_label_png, voc_palette


class ExportError(ValueError):
    """The stage cannot be exported (nothing computed, a model, an unknown format)."""


def own_size(dataset, image_id: str) -> tuple[int, int]:
    """(h, w) of the image file as the user has it (stages may work at a resized working
    size, and a ``masks`` dataset at its masks' size)."""
    w, h = dataset.file_size(image_id)
    return h, w


def _resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if labels.shape == shape:
        return labels
    return cv2.resize(labels, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def _resize_soft(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if probs.shape[1:] == shape:
        return probs
    out = np.stack(
        [cv2.resize(p.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR) for p in probs]
    )
    return (out / np.maximum(out.sum(0, keepdims=True), 1e-6)).astype(np.float16)


def _category_ids(dataset) -> list[int]:
    """COCO category id of each class (index 0, background, unused)."""
    index = getattr(dataset, "coco_categories", None)
    return [0, *index()] if index is not None else list(range(dataset.num_classes))


def export(run, stage: str, out: Path, fmt: str = "png", soft: bool = False) -> dict[str, Any]:
    """Write ``stage``'s outputs for the current config to ``out``; returns a summary."""
    if fmt not in ("png", "coco"):
        raise ExportError(f"unknown export format '{fmt}' (png, coco)")
    spec = run.spec(stage)
    if spec.output not in ("label", "soft", "instances"):
        raise ExportError(
            f"stage '{stage}' writes {spec.output} outputs, not label maps; export a label stage "
            "(crf, a2gnn, seeds, ...)"
        )
    store, dataset, split = run.store(stage), run.dataset, spec.split
    ids = [i for i in run.ids(stage) if store.has(i)]
    if not ids:
        raise ExportError(f"stage '{stage}' has no outputs for this config ({store.dir}); run it first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {
        "stage": stage,
        "fingerprint": store.fingerprint,
        "split": split,
        "images": len(ids),
        "format": fmt,
        "out": str(out),
    }
    if soft and spec.output == "soft":
        soft_dir = out / "soft" / split
        soft_dir.mkdir(parents=True, exist_ok=True)
        for image_id in ids:
            probs, class_ids = store.read_soft(image_id)
            np.savez_compressed(
                soft_dir / f"{image_id}.npz",
                probs=_resize_soft(probs, own_size(dataset, image_id)),
                class_ids=class_ids,
            )
        written["soft"] = str(soft_dir)
    if fmt == "png":
        written.update(_png(run, stage, store, ids, out, split))
    else:
        written.update(_coco(run, stage, store, ids, out, split))
    rows = review(run, manifests(run))
    if rows:
        written["review"] = str(write_review(rows, run.dataset, out / "review.csv"))
    return written


def write_review(rows: list[dict[str, Any]], dataset, path: Path) -> Path:
    """``rows`` of :func:`pipeline.scoring.review` as a CSV (see the module docstring)."""
    pairs = sorted({p for r in rows for p in r["agreements"]})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "image", "image_id", "disagreement", "stage", "against", *pairs])
        for rank, r in enumerate(rows, 1):
            cells = [r["agreements"].get(p, "") for p in pairs]
            w.writerow(
                [rank, dataset.image_path(r["image"]), r["image"], r["disagreement"], r["stage"], r["against"], *cells]
            )
    return path


def _png(run, stage: str, store, ids: list[str], out: Path, split: str) -> dict[str, Any]:
    dataset = run.dataset
    ann, img = out / "ann_dir" / split, out / "img_dir" / split
    for d in (ann, img, out / "splits"):
        d.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        labels = _resize_labels(store.labels_of(image_id), own_size(dataset, image_id))
        (ann / f"{image_id}.png").write_bytes(encode_label_png(labels))
        source = Path(dataset.image_path(image_id))
        link = img / f"{image_id}{source.suffix}"
        if source.is_file() and not link.exists():
            os.symlink(source.resolve(), link)
    (out / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    palette = np.array(voc_palette(), np.uint8).reshape(256, 3)
    meta = {
        "classes": dataset.class_names,
        "palette": palette[: dataset.num_classes].tolist(),
        "ignore_index": IGNORE,
        "stage": stage,
        "fingerprint": store.fingerprint,
        "run": run.config.run,
    }
    (out / "classes.json").write_text(json.dumps(meta, indent=1))
    return {"labels": str(ann), "split_list": str(out / "splits" / f"{split}.txt")}


def _coco(run, stage: str, store, ids: list[str], out: Path, split: str) -> dict[str, Any]:
    dataset, spec = run.dataset, run.spec(stage)
    category = _category_ids(dataset)
    images, annotations = [], []
    for n, image_id in enumerate(ids, 1):
        h, w = own_size(dataset, image_id)
        images.append(
            {
                "id": n,
                "file_name": Path(dataset.image_path(image_id)).name,
                "wsss_id": image_id,
                "height": h,
                "width": w,
            }
        )
        if spec.output == "instances":
            inst = store.read_label(image_id)
            found = objects_of(inst, dataset.load_weak(image_id).boxes)
            objects = [
                (box.cls, _resize_labels(mask.astype(np.uint8), (h, w)).astype(bool), round(score, 4))
                for box, mask, score in found
            ]
        else:
            labels = _resize_labels(store.labels_of(image_id), (h, w))
            objects = [(int(c), labels == c, None) for c in np.unique(labels) if c not in (0, IGNORE)]
        for cls, mask, score in objects:
            if not mask.any():
                continue
            rle = rle_encode(mask)
            ys, xs = np.nonzero(mask)
            entry = {
                "id": len(annotations) + 1,
                "image_id": n,
                "category_id": category[cls],
                "segmentation": rle,
                "area": int(mask.sum()),
                "iscrowd": 0,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            }
            if score is not None:
                entry["score"] = score
            annotations.append(entry)
    categories = [{"id": category[c], "name": dataset.class_names[c]} for c in range(1, dataset.num_classes)]
    path = out / f"{stage}_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {"coco_json": str(path), "annotations": len(annotations)}

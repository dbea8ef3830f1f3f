"""``instances``: box-supervised instance masks from the pseudo-labels (thesis Sect. 3.4).

"Given a bounding box, we directly assign pixels which locate inside a bounding box and
share the same class with it to one instance." Where boxes overlap, a pixel goes to the
smallest box that claims it (the more specific object). Per image: an instance-id PNG
(0 background, k = the k-th box of the image); a box whose class has no pixel inside it
yields no instance.

Each instance's score (for AP, and for a detector trained on them) is the IoU of the
mask's tight box with its given box: a mask that fills its box tightly is the one the MP
loss's tightness prior expects. Once every image is done the stage writes
``instances.json`` (COCO format, compressed RLE masks, ``score`` per annotation) and,
where GT exists, scores mask AP^r at ``iou_thresholds`` (Table 3.2's metric).

Training Mask R-CNN on these masks needs torchvision's compiled RoIAlign/NMS; see
:func:`models.tvcompat.require_compiled_ops`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import numpy as np
from pycocotools import mask as mask_utils
from pydantic import Field

from models.boxes import instance_map, instance_score
from models.metrics import mask_ap, match_instances

from .base import STAGES, Box, DataError, Output, StageContext, StageResult, StageSpec, run_items
from .sections import Section


# --------------------------------------------------------------------------- config section
class InstancesConfig(Section):
    """Box-supervised instance masks (Sect. 3.4): in each box, the pixels of the box's class
    in the ``crf`` labels become that instance. Scored with mask AP at ``iou_thresholds``."""

    iou_thresholds: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = [0.5, 0.7, 0.75]


VERSION = "1"


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """A bool (H, W) mask as COCO compressed RLE (pycocotools), ``counts`` a JSON-ready string."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def objects_of(instances: np.ndarray, boxes: list[Box]) -> list[tuple[Box, np.ndarray, float]]:
    """(box, mask, score) of every non-empty instance of an image."""
    out = []
    for k, box in enumerate(boxes):
        mask = instances == k + 1
        if mask.any():
            out.append((box, mask, instance_score(mask, box)))
    return out


def _instances_of_image(ctx: StageContext, image_id: str) -> dict:
    labels = ctx.input().read_label(image_id)
    boxes = ctx.dataset.load_weak(image_id).boxes
    if not boxes:
        raise DataError(ctx.dataset.image_path(image_id), "no boxes: instance masks need box labels")
    ctx.out.write_label(image_id, instance_map(labels, boxes))
    return {}


def run(ctx: StageContext) -> StageResult:
    return run_items(ctx, _instances_of_image, desc="instance masks")


def report(ctx: StageContext) -> dict[str, Any]:
    """Write ``instances.json`` (COCO) and score mask AP^r against GT objects."""
    images, annotations, records = [], [], []
    gt_counts: dict[int, int] = {}
    scored = 0
    for n, image_id in enumerate(sorted(i for i in ctx.ids if ctx.out.has(i))):
        instances = ctx.out.read_label(image_id)
        h, w = instances.shape
        images.append(
            {"id": n, "file_name": ctx.dataset.image_path(image_id), "wsss_id": image_id, "height": h, "width": w}
        )
        found = objects_of(instances, ctx.dataset.load_weak(image_id).boxes)
        for box, mask, score in found:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": n,
                    "category_id": box.cls,
                    "segmentation": rle_encode(mask),
                    "area": int(mask.sum()),
                    "bbox": [box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0],
                    "score": round(score, 4),
                    "iscrowd": 0,
                }
            )
        gts = ctx.dataset.gt_objects(image_id)
        if gts is None:
            continue
        scored += 1
        for cls, _ in gts:
            gt_counts[cls] = gt_counts.get(cls, 0) + 1
        records += match_instances([(b.cls, s, m) for b, m, s in found], gts, ctx.section.iou_thresholds)
    names = ctx.dataset.class_names
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": names[c]} for c in range(1, len(names))],
    }
    path = ctx.out.write_file("instances.json", json.dumps(coco).encode())
    out: dict[str, Any] = {"instances": len(annotations), "coco_json": str(path)}
    if scored:
        out.update(mask_ap(records, gt_counts, ctx.section.iou_thresholds, names), scored_images=scored)
    return out


SPEC = STAGES.register(
    StageSpec(
        name="instances",
        section=InstancesConfig,
        run=run,
        inputs=lambda config: ["crf"],
        labels=("box",),
        output=Output.INSTANCES,
        version=VERSION,
        report=report,
        reads=("dataset", "weak"),
    )
)

"""COCO instances JSON in and out; every mask goes through ``pycocotools`` (polygons, RLE).

Reading keeps a compact per-image index (file name, size, annotations) built once per
process from the JSON; categories with any ids map to contiguous class ids 1..K in the
order of their ids (0 is background). Annotations that cannot be used (unknown category,
no box, empty segmentation) are reported once each, with the file and the annotation id,
and left out; the rest of the image and the run go on.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from stages.base import IGNORE, DataError, safe_name

from .weak import box_problem

log = logging.getLogger("wsss.data")


@dataclass(frozen=True)
class Annotation:
    """One usable object: its class id, box ``[x, y, w, h]`` (COCO, float pixels), the
    segmentation as COCO stores it (None: box only) and ``iscrowd``."""

    ann_id: int
    cls: int
    bbox: tuple[float, float, float, float]
    segmentation: Any
    crowd: bool


@dataclass
class CocoImage:
    file_name: str
    width: int
    height: int
    coco_id: int = -1
    annotations: list[Annotation] = field(default_factory=list)
    unsegmented: bool = False  # an object without a mask: the GT is unknown around it
    problem: str | None = None  # why the image cannot be used (read as a per-image failure)


@dataclass
class CocoIndex:
    """What one instances JSON says, per image id (the file name's stem)."""

    categories: list[tuple[int, str]]  # (COCO category id, name), sorted by id
    images: dict[str, CocoImage]

    @property
    def class_names(self) -> list[str]:
        return ["background"] + [name for _, name in self.categories]

    def has_masks(self) -> bool:
        return any(a.segmentation is not None for im in self.images.values() for a in im.annotations)


def _empty(seg: Any) -> bool:
    if seg is None:
        return True
    if isinstance(seg, list):
        return not any(len(poly) >= 6 for poly in seg)
    return not (isinstance(seg, dict) and "counts" in seg and "size" in seg)


def parse(path: Path) -> CocoIndex:
    """The index of a COCO instances JSON; a file that does not parse or lacks ``images`` /
    ``categories`` raises :class:`DataError`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(path, "COCO JSON not found") from None
    except ValueError as err:
        raise DataError(path, f"malformed JSON ({err})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("categories"), list)
    ):
        raise DataError(path, "not a COCO instances file (needs 'images' and 'categories' lists)")
    try:
        categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError):
        raise DataError(path, "a category lacks an integer 'id' or a 'name'") from None
    if not categories:
        raise DataError(path, "no categories")
    class_of = {cid: k + 1 for k, (cid, _) in enumerate(categories)}
    images: dict[str, CocoImage] = {}
    by_coco_id: dict[int, CocoImage] = {}
    unsegmented: list[tuple[Any, str]] = []
    for entry in data["images"]:
        try:
            stem = safe_name(Path(str(entry["file_name"])).stem, "image id")
            coco_id = int(entry["id"])
            image = CocoImage(str(entry["file_name"]), int(entry["width"]), int(entry["height"]), coco_id)
        except (KeyError, TypeError, ValueError) as err:
            log.warning(
                "%s: image entry %s skipped: %s",
                path,
                entry.get("id", "?") if isinstance(entry, dict) else "?",
                err if isinstance(err, ValueError) else f"missing or bad field {err}",
            )
            continue
        if stem in images:
            raise DataError(path, f"two images have the file stem '{stem}' (ids must be unique)")
        if coco_id in by_coco_id:
            raise DataError(
                path,
                f"images '{by_coco_id[coco_id].file_name}' and '{image.file_name}' share the id {coco_id} "
                "(each image needs its own id, or its annotations go to the other)",
            )
        if leaves_folder(image.file_name):
            image.problem = (
                f"image {coco_id}: file_name '{image.file_name}' leaves the image folder (absolute or '..'); refused"
            )
        images[stem] = by_coco_id[coco_id] = image
    for ann in data.get("annotations", []):
        ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
        image = by_coco_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if image is None:
            log.warning(
                "%s: annotation %s skipped: no image with id %s",
                path,
                ann_id,
                ann.get("image_id") if isinstance(ann, dict) else "?",
            )
            continue
        cls = class_of.get(ann.get("category_id"))
        if cls is None:
            log.warning("%s: annotation %s skipped: unknown category id %s", path, ann_id, ann.get("category_id"))
            continue
        bbox = ann.get("bbox")
        if bbox is not None and (problem := box_problem(bbox if isinstance(bbox, list) else [bbox], xywh=True)):
            image.problem = image.problem or f"annotation {ann_id} ({image.file_name}): {problem}"
            continue
        x, y, w, h = (float(v) for v in bbox) if bbox is not None else (0.0, 0.0, 0.0, 0.0)
        seg = ann.get("segmentation")
        seg = None if _empty(seg) else seg
        crowd = bool(ann.get("iscrowd", 0))
        if w <= 0 or h <= 0:
            if seg is None:
                log.warning("%s: annotation %s skipped: no box and no segmentation", path, ann_id)
                continue
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle_of(seg, image.height, image.width)))
        if seg is None and not crowd:
            image.unsegmented = True
            unsegmented.append((ann_id, image.file_name))
        image.annotations.append(
            Annotation(int(ann_id) if str(ann_id).lstrip("-").isdigit() else -1, cls, (x, y, w, h), seg, crowd)
        )
    index = CocoIndex(categories, images)
    if index.has_masks():  # a boxes-only file has no GT at all, not one warning per box
        for ann_id, name in unsegmented[:10]:
            log.warning(
                "%s: annotation %s (image %s) has no segmentation: its box is used, its pixels are ignored in the GT",
                path,
                ann_id,
                name,
            )
        if len(unsegmented) > 10:
            log.warning("%s: %d more annotations without a segmentation", path, len(unsegmented) - 10)
    return index


@functools.lru_cache(maxsize=4)
def cached(path: str, mtime_ns: int) -> CocoIndex:
    """:func:`parse`, once per process and file version (worker processes parse lazily)."""
    return parse(Path(path))


def load(path: Path) -> CocoIndex:
    return cached(str(path), Path(path).stat().st_mtime_ns if Path(path).exists() else 0)


def leaves_folder(file_name: str) -> bool:
    """Whether a ``file_name`` points outside the image folder: absolute (POSIX or a Windows
    drive) or with a ``..`` part."""
    parts = file_name.replace("\\", "/").split("/")
    return file_name.startswith(("/", "\\")) or (len(file_name) > 1 and file_name[1] == ":") or ".." in parts


def rle_of(segmentation: Any, height: int, width: int) -> dict:
    """One RLE for a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO segmentation."""
    return mask_utils.decode(rle_of(segmentation, height, width)).astype(bool)


def box_window(bbox: Sequence[float]) -> tuple[int, int, int, int]:
    """COCO ``[x, y, w, h]`` -> the half-open pixel box ``(x0, y0, x1, y1)`` that covers it."""
    x, y, w, h = bbox
    return int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h))


def rasterize(image: CocoImage) -> tuple[np.ndarray, np.ndarray]:
    """(semantic GT, instance ids) of one image: objects painted largest first (so small
    objects stay on top), crowd regions and the boxes of objects without a mask 255."""
    h, w = image.height, image.width
    semantic = np.zeros((h, w), np.uint8)
    instance = np.zeros((h, w), np.uint8)
    unknown = np.zeros((h, w), bool)
    objects = []
    for a in image.annotations:
        if a.segmentation is None:
            if not a.crowd:
                x0, y0, x1, y1 = box_window(a.bbox)
                unknown[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
            continue
        mask = decode(a.segmentation, h, w)
        if a.crowd:
            unknown |= mask
        else:
            objects.append((int(mask.sum()), a.cls, mask))
    objects.sort(key=lambda o: -o[0])
    for k, (_, cls, mask) in enumerate(objects, 1):
        semantic[mask] = cls
        instance[mask] = min(k, 254)
    covered = instance > 0
    semantic[unknown & ~covered] = IGNORE
    instance[unknown & ~covered] = IGNORE
    return semantic, instance


def points_by_image(data: Any, index: CocoIndex, path: Path) -> dict[str, list[tuple[float, float, Any]]]:
    """Click points per image id from either form of a points file: the project's
    ``{image id: [{"x", "y", "cls"}]}`` or a COCO-style, keypoint-free file whose
    ``annotations`` carry ``image_id``, ``category_id`` and ``point: [x, y]`` (``cls`` is then
    the COCO category id, returned as ``("category", id)``)."""
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        stems = {im.coco_id: stem for stem, im in index.images.items()}
        out: dict[str, list[tuple[float, float, Any]]] = {}
        for ann in data["annotations"]:
            try:
                stem = stems[ann["image_id"]]
                x, y = (float(v) for v in ann["point"])
                out.setdefault(stem, []).append((x, y, ("category", int(ann["category_id"]))))
            except (KeyError, TypeError, ValueError):
                log.warning(
                    "%s: point annotation %s skipped: needs a known image_id, category_id and point [x, y]",
                    path,
                    ann.get("id", "?") if isinstance(ann, dict) else "?",
                )
        return out
    if not isinstance(data, dict):
        raise DataError(path, "a points file is {image id: [{x, y, cls}]} or COCO-style with 'annotations'")
    return {stem: [(p["x"], p["y"], p["cls"]) for p in entries] for stem, entries in data.items()}

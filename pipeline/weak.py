"""Synthesize weak labels from GT masks (``wsss prepare``), deterministic per seed and image.

- boxes: the tight box of every object (instance id where the dataset has one, else a
  connected component of one class), objects under ``min_object_area`` of the image dropped;
- scribbles: one stroke per object and one in the background that follows the region's
  skeleton: a contiguous part (``scribble_length`` of the skeleton, grown by breadth-first
  search from a random skeleton pixel), thickened so strokes cover about
  ``scribble_coverage`` of each region, and kept strictly inside it;
- points: one interior point per object, drawn among the pixels at least half as deep
  (distance to the border) as the deepest one; optional background points the same way;
- tags: the classes present.
"""

from __future__ import annotations

import math
import zlib
from collections import deque

import cv2
import numpy as np

from stages.base import IGNORE, Box, DataError, Point, WeakLabels


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, image id), not on the order of processing."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode())])


def instances_from_semantic(
    semantic: np.ndarray, instance: np.ndarray | None = None, min_area: int = 1
) -> list[tuple[int, np.ndarray]]:
    """(class, boolean mask) per object: instance ids if given, else 8-connected components."""
    out: list[tuple[int, np.ndarray]] = []
    if instance is not None:
        for inst in np.unique(instance):
            if inst == 0:
                continue
            mask = instance == inst
            values = semantic[mask]
            values = values[(values != 0) & (values != IGNORE)]
            if mask.sum() >= min_area and values.size:
                out.append((int(np.bincount(values).argmax()), mask))
        return out
    for cls in np.unique(semantic):
        if cls == 0 or cls == IGNORE:
            continue
        n, comp = cv2.connectedComponents((semantic == cls).astype(np.uint8), connectivity=8)
        for k in range(1, n):
            mask = comp == k
            if mask.sum() >= min_area:
                out.append((int(cls), mask))
    return out


def box_of(mask: np.ndarray, cls: int) -> Box:
    ys, xs = np.nonzero(mask)
    return Box(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, cls)


def _skeleton_path(region: np.ndarray, length: float, max_pixels: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a contiguous piece (``length`` share, at most ``max_pixels``) of the
    region's skeleton."""
    from skimage.morphology import medial_axis  # scikit-image loads with the first scribble, not with the CLI

    skel = medial_axis(
        region, rng=0
    )  # (fixed tie-breaking) thinning collapses convex shapes (a square -> 3 pixels); the medial axis does not
    ys, xs = np.nonzero(skel)
    if ys.size == 0:
        return skel
    keep = max(1, int(min(round(length * ys.size), max_pixels)))
    start = int(rng.integers(ys.size))
    seen = {(int(ys[start]), int(xs[start]))}
    queue = deque(seen)
    order = []
    h, w = region.shape
    while queue and len(order) < keep:
        y, x = queue.popleft()
        order.append((y, x))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and skel[ny, nx] and (ny, nx) not in seen:
                    seen.add((ny, nx))
                    queue.append((ny, nx))
    path = np.zeros_like(skel)
    oy, ox = zip(*order)
    path[list(oy), list(ox)] = True
    return path


def scribble_in(region: np.ndarray, coverage: float, length: float, rng: np.random.Generator) -> np.ndarray:
    """A stroke along the skeleton of ``region`` covering about ``coverage`` of it."""
    depth = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3)
    inner = depth >= 2.0  # keep strokes off the border
    if not inner.any():
        inner = depth >= depth.max()
    target = coverage * region.sum()
    path = _skeleton_path(inner, length, target, rng)  # a thin stroke never overshoots the target
    if not path.any():
        return path
    # Stroke width from the target area, never wider than half the region's depth, and never
    # a blob bigger than the target when the path is short.
    cap = min(depth.max() / 2.0, np.sqrt(target / np.pi))
    radius = int(np.clip(round((target / path.sum() - 1.0) / 2.0), 0, max(0, int(cap))))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        path = cv2.dilate(path.astype(np.uint8), kernel).astype(bool)
    return path & inner


def interior_point(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    depth = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    ys, xs = np.nonzero(depth >= 0.5 * depth.max())
    k = int(rng.integers(ys.size))
    return int(xs[k]), int(ys[k])


def synthesize(
    semantic: np.ndarray,
    instance: np.ndarray | None,
    rng: np.random.Generator,
    min_object_area: float = 0.001,
    scribble_coverage: float = 0.03,
    scribble_length: float = 0.6,
    scribble_background: bool = True,
    background_points: int = 0,
    source: str = "<mask>",
    strokes: bool = True,
) -> WeakLabels:
    """The weak labels of one image from its GT (``semantic``, optional ``instance`` ids):
    tags and boxes, and with ``strokes`` the scribbles and points (the only ones that draw
    from ``rng``: always together, scribbles first, so either kind is the same whoever asks)."""
    min_area = max(1, int(round(min_object_area * semantic.size)))
    objects = instances_from_semantic(semantic, instance, min_area)
    if not objects:
        raise DataError(source, "mask has no foreground object (empty mask): no weak labels can be made")
    boxes = [box_of(mask, cls) for cls, mask in objects]
    tags = sorted({cls for cls, _ in objects})
    if not strokes:
        return WeakLabels(tags=tags, boxes=boxes, scribbles=None, points=[])
    scribbles = np.full(semantic.shape, IGNORE, np.uint8)
    points: list[Point] = []
    background = semantic == 0
    if scribble_background and background.any():
        scribbles[scribble_in(background, scribble_coverage, scribble_length, rng)] = 0
    for cls, mask in objects:
        scribbles[scribble_in(mask, scribble_coverage, scribble_length, rng)] = cls
        x, y = interior_point(mask, rng)
        points.append(Point(x, y, cls))
    for _ in range(background_points if background.any() else 0):
        x, y = interior_point(background, rng)
        points.append(Point(x, y, 0))
    return WeakLabels(tags=tags, boxes=boxes, scribbles=scribbles, points=points)


def box_problem(values: list[float] | tuple[float, ...], xywh: bool = False) -> str | None:
    """What makes a box unusable, or None: a coordinate that is not a finite number, a
    negative width or height (``xywh``: COCO ``[x, y, w, h]``), or corners ``(x0, y0, x1, y1)``
    in the wrong order. Clipping cannot repair these; dropping the box would silently turn
    its object into background."""
    shown = "[" + ", ".join(str(v) for v in values) + "]"
    try:
        nums = [float(v) for v in values]
    except (TypeError, ValueError):
        return f"box {shown} has a coordinate that is not a number"
    if len(nums) != 4:
        return f"box {shown} needs 4 numbers"
    if not all(math.isfinite(v) for v in nums):
        return f"box {shown} has a coordinate that is not finite"
    if xywh and (nums[2] < 0 or nums[3] < 0):
        return f"box {shown} has a negative width or height"
    if not xywh and (nums[2] < nums[0] or nums[3] < nums[1]):
        return f"box {shown} is inverted (its max corner lies before its min corner)"
    return None


def clip_boxes(boxes: list[Box], width: int, height: int, source: str, log) -> list[Box]:
    """Clip boxes to the image; warn (naming the file) for each clipped or dropped box."""
    out = []
    for b in boxes:
        c = Box(max(0, b.x0), max(0, b.y0), min(width, b.x1), min(height, b.y1), b.cls)
        if c.x1 <= c.x0 or c.y1 <= c.y0:
            log.warning(
                "%s: box %s lies outside the %dx%d image; dropped", source, (b.x0, b.y0, b.x1, b.y1), width, height
            )
            continue
        if c != b:
            log.warning(
                "%s: box %s extends outside the %dx%d image; clipped to %s",
                source,
                (b.x0, b.y0, b.x1, b.y1),
                width,
                height,
                (c.x0, c.y0, c.x1, c.y1),
            )
        out.append(c)
    return out

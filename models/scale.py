"""The object side of an image: the length that pixel-unit settings follow.

A kernel width or margin set in pixels is right for one object size only: the released dense
CRF's bilateral ``sxy`` 50 suits PASCAL VOC's objects, merges CamVid's small ones into the road
and is too narrow to span a horse that fills its frame. A setting given relative to the object
instead is ``value = scale * s`` with the object side

.. math::

    s = \\operatorname{median}_k \\sqrt{|B_k|}

over the image's boxes B_k (at the working size); an image without boxes takes its objects from
a label map (the connected regions of each foreground class), and an image with neither the side
of an object covering a quarter of the frame, ``sqrt(H W) / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .types import IGNORE, Box

MIN_REGION = 16  # pixels: smaller regions of a label map are specks, not objects


def object_side(shape: tuple[int, int], boxes: Sequence[Box] = (), labels: np.ndarray | None = None) -> float:
    """``s`` of the module docstring, in pixels, for an image of ``shape`` (H, W)."""
    areas = [b.area for b in boxes if b.area > 0]
    if not areas and labels is not None:
        areas = _region_areas(labels)
    if not areas:
        return float(np.sqrt(shape[0] * shape[1]) / 2.0)
    return float(np.sqrt(np.median(areas)))


def _region_areas(labels: np.ndarray) -> list[int]:
    """Pixel counts of the 8-connected regions of every foreground class (not 0, not IGNORE)."""
    areas: list[int] = []
    for c in np.unique(labels):
        if c in (0, IGNORE):
            continue
        n, _, stats, _ = cv2.connectedComponentsWithStats((labels == c).astype(np.uint8), connectivity=8)
        areas += [int(a) for a in stats[1:n, cv2.CC_STAT_AREA] if a >= MIN_REGION]
    return areas

"""Sparse label maps from clicks and strokes (shared by ``seeds`` and ``dfr_train``)."""
from __future__ import annotations

import numpy as np

from .base import IGNORE, Point, WeakLabels


def points_map(shape: tuple[int, int], points: list[Point]) -> np.ndarray:
    """A sparse label map with one pixel per point."""
    out = np.full(shape, IGNORE, np.uint8)
    for p in points:
        if 0 <= p.y < shape[0] and 0 <= p.x < shape[1]:
            out[p.y, p.x] = p.cls
    return out


def sparse_labels(weak: WeakLabels, kind: str, shape: tuple[int, int]) -> np.ndarray:
    """The sparse label map of ``kind`` (``scribble``: the strokes; ``point``: one pixel a
    point), IGNORE where unlabelled; a ValueError when scribbles are asked for and absent."""
    if kind == "point":
        return points_map(shape, weak.points)
    if weak.scribbles is None:
        raise ValueError("no scribbles for this image")
    return weak.scribbles

"""Sparse label maps from clicks and strokes (shared by ``seeds`` and the single-stage branches)."""

from __future__ import annotations

import numpy as np

from .base import IGNORE, DataError, Point, StageContext, WeakLabels


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


def training_labels(ctx: StageContext, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """A single-stage branch's supervision of one image: its scribble (or point, the run's
    ``labels``) map, IGNORE where unlabelled; a DataError naming the image when it has none."""
    weak = ctx.dataset.load_weak(image_id)  # a bad file raises its own DataError
    try:
        return sparse_labels(weak, ctx.config.labels, shape)
    except ValueError as err:
        raise DataError(ctx.dataset.image_path(image_id), f"{err} (labels is '{ctx.config.labels}')") from None

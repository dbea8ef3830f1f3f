"""The project's plain data types: the unknown label and the weak labels of one image.

No torch here: the CLI and the stage registry import this without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

IGNORE = 255
"""Label value for unknown / ignored pixels everywhere in the project."""


class Supervision(StrEnum):
    """What a run's weak labels are: object boxes, scribbles, points or image tags (the
    A²GNN pipeline), or a single-stage branch: scribbles (DFR, BLPSeg) or tags (RRM); or the
    few-shot task (``fewshot``: support / query episodes of a masks dataset, SCL)."""

    BOX = "box"
    SCRIBBLE = "scribble"
    POINT = "point"
    IMAGE = "image"
    DFR = "dfr"
    BLPSEG = "blpseg"
    RRM = "rrm"
    FEWSHOT = "fewshot"


PIPELINE = (Supervision.BOX, Supervision.SCRIBBLE, Supervision.POINT, Supervision.IMAGE)
"""The supervisions of the multi-stage (A²GNN) pipeline."""

SINGLE_STAGE = {Supervision.DFR: ("dfr_train", "dfr_eval"), Supervision.BLPSEG: ("blpseg_train", "blpseg_eval"),
                Supervision.RRM: ("rrm_train", "rrm_eval"), Supervision.FEWSHOT: ("fewshot_train", "fewshot_eval")}
"""The single-stage branches: supervision -> (training stage, val inference stage)."""


@dataclass(frozen=True)
class Box:
    """An object box in pixel coordinates, half-open: columns x0..x1-1, rows y0..y1-1."""

    x0: int
    y0: int
    x1: int
    y1: int
    cls: int

    @property
    def area(self) -> int:
        return max(0, self.x1 - self.x0) * max(0, self.y1 - self.y0)


@dataclass(frozen=True)
class Point:
    x: int
    y: int
    cls: int


@dataclass
class WeakLabels:
    """Every kind of cheap label an image may carry; a dataset fills what it has."""

    tags: list[int] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    scribbles: np.ndarray | None = None  # HxW uint8, class id on strokes, IGNORE elsewhere
    points: list[Point] = field(default_factory=list)

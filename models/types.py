"""The project's plain data types: the unknown label and the weak labels of one image.

No torch here: the CLI and the stage registry import this without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE = 255
"""Label value for unknown / ignored pixels everywhere in the project."""


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

"""The ``shapes`` reader: the many-class synthetic images, generated on the fly."""

from __future__ import annotations

from typing import Any

from .. import shapes as shapes_gen
from ..config import ShapesDataset, WeakConfig
from .demo import DemoData


class ShapesData(DemoData):
    """The demo reader's ids and weak labels over :mod:`pipeline.shapes`' images."""

    def __init__(self, cfg: ShapesDataset, weak: WeakConfig, labels: str | None = None) -> None:
        super().__init__(cfg, weak, labels)
        self.name = "shapes"
        self.class_names = shapes_gen.class_names(cfg.num_classes)

    def describe(self) -> dict[str, Any]:
        return {"kind": "shapes", "generator": shapes_gen.VERSION, **self.cfg.model_dump()}

    def _generate(self, split: str, index: int):
        c = self.cfg
        return shapes_gen.generate(c.seed, c.num_classes, split, index, c.height, c.width, c.part_fraction)

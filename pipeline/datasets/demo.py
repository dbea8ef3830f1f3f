"""The ``demo`` reader: the project's synthetic images, generated on the fly."""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.base import DataError, WeakLabels

from .. import demo as demo_gen
from ..config import DemoDataset, WeakConfig
from .base import _Base


class DemoData(_Base):
    """Synthetic images generated on the fly; ids are ``train_0007`` / ``val_0003``."""

    def __init__(self, cfg: DemoDataset, weak: WeakConfig, labels: str | None = None) -> None:
        super().__init__(weak, labels)
        self.cfg = cfg
        self.name = "demo"
        self.class_names = list(demo_gen.CLASS_NAMES)

    def describe(self) -> dict[str, Any]:
        return {"kind": "demo", "generator": demo_gen.VERSION, **self.cfg.model_dump()}

    def _size(self, image_id: str) -> tuple[int, int]:
        return self.cfg.width, self.cfg.height

    def ids(self, split: str) -> list[str]:
        n = {"train": self.cfg.num_train, "val": self.cfg.num_val}.get(split)
        if n is None:
            raise DataError(self.name, f"unknown split '{split}' (train, val)")
        return [f"{split}_{i:04d}" for i in range(n)]

    def _gen(self, image_id: str):
        split, _, idx = image_id.partition("_")
        if split not in ("train", "val") or not idx.isdigit():
            raise DataError(f"{self.name}:{image_id}", f"not a {self.name} image id")
        return self._generate(split, int(idx))

    def _generate(self, split: str, index: int):
        return demo_gen.generate(self.cfg.seed, split, index, self.cfg.height, self.cfg.width)

    def image_path(self, image_id: str) -> str:
        return f"{self.name}:{image_id}"

    def _read_image(self, image_id: str) -> np.ndarray:
        return self._gen(image_id)[0]

    def _read_gt(self, image_id: str) -> np.ndarray:
        return self._gen(image_id)[1]

    def _read_instances(self, image_id: str) -> np.ndarray:
        return self._gen(image_id)[2]

    def _read_weak(self, image_id: str) -> WeakLabels:
        _, semantic, instance = self._gen(image_id)
        return self._synthesize(image_id, semantic, instance, self.image_path(image_id))

"""Dataset readers: ``demo`` (synthetic), ``shapes`` (synthetic, many classes), ``masks``
(images + GT masks), ``voc`` (VOCdevkit), ``coco`` (image folder + COCO instances JSON).

Each reader is a small picklable object (paths and options, no open files) with the
interface of :class:`stages.base.Dataset`. Bad files raise :class:`DataError` naming the
file and the problem; the pipeline records the item as failed and goes on. A missing root
or folder raises at construction, before any work starts.
"""

from __future__ import annotations

from ..config import CocoDataset, DemoDataset, MasksDataset, RunConfig, ShapesDataset, VocDataset
from .base import ALL_WEAK, IMAGE_EXTS, STROKES, WEAK_NEEDS, read_image, scale_weak, warn_once, working_size
from .coco import CocoData
from .demo import DemoData
from .masks import MasksData
from .shapes import ShapesData
from .voc import VOC_ALIASES, VOC_CLASSES, VocData

__all__ = [
    "ALL_WEAK",
    "IMAGE_EXTS",
    "STROKES",
    "VOC_ALIASES",
    "VOC_CLASSES",
    "WEAK_NEEDS",
    "CocoData",
    "DemoData",
    "MasksData",
    "ShapesData",
    "VocData",
    "build_dataset",
    "read_image",
    "scale_weak",
    "warn_once",
    "working_size",
]

READERS = {
    DemoDataset: DemoData,
    ShapesDataset: ShapesData,
    MasksDataset: MasksData,
    CocoDataset: CocoData,
    VocDataset: VocData,
}
"""The reader of each ``dataset.kind`` section."""


def build_dataset(config: RunConfig, all_weak: bool = False):
    """The dataset reader a config names (errors here stop the run before any work); it
    reads the weak labels the run's ``labels`` need, or with ``all_weak`` every kind."""
    d = config.dataset
    kind = READERS[type(d)]
    return kind(d, config.weak, None if all_weak else config.labels)

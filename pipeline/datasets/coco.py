"""The ``coco`` reader: an image folder and a COCO instances JSON per split."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from stages.base import IGNORE, Box, DataError, Point, WeakLabels

from .. import coco
from ..config import CocoDataset, WeakConfig
from ..store import read_label_png
from ..weak import clip_boxes
from .base import _Base, _read_json, log, read_image


class CocoData(_Base):
    """An image folder with a COCO instances JSON per split (see :mod:`pipeline.coco`).
    Image ids are the file names' stems. The parsed JSON is cached per process and not
    pickled: a worker process parses it once, lazily."""

    def __init__(self, cfg: CocoDataset, weak: WeakConfig, labels: str | None = None) -> None:
        super().__init__(weak, labels)
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.name = self.root.name
        self.image_dir = self.root / cfg.images
        for d in (self.root, self.image_dir):
            if not d.is_dir():
                raise DataError(d, "dataset folder not found")
        self.json = {"train": self.root / cfg.train_json}
        indexes = {"train": coco.load(self.json["train"])}  # fails here, before any work
        if cfg.val_json:
            try:
                indexes["val"] = coco.load(self.root / cfg.val_json)
                self.json["val"] = self.root / cfg.val_json
            except DataError as err:  # training can go on; the val stages get no images
                log.warning("%s; the val split is empty", err)
        first = indexes["train"]
        if not any(im.annotations for im in first.images.values()):
            raise DataError(
                self.json["train"],
                "no usable annotation (the list is empty, or every entry was skipped): "
                "the run would learn background alone",
            )
        for split, index in indexes.items():
            if index.categories != first.categories:
                raise DataError(self.json[split], f"its categories differ from {self.json['train']}'s")
        self.class_names = first.class_names
        self._ids = {
            split: sorted(index.images)[: cfg.limit] if cfg.limit else sorted(index.images)
            for split, index in indexes.items()
        }
        self._split_of = {i: split for split, ids in self._ids.items() for i in ids}
        self._has_masks = {split: index.has_masks() for split, index in indexes.items()}
        self.scribble_dir = self.root / cfg.scribbles if cfg.scribbles else None
        if self.scribble_dir is not None and not self.scribble_dir.is_dir():
            raise DataError(self.scribble_dir, "scribble folder not found")
        self.points_path = self.root / cfg.points if cfg.points else None
        if self.points_path is not None and not self.points_path.is_file():
            raise DataError(self.points_path, "points file not found")

    @classmethod
    def index_paths(cls, cfg: CocoDataset) -> list[Path]:
        root = Path(cfg.root)
        return [root / name for name in (cfg.train_json, cfg.val_json, cfg.scribbles, cfg.points) if name]

    def describe(self) -> dict[str, Any]:
        return {"kind": "coco", **self.cfg.model_dump(), "root": str(self.root.resolve())}

    def coco_categories(self) -> list[int]:
        """The COCO category id of classes 1..K (``wsss export --format coco`` writes them back)."""
        return [cid for cid, _ in coco.load(self.json["train"]).categories]

    def weak_sources(self) -> list[Path]:
        # per-image scribble PNGs are in input_files' stamps: no command reads all of them
        return list(self.json.values()) + ([self.points_path] if self.points_path else [])

    def ids(self, split: str) -> list[str]:
        if split not in ("train", "val"):
            raise DataError(self.root, f"unknown split '{split}' (train, val)")
        return list(self._ids.get(split, []))

    def _entry(self, image_id: str) -> tuple[coco.CocoImage, Path]:
        split = self._split_of.get(image_id)
        if split is None:
            raise DataError(self.root, f"image '{image_id}' is in none of the COCO files")
        entry = coco.load(self.json[split]).images[image_id]
        if entry.problem is not None:
            raise DataError(self.json[split], entry.problem)
        return entry, self.json[split]

    def image_path(self, image_id: str) -> str:
        return str(self.image_dir / self._entry(image_id)[0].file_name)

    def input_files(self, image_id: str) -> list[Path]:
        files = [Path(self.image_path(image_id))]  # the JSONs are whole-dataset sources
        if self.scribble_dir is not None:
            files.append(self.scribble_dir / f"{image_id}.png")
        return files

    def _size(self, image_id: str) -> tuple[int, int]:
        entry = self._entry(image_id)[0]
        return entry.width, entry.height

    def _read_image(self, image_id: str) -> np.ndarray:
        entry, source = self._entry(image_id)
        image = read_image(Path(self.image_path(image_id)))
        if image.shape[:2] != (entry.height, entry.width):
            turned = (
                " (upright, after its EXIF orientation; the stored pixels are the other way round: annotate "
                "the image as viewers show it)"
                if image.shape[:2] == (entry.width, entry.height)
                else ""
            )
            raise DataError(
                self.image_path(image_id),
                f"image is {image.shape[1]}x{image.shape[0]}{turned} but {source} says {entry.width}x{entry.height}",
            )
        return image

    def _rasterized(self, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        split = self._split_of.get(image_id)
        if split is None or not self._has_masks[split]:
            return None
        path = self.json[split]
        semantic, instance = _coco_raster(str(path), path.stat().st_mtime_ns, image_id)
        return semantic.copy(), instance.copy()

    def _read_gt(self, image_id: str) -> np.ndarray | None:
        r = self._rasterized(image_id)
        return None if r is None else r[0]

    def _read_instances(self, image_id: str) -> np.ndarray | None:
        r = self._rasterized(image_id)
        return None if r is None else r[1]

    def _class_of(self, value: Any, source: Path) -> int:
        """A class id from a class id, a category name or ``("category", COCO id)``."""
        if isinstance(value, tuple):
            ids = self.coco_categories()
            if value[1] not in ids:
                raise DataError(source, f"unknown category id {value[1]}")
            return ids.index(value[1]) + 1
        if isinstance(value, str):
            if value not in self.class_names:
                raise DataError(source, f"unknown class name '{value}'")
            return self.class_names.index(value)
        if not 0 <= int(value) < self.num_classes:
            raise DataError(source, f"unknown class id {value} (the dataset has {self.num_classes} classes)")
        return int(value)

    def _read_weak(self, image_id: str) -> WeakLabels:
        entry, source = self._entry(image_id)
        boxes = [
            b
            for a in entry.annotations
            if not a.crowd and "boxes" in self.needs
            for b in clip_boxes(
                [Box(*coco.box_window(a.bbox), a.cls)],
                entry.width,
                entry.height,
                f"{source}: annotation {a.ann_id} ({entry.file_name})",
                log,
            )
        ]
        # points / scribbles: from their files, else synthesized from the masks when the
        # run's labels need them and the image has an object mask
        r = None
        if ("points" in self.needs and self.points_path is None) or (
            "scribbles" in self.needs and self.scribble_dir is None
        ):
            r = self._rasterized(image_id)
        synthesized = None
        if r is not None and ((r[0] != 0) & (r[0] != IGNORE)).any():
            synthesized = self._synthesize(image_id, r[0], r[1], str(source))
        points: list[Point] = []
        if "points" in self.needs and self.points_path is not None:
            clicks = _coco_points(str(self.points_path), str(source)).get(image_id, [])
            points = [
                Point(int(round(x)), int(round(y)), self._class_of(cls, self.points_path)) for x, y, cls in clicks
            ]
        elif "points" in self.needs and synthesized is not None:
            points = synthesized.points
        scribbles = None
        if "scribbles" in self.needs and self.scribble_dir is not None:
            spath = self.scribble_dir / f"{image_id}.png"
            scribbles = read_label_png(spath) if spath.is_file() else None
        elif "scribbles" in self.needs and synthesized is not None:
            scribbles = synthesized.scribbles
        tags = sorted({a.cls for a in entry.annotations})
        return WeakLabels(tags=tags, boxes=boxes, scribbles=scribbles, points=points)


@functools.lru_cache(maxsize=32)
def _coco_raster(instances: str, mtime_ns: int, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """One image's (semantic, instance) maps, decoded once: GT, instance scoring and weak-label
    synthesis all read them (``mtime_ns`` tells an edited file apart)."""
    return coco.rasterize(coco.load(Path(instances)).images[image_id])


@functools.lru_cache(maxsize=4)
def _coco_points(points: str, instances: str) -> dict[str, list]:
    """The clicks of a points file per image id, read once per process."""
    return coco.points_by_image(_read_json(Path(points)), coco.load(Path(instances)), Path(points))

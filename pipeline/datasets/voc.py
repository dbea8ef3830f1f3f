"""The ``voc`` reader: a VOCdevkit-style folder (JPEGImages, Annotations XML, lists, GT PNGs)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stages.base import IGNORE, Box, DataError, Point, WeakLabels, safe_name

from ..config import VocDataset, WeakConfig
from ..store import read_label_png
from ..weak import box_problem, clip_boxes
from .base import _Base, _image_size, _read_json, log, read_image, warn_once


VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


# Short and alternative names used by ScribbleSup and other annotation files.
VOC_ALIASES = {
    "plane": "aeroplane",
    "airplane": "aeroplane",
    "bike": "bicycle",
    "table": "diningtable",
    "dining table": "diningtable",
    "motorcycle": "motorbike",
    "plant": "pottedplant",
    "potted plant": "pottedplant",
    "monitor": "tvmonitor",
    "tv": "tvmonitor",
    "bg": "background",
}


class VocData(_Base):
    """A VOCdevkit-style folder: JPEGImages (.jpg / .png), Annotations, optional
    ImageSets/Segmentation and GT PNGs, optional ScribbleSup XML / PNG scribbles and a points
    JSON (``{id: [{x, y, cls}]}``, ``cls`` a class id or name); the classes from
    ``dataset.class_names`` (default VOC's)."""

    def __init__(self, cfg: VocDataset, weak: WeakConfig, labels: str | None = None) -> None:
        super().__init__(weak, labels)
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.name = self.root.name
        self.class_names = list(cfg.class_names or VOC_CLASSES)
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise DataError(
                self.root,
                f"dataset.class_names needs background and at least one class, no repeats: {self.class_names}",
            )
        self.aliases = VOC_ALIASES if cfg.class_names is None else {}
        for d in (self.root, self.root / "JPEGImages"):
            if not d.is_dir():
                raise DataError(d, "VOC folder not found")
        self._images = {
            p.stem: p
            for p in sorted((self.root / "JPEGImages").iterdir())
            if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        }
        self.gt_dir: Path | None = None
        if cfg.gt_dir != "none":
            names = ["SegmentationClassAug", "SegmentationClass"] if cfg.gt_dir == "auto" else [cfg.gt_dir]
            self.gt_dir = next((self.root / n for n in names if (self.root / n).is_dir()), None)
        self.scribble_dir = Path(cfg.scribbles) if cfg.scribbles else None
        if self.scribble_dir and not self.scribble_dir.is_dir():
            raise DataError(self.scribble_dir, "scribble folder not found")
        self.points_path = Path(cfg.points) if cfg.points else None
        if self.points_path and not self.points_path.is_file():
            raise DataError(self.points_path, "points file not found")
        self._points: dict[str, Any] | None = None

    @classmethod
    def index_paths(cls, cfg: VocDataset) -> list[Path]:
        root = Path(cfg.root)
        return [root / "JPEGImages", root / "Annotations", root / "ImageSets" / "Segmentation"]

    def describe(self) -> dict[str, Any]:
        return {"kind": "voc", **self.cfg.model_dump(), "root": str(self.root.resolve())}

    def weak_sources(self) -> list[Path]:
        files = sorted((self.root / "Annotations").glob("*.xml"))
        if self.scribble_dir is not None:
            files += sorted(p for p in self.scribble_dir.iterdir() if p.suffix in (".png", ".xml"))
        return files + ([self.points_path] if self.points_path else [])

    def input_files(self, image_id: str) -> list[Path]:
        files = [Path(self.image_path(image_id)), self.root / "Annotations" / f"{image_id}.xml"]
        if self.gt_dir is not None:
            files += [self.gt_dir / f"{image_id}.png", self.root / "SegmentationObject" / f"{image_id}.png"]
        if self.scribble_dir is not None:
            files += [self.scribble_dir / f"{image_id}.png", self.scribble_dir / f"{image_id}.xml"]
        return files

    def ids(self, split: str) -> list[str]:
        name = {"train": self.cfg.train_split, "val": self.cfg.val_split}.get(split, split)
        lists = self.root / "ImageSets" / "Segmentation"
        path = lists / f"{name}.txt"
        if not lists.is_dir() and split in ("train", "val"):
            # no lists at all: every image with an Annotations XML is train, val is empty
            annotated = (
                []
                if split == "val"
                else sorted(p.stem for p in (self.root / "Annotations").glob("*.xml") if p.stem in self._images)
            )
            warn_once(self.root, "no-lists", f"{lists}: no split lists; every annotated image is train, val is empty")
            return annotated[: self.cfg.limit] if self.cfg.limit else annotated
        if not path.is_file():
            raise DataError(path, f"split list for '{split}' not found")
        ids = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    ids.append(safe_name(line.split()[0], "image id"))
                except ValueError as err:
                    raise DataError(path, f"line {n}: {err}") from None
        return ids[: self.cfg.limit] if self.cfg.limit else ids

    def _size(self, image_id: str) -> tuple[int, int]:
        return _image_size(Path(self.image_path(image_id)))

    def image_path(self, image_id: str) -> str:
        return str(self._images.get(image_id, self.root / "JPEGImages" / f"{image_id}.jpg"))

    def _read_image(self, image_id: str) -> np.ndarray:
        return read_image(Path(self.image_path(image_id)))

    def _read_gt(self, image_id: str) -> np.ndarray | None:
        if self.gt_dir is None:
            return None
        path = self.gt_dir / f"{image_id}.png"
        if not path.is_file():
            return None
        gt = read_label_png(path)
        odd = (gt >= self.num_classes) & (gt != IGNORE)
        if odd.any():
            warn_once(
                self.gt_dir,
                "classes",
                f"{path}: GT values {sorted(set(np.unique(gt[odd]).tolist()))[:8]} are "
                f"not class ids (0..{self.num_classes - 1}) and are ignored (255); further GT files of this "
                "dataset are not reported",
            )
            gt = np.where(odd, IGNORE, gt).astype(np.uint8)
        return gt

    def _read_instances(self, image_id: str) -> np.ndarray | None:
        path = self.root / "SegmentationObject" / f"{image_id}.png"
        return read_label_png(path) if path.is_file() else None

    def class_id(self, name: str, source: object) -> int:
        key = name.strip()
        if key in self.class_names:
            return self.class_names.index(key)
        key = key.lower()
        key = self.aliases.get(key, key)
        lowered = [c.lower() for c in self.class_names]
        if key not in lowered:
            raise DataError(source, f"unknown class name '{name}' (dataset.class_names: {', '.join(self.class_names)})")
        return lowered.index(key)

    def _parse_xml(self, path: Path) -> ET.Element:
        try:
            return ET.parse(path).getroot()
        except FileNotFoundError:
            raise DataError(path, "file not found") from None
        except ET.ParseError as err:
            raise DataError(path, f"malformed XML ({err})") from None

    def _boxes(self, image_id: str, width: int, height: int) -> list[Box]:
        path = self.root / "Annotations" / f"{image_id}.xml"
        root = self._parse_xml(path)
        boxes = []
        for obj in root.iter("object"):
            name, bb = obj.findtext("name"), obj.find("bndbox")
            if name is None or bb is None:
                raise DataError(path, "an <object> lacks <name> or <bndbox>")
            corners = [bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
            if problem := box_problem(corners):
                raise DataError(path, f"object '{name}': <bndbox> {problem}")
            x0, y0, x1, y1 = (float(v) for v in corners)
            # VOC boxes are 1-based and inclusive.
            boxes.append(
                Box(int(round(x0)) - 1, int(round(y0)) - 1, int(round(x1)), int(round(y1)), self.class_id(name, path))
            )
        return clip_boxes(boxes, width, height, str(path), log)

    def _scribbles(self, image_id: str, width: int, height: int) -> np.ndarray | None:
        if self.scribble_dir is None:
            return None
        png, xml = self.scribble_dir / f"{image_id}.png", self.scribble_dir / f"{image_id}.xml"
        if png.is_file():
            return read_label_png(png)
        if not xml.is_file():
            return None
        root = self._parse_xml(xml)
        canvas = np.full((height, width), IGNORE, np.uint8)
        strokes = []
        for poly in root.iter("polygon"):
            tag = poly.findtext("tag")
            if tag is None:
                raise DataError(xml, "a <polygon> lacks its <tag>")
            try:
                pts = [(int(float(p.findtext("X"))), int(float(p.findtext("Y")))) for p in poly.iter("point")]
            except (TypeError, ValueError):
                raise DataError(xml, f"scribble '{tag}' has a bad <point>") from None
            strokes.append((self.class_id(tag, xml), np.array(pts, np.int32).reshape(-1, 1, 2)))
        # Background first so object strokes stay on top where strokes cross.
        for cls, pts in sorted(strokes, key=lambda s: s[0] != 0):
            cv2.polylines(canvas, [pts], False, int(cls), thickness=self.cfg.scribble_width)
        return canvas

    def _point_list(self, image_id: str) -> list[Point]:
        if self.points_path is None:
            return []
        if self._points is None:
            self._points = _read_json(self.points_path)
        out = []
        for p in self._points.get(image_id, []):
            cls = p["cls"]
            cls = self.class_id(cls, self.points_path) if isinstance(cls, str) else int(cls)
            if not 0 <= cls < self.num_classes:
                raise DataError(self.points_path, f"unknown class id {cls} for image '{image_id}'")
            out.append(Point(int(p["x"]), int(p["y"]), cls))
        return out

    def _read_weak(self, image_id: str) -> WeakLabels:
        width, height = _image_size(Path(self.image_path(image_id)))
        boxes = self._boxes(image_id, width, height)
        return WeakLabels(
            tags=sorted({b.cls for b in boxes}),
            boxes=boxes,
            scribbles=self._scribbles(image_id, width, height),
            points=self._point_list(image_id),
        )

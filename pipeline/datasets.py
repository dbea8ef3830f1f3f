"""Dataset readers: ``demo`` (synthetic), ``masks`` (images + GT masks), ``voc`` (VOCdevkit),
``coco`` (image folder + COCO instances JSON).

Each reader is a small picklable object (paths and options, no open files) with the
interface of :class:`stages.base.Dataset`. Bad files raise :class:`DataError` naming the
file and the problem; the pipeline records the item as failed and goes on. A missing root
or folder raises at construction, before any work starts.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from stages.base import IGNORE, Box, DataError, Point, WeakLabels, safe_name

from . import demo as demo_gen
from . import coco
from .config import CocoDataset, DemoDataset, MasksDataset, RunConfig, VocDataset, WeakConfig
from .store import fingerprint, read_label_png
from .weak import clip_boxes, image_rng, instances_from_semantic, synthesize

log = logging.getLogger("wsss.data")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 array; unreadable or truncated files raise :class:`DataError`.

    8-bit modes (L, P, RGBA, CMYK, ...) go through PIL's ``convert("RGB")``; 16-bit
    grayscale (``I;16*``, or ``I`` within 0..65535) is scaled by 255/65535, since
    ``convert`` would clip every value above 255 to white; float images are refused.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decodes fully: a truncated file fails here, not later
            if img.mode.startswith("I"):
                return np.repeat(_gray16_to_8(np.asarray(img), path)[..., None], 3, axis=2)
            if img.mode == "F":
                raise DataError(path, "floating-point image: save it as 8- or 16-bit")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(path, f"unreadable or truncated image ({err})") from None


def _gray16_to_8(raw: np.ndarray, path: Path) -> np.ndarray:
    if raw.min() < 0 or raw.max() > 65535:
        raise DataError(path, f"integer image with values {raw.min()}..{raw.max()}, outside 16 bits")
    return np.round(raw.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)


_WARNED: set[tuple[str, str]] = set()


def warn_once(dataset: object, key: str, message: str) -> None:
    """Log ``message`` the first time (per process) ``dataset`` hits the problem ``key``."""
    if (str(dataset), key) not in _WARNED:
        _WARNED.add((str(dataset), key))
        log.warning("%s", message)


def _file_hash(paths: list[Path], root: Path) -> str:
    """Content hash of files (names relative to ``root`` included); absent files count too."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root) if p.is_relative_to(root) else p).encode() + b"\0")
        try:
            with open(p, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        except FileNotFoundError:
            h.update(b"absent")
    return h.hexdigest()[:16]


def scale_weak(weak: WeakLabels, scale: float, shape: tuple[int, int]) -> WeakLabels:
    """Weak labels of an image resized by ``scale`` to ``shape`` (h, w): boxes grow outward
    to whole pixels, points round, scribbles resize nearest."""
    h, w = shape
    boxes = [
        Box(
            int(np.floor(b.x0 * scale)),
            int(np.floor(b.y0 * scale)),
            min(w, int(np.ceil(b.x1 * scale))),
            min(h, int(np.ceil(b.y1 * scale))),
            b.cls,
        )
        for b in weak.boxes
    ]
    points = [
        Point(min(w - 1, int(round(p.x * scale))), min(h - 1, int(round(p.y * scale))), p.cls) for p in weak.points
    ]
    scribbles = None if weak.scribbles is None else cv2.resize(weak.scribbles, (w, h), interpolation=cv2.INTER_NEAREST)
    return WeakLabels(tags=list(weak.tags), boxes=boxes, scribbles=scribbles, points=points)


def working_size(width: int, height: int, cfg) -> tuple[float, tuple[int, int]] | None:
    """(scale, (h, w)) of the size every stage works at (``cfg`` a dataset section): down
    when the longer side exceeds ``max_side``, up when the shorter side is below ``min_side``
    (never past ``max_side``); None for an image used as it is."""
    limit, low = cfg.max_side, cfg.min_side
    if max(width, height) > limit:
        scale = limit / max(width, height)
    elif low is not None and min(width, height) < low:
        scale = min(low / min(width, height), limit / max(width, height))
    else:
        return None
    return scale, (max(1, int(round(height * scale))), max(1, int(round(width * scale))))


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError) as err:
        raise DataError(path, f"unreadable image ({err})") from None


# The weak labels each label kind reads beyond the tags (every kind reads tags); a dataset
# reads or synthesizes the others only when asked for everything (``labels=None``).
# DFR and BLPSeg train on scribbles or points (their ``labels`` key); RRM reads the tags and
# the few-shot task the masks.
STROKES = frozenset({"points", "scribbles"})  # synthesized together (pipeline.weak.synthesize)
WEAK_NEEDS: dict[str, frozenset[str]] = {
    "box": frozenset({"boxes"}),
    "tags": frozenset(),
    "masks": frozenset(),
    "point": frozenset({"points"}),
    "scribble": frozenset({"scribbles"}),
}
ALL_WEAK = frozenset({"boxes"}) | STROKES


class _Base(abc.ABC):
    name: str
    class_names: list[str]

    def __init__(self, weak: WeakConfig, labels: str | None = None) -> None:
        self.weak_cfg = weak
        self.needs = WEAK_NEEDS.get(labels, ALL_WEAK) if labels else ALL_WEAK

    cfg: Any  # the dataset's config section (max_side, oversize, ...)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        return fingerprint({"dataset": self.describe()})

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Everything that defines the images and GT (kind, root, options): the root of all
        fingerprints. Weak labels are described apart (:meth:`weak_fingerprint`)."""

    def weak_sources(self) -> list[Path]:
        """The files weak labels are read from (none where they are synthesized from GT)."""
        return []

    def weak_fingerprint(self) -> str:
        """Content hash of :meth:`weak_sources`: editing a weak-label file recomputes the
        stages that read weak labels (and what follows them)."""
        files = self.weak_sources()
        return _file_hash(files, Path(getattr(self, "root", "."))) if files else "synthesized"

    # Readers at the image's own size; the public loaders below apply the size guard.
    @abc.abstractmethod
    def _size(self, image_id: str) -> tuple[int, int]:
        """(width, height) of what ``_read_image`` returns, without decoding it."""

    def file_size(self, image_id: str) -> tuple[int, int]:
        """(width, height) of the image file as the user has it (``export`` writes at it)."""
        return self._size(image_id)

    @abc.abstractmethod
    def _read_image(self, image_id: str) -> np.ndarray: ...

    @abc.abstractmethod
    def _read_gt(self, image_id: str) -> np.ndarray | None: ...

    @abc.abstractmethod
    def _read_weak(self, image_id: str) -> WeakLabels: ...

    def _read_instances(self, image_id: str) -> np.ndarray | None:
        return None

    def _target(self, image_id: str) -> tuple[float, tuple[int, int]] | None:
        """:func:`working_size` of the image (None: used as it is)."""
        w, h = self._size(image_id)
        if max(w, h) > self.cfg.max_side and self.cfg.oversize == "fail":
            raise DataError(
                self.image_path(image_id),
                f"image is {w}x{h}, above dataset.max_side "
                f"{self.cfg.max_side}; raise max_side or set dataset.oversize: "
                "downscale",
            )
        return working_size(w, h, self.cfg)

    def load_image(self, image_id: str) -> np.ndarray:
        image = self._read_image(image_id)
        target = self._target(image_id)
        if target is None:
            return image
        (h, w), shape = target[1], f"{image.shape[1]}x{image.shape[0]}"
        if target[0] < 1:
            warn_once(
                self.image_path(image_id),
                "oversize",
                f"{self.image_path(image_id)}: image is {shape}, above "
                f"dataset.max_side {self.cfg.max_side}; working at {w}x{h}",
            )
            return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        warn_once(
            self.name,
            "upscale",
            f"{self.name}: images with a side below dataset.min_side {self.cfg.min_side} "
            f"are upscaled to work on (first: {Path(self.image_path(image_id)).name} {shape} -> {w}x{h})",
        )
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)

    def _nearest(self, image_id: str, labels: np.ndarray | None) -> np.ndarray | None:
        target = None if labels is None else self._target(image_id)
        if target is None:
            return labels
        h, w = target[1]
        return cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)

    def load_gt(self, image_id: str) -> np.ndarray | None:
        return self._nearest(image_id, self._read_gt(image_id))

    def load_instances(self, image_id: str) -> np.ndarray | None:
        """GT instance ids (0 background, 255 ignore) where the dataset has them."""
        return self._nearest(image_id, self._read_instances(image_id))

    def load_weak(self, image_id: str) -> WeakLabels:
        weak = self._read_weak(image_id)
        target = self._target(image_id)
        return weak if target is None else scale_weak(weak, *target)

    def gt_objects(self, image_id: str) -> list[tuple[int, np.ndarray]] | None:
        """GT objects ``(class, mask)`` for instance scoring, None without GT: the instance
        ids where the dataset has them, else connected components of the semantic GT; both
        with the ``weak.min_object_area`` of box synthesis (the objects that get a box)."""
        gt = self.load_gt(image_id)
        if gt is None:
            return None
        min_area = max(1, int(round(self.weak_cfg.min_object_area * gt.size)))
        return instances_from_semantic(gt, self.load_instances(image_id), min_area)

    def _synthesize(self, image_id: str, semantic: np.ndarray, instance: np.ndarray | None, source: str) -> WeakLabels:
        w = self.weak_cfg
        return synthesize(
            semantic,
            instance,
            image_rng(w.seed, image_id),
            w.min_object_area,
            w.scribble_coverage,
            w.scribble_length,
            w.scribble_background,
            w.background_points,
            source=source,
            strokes=bool(self.needs & STROKES),
        )


# --------------------------------------------------------------------------- demo
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
            raise DataError("demo", f"unknown split '{split}' (train, val)")
        return [f"{split}_{i:04d}" for i in range(n)]

    def _gen(self, image_id: str):
        split, _, idx = image_id.partition("_")
        if split not in ("train", "val") or not idx.isdigit():
            raise DataError(f"demo:{image_id}", "not a demo image id")
        return demo_gen.generate(self.cfg.seed, split, int(idx), self.cfg.height, self.cfg.width)

    def image_path(self, image_id: str) -> str:
        return f"demo:{image_id}"

    def _read_image(self, image_id: str) -> np.ndarray:
        return self._gen(image_id)[0]

    def _read_gt(self, image_id: str) -> np.ndarray:
        return self._gen(image_id)[1]

    def _read_instances(self, image_id: str) -> np.ndarray:
        return self._gen(image_id)[2]

    def _read_weak(self, image_id: str) -> WeakLabels:
        _, semantic, instance = self._gen(image_id)
        return self._synthesize(image_id, semantic, instance, f"demo:{image_id}")


# --------------------------------------------------------------------------- masks
class MasksData(_Base):
    """``root/images/<id>.<ext>`` with ``root/masks/<id>.<ext>``.

    Masks are thresholded (``threshold``, for lossy JPEG masks: value >= threshold -> class 1)
    or mapped through ``class_map`` (mask value -> class id; unmapped values -> 255).
    Images whose size differs from their mask stop with an error naming both files, unless
    ``resize: image_to_mask`` (same aspect ratio required). Weak labels come from
    ``weak_dir`` (written by ``wsss prepare``, or your own) or are synthesized on the fly,
    identically. With ``weak_dir`` the masks are optional: every image is used, scored where
    it has a mask; of ``boxes.json``, ``points.json``, ``scribbles/`` only what the
    run's labels need is read (and must exist), ``tags.json`` where present (else the
    classes the other labels name).
    """

    def __init__(self, cfg: MasksDataset, weak: WeakConfig, labels: str | None = None) -> None:
        super().__init__(weak, labels)
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.name = self.root.name
        self.class_names = list(cfg.class_names)
        self.image_dir, self.mask_dir = self.root / cfg.images, self.root / cfg.masks
        # With weak_dir the masks are optional (GT where there is one: scores only there).
        needed = (self.root, self.image_dir) if cfg.weak_dir else (self.root, self.image_dir, self.mask_dir)
        for d in needed:
            if not d.is_dir():
                raise DataError(d, "dataset folder not found")
        if cfg.weak_dir and not Path(cfg.weak_dir).is_dir():
            raise DataError(cfg.weak_dir, "weak-label folder not found (make it with `wsss prepare`)")
        self._images = self._index(self.image_dir)
        masks = self._index(self.mask_dir) if self.mask_dir.is_dir() else {}
        self._masks = masks
        if cfg.weak_dir:
            all_ids = sorted(self._images)
            for name in ("boxes", "points", "tags"):
                if name != "tags" and name in self.needs and not (Path(cfg.weak_dir) / f"{name}.json").is_file():
                    raise DataError(Path(cfg.weak_dir) / f"{name}.json", "file not found (the run's labels need it)")
        else:
            unpaired = sorted(set(self._images) - set(masks))
            if unpaired:
                log.warning(
                    "%s: %d image(s) without a mask are skipped (e.g. %s); weak labels from files "
                    "(dataset.weak_dir) need no mask",
                    self.mask_dir,
                    len(unpaired),
                    unpaired[0],
                )
            all_ids = sorted(set(self._images) & set(masks))
        if not all_ids:
            raise DataError(
                self.root,
                f"no image in {cfg.images}/ has a mask in {cfg.masks}/"
                if not cfg.weak_dir
                else f"no image in {cfg.images}/",
            )
        if cfg.train_list or cfg.val_list:
            self._splits = {
                split: self._read_list(name, set(all_ids)) if name else []
                for split, name in (("train", cfg.train_list), ("val", cfg.val_list))
            }
            if cfg.limit:
                self._splits = {k: v[: cfg.limit] for k, v in self._splits.items()}
        else:
            if cfg.limit:
                all_ids = all_ids[: cfg.limit]
            order = np.random.default_rng(cfg.split_seed).permutation(len(all_ids))
            n_val = int(round(cfg.val_fraction * len(all_ids)))
            val = {all_ids[k] for k in order[:n_val]}
            self._splits = {"train": [i for i in all_ids if i not in val], "val": [i for i in all_ids if i in val]}
        self._weak_cache: dict[str, Any] | None = None

    def _read_list(self, name: str, known: set[str]) -> list[str]:
        """A split list (one id per line, relative to the root or absolute): ids must be safe
        names with an image and a mask."""
        path = self.root / name
        if not path.is_file():
            raise DataError(path, "split list not found")
        ids = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                image_id = safe_name(line.split()[0], "image id")
            except ValueError as err:
                raise DataError(path, f"line {n}: {err}") from None
            if image_id not in known:
                raise DataError(
                    path, f"line {n}: '{image_id}' has no image in {self.cfg.images}/ with a mask in {self.cfg.masks}/"
                )
            ids.append(image_id)
        return ids

    @staticmethod
    def _index(folder: Path) -> dict[str, Path]:
        out = {}
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            try:
                out[safe_name(p.stem, "image id")] = p
            except ValueError as err:
                if not p.name.startswith("."):  # hidden files (e.g. macOS ._*) are skipped quietly
                    log.warning("%s: skipped: %s", p, err)
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "masks", **self.cfg.model_dump(), "root": str(self.root.resolve())}

    def weak_sources(self) -> list[Path]:
        if not self.cfg.weak_dir:
            return []
        root = Path(self.cfg.weak_dir)
        scribbles = root / "scribbles"
        return [root / f"{n}.json" for n in ("boxes", "points", "tags") if n == "tags" or n in self.needs] + (
            sorted(scribbles.glob("*.png")) if scribbles.is_dir() and "scribbles" in self.needs else []
        )

    def _size(self, image_id: str) -> tuple[int, int]:
        # images are read at (or resized to) their mask's size
        return _image_size(self._masks.get(image_id, self._images[image_id]))

    def file_size(self, image_id: str) -> tuple[int, int]:
        return _image_size(self._images[image_id])

    def ids(self, split: str) -> list[str]:
        if split not in self._splits:
            raise DataError(self.root, f"unknown split '{split}' (train, val)")
        return list(self._splits[split])

    def image_path(self, image_id: str) -> str:
        return str(self._images[image_id])

    def _mask_raw(self, image_id: str) -> np.ndarray:
        """The mask's values: palette indices or gray levels (8-bit), or 16-bit values
        rescaled to 8 bits for a thresholded mask and kept for a ``class_map``."""
        path = self._masks[image_id]
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode.startswith("I"):
                    raw = np.asarray(img)
                    if self.cfg.class_map is None:
                        return _gray16_to_8(raw, path) if raw.max() > 255 else raw.astype(np.uint8)
                    return raw.astype(np.int64)
                keep_indices = self.cfg.class_map is not None and img.mode in ("P", "L")
                return np.asarray(img if keep_indices else img.convert("L"))
        except (OSError, SyntaxError) as err:
            raise DataError(path, f"unreadable or truncated mask ({err})") from None

    def _read_gt(self, image_id: str) -> np.ndarray | None:
        if image_id not in self._masks:
            return None
        raw, path = self._mask_raw(image_id), self._masks[image_id]
        if self.cfg.class_map is not None:
            known = np.isin(raw, list(self.cfg.class_map))
            if not known.all():
                odd = sorted(int(v) for v in np.unique(raw[~known]))[:8]
                warn_once(
                    self.mask_dir,
                    "unmapped",
                    f"{path}: mask values {odd} are not in dataset.class_map and "
                    "are ignored (255); further masks of this dataset are not reported",
                )
            lut = np.full(max(256, int(raw.max()) + 1), IGNORE, np.uint8)
            for value, cls in self.cfg.class_map.items():
                if value < lut.size:
                    lut[value] = cls
            return lut[raw]
        top = int(raw.max())
        if 0 < top < self.cfg.threshold:
            warn_once(
                self.mask_dir,
                "below",
                f"{path}: every mask value is below dataset.threshold "
                f"{self.cfg.threshold} (max {top}), so the mask is all background; class indices need "
                "dataset.class_map (further masks of this dataset are not reported)",
            )
        return (raw >= self.cfg.threshold).astype(np.uint8)

    def _read_image(self, image_id: str) -> np.ndarray:
        ipath, mpath = self._images[image_id], self._masks.get(image_id)
        image = read_image(ipath)
        if mpath is None:
            return image
        mw, mh = _image_size(mpath)
        h, w = image.shape[:2]
        if (w, h) == (mw, mh):
            return image
        if abs(w / h - mw / mh) > 0.02 * (mw / mh) + 1.0 / min(mh, h):
            raise DataError(ipath, f"image is {w}x{h} but its mask {mpath} is {mw}x{mh}, a different aspect ratio")
        if self.cfg.resize != "image_to_mask":
            raise DataError(
                ipath,
                f"image is {w}x{h} but its mask {mpath} is {mw}x{mh}; set "
                "dataset.resize: image_to_mask to resize images to their masks",
            )
        return cv2.resize(image, (mw, mh), interpolation=cv2.INTER_AREA)

    def _weak_file(self, name: str) -> dict[str, Any] | None:
        """``weak_dir/<name>.json`` (parsed once), None where the file is absent."""
        if self._weak_cache is None:
            self._weak_cache = {}
        if name not in self._weak_cache:
            path = Path(self.cfg.weak_dir) / f"{name}.json"
            self._weak_cache[name] = _read_json(path) if path.is_file() else None
        return self._weak_cache[name]

    def _read_weak(self, image_id: str) -> WeakLabels:
        if not self.cfg.weak_dir:
            gt = self._read_gt(image_id)
            return self._synthesize(image_id, gt, None, str(self._masks[image_id]))
        root = Path(self.cfg.weak_dir)
        boxes: list[Box] = []
        if "boxes" in self.needs and (entries := self._weak_file("boxes")) is not None:
            if image_id not in entries:
                raise DataError(root / "boxes.json", f"no entry for image '{image_id}'")
            boxes = [Box(*map(int, b[:4]), self._check_cls(int(b[4]), root / "boxes.json")) for b in entries[image_id]]
            boxes = clip_boxes(boxes, *self._size(image_id), f"{root / 'boxes.json'} [{image_id}]", log)
        points: list[Point] = []
        if "points" in self.needs and (entries := self._weak_file("points")) is not None:
            points = [
                Point(int(p["x"]), int(p["y"]), self._check_cls(int(p["cls"]), root / "points.json"))
                for p in entries.get(image_id, [])
            ]
        scribbles = None
        spath = root / "scribbles" / f"{image_id}.png"
        if "scribbles" in self.needs and spath.is_file():
            scribbles = read_label_png(spath)
        tag_file = self._weak_file("tags")
        if tag_file is not None:
            tags = [self._check_cls(int(t), root / "tags.json") for t in tag_file.get(image_id, [])]
        else:  # the classes the other labels name
            named = {b.cls for b in boxes} | {p.cls for p in points}
            if scribbles is not None:
                named |= set(np.unique(scribbles[scribbles != IGNORE]).tolist())
            tags = sorted(c for c in named if c != 0)
        return WeakLabels(tags=tags, boxes=boxes, scribbles=scribbles, points=points)

    def _check_cls(self, cls: int, source: Path) -> int:
        if not 0 <= cls < self.num_classes:
            raise DataError(source, f"unknown class id {cls} (the dataset has {self.num_classes} classes)")
        return cls


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except ValueError as err:
        raise DataError(path, f"malformed JSON ({err})") from None


# --------------------------------------------------------------------------- voc
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

    def describe(self) -> dict[str, Any]:
        return {"kind": "voc", **self.cfg.model_dump(), "root": str(self.root.resolve())}

    def weak_sources(self) -> list[Path]:
        files = sorted((self.root / "Annotations").glob("*.xml"))
        if self.scribble_dir is not None:
            files += sorted(p for p in self.scribble_dir.iterdir() if p.suffix in (".png", ".xml"))
        return files + ([self.points_path] if self.points_path else [])

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
            try:
                x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise DataError(path, f"object '{name}' has a bad <bndbox>") from None
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


# --------------------------------------------------------------------------- coco
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

    def describe(self) -> dict[str, Any]:
        return {"kind": "coco", **self.cfg.model_dump(), "root": str(self.root.resolve())}

    def coco_categories(self) -> list[int]:
        """The COCO category id of classes 1..K (``wsss export --format coco`` writes them back)."""
        return [cid for cid, _ in coco.load(self.json["train"]).categories]

    def weak_sources(self) -> list[Path]:
        files = list(self.json.values()) + ([self.points_path] if self.points_path else [])
        return files + (sorted(self.scribble_dir.glob("*.png")) if self.scribble_dir else [])

    def ids(self, split: str) -> list[str]:
        if split not in ("train", "val"):
            raise DataError(self.root, f"unknown split '{split}' (train, val)")
        return list(self._ids.get(split, []))

    def _entry(self, image_id: str) -> tuple[coco.CocoImage, Path]:
        split = self._split_of.get(image_id)
        if split is None:
            raise DataError(self.root, f"image '{image_id}' is in none of the COCO files")
        return coco.load(self.json[split]).images[image_id], self.json[split]

    def image_path(self, image_id: str) -> str:
        return str(self.image_dir / self._entry(image_id)[0].file_name)

    def _size(self, image_id: str) -> tuple[int, int]:
        entry = self._entry(image_id)[0]
        return entry.width, entry.height

    def _read_image(self, image_id: str) -> np.ndarray:
        entry, source = self._entry(image_id)
        image = read_image(Path(self.image_path(image_id)))
        if image.shape[:2] != (entry.height, entry.width):
            raise DataError(
                self.image_path(image_id),
                f"image is {image.shape[1]}x{image.shape[0]} but {source} says {entry.width}x{entry.height}",
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


def build_dataset(config: RunConfig, all_weak: bool = False):
    """The dataset reader a config names (errors here stop the run before any work); it
    reads the weak labels the run's ``labels`` need, or with ``all_weak`` every kind."""
    d = config.dataset
    kind = {DemoDataset: DemoData, MasksDataset: MasksData, CocoDataset: CocoData, VocDataset: VocData}[type(d)]
    return kind(d, config.weak, None if all_weak else config.labels)

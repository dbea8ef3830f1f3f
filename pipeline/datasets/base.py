"""What every dataset reader shares: image reading, the working size, the weak labels a run's labels
need, and the reader base class."""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from stages.base import Box, DataError, Point, WeakLabels

from ..config import WeakConfig
from ..store import fingerprint, upright, upright_size
from ..weak import image_rng, instances_from_semantic, synthesize

log = logging.getLogger("wsss.data")


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 array as viewers show the file (EXIF orientation applied, as for its masks
    and scribbles); unreadable or truncated files raise :class:`DataError`.

    8-bit modes (L, P, RGBA, CMYK, ...) go through PIL's ``convert("RGB")``; 16-bit
    grayscale (``I;16*``, or ``I`` within 0..65535) is scaled by 255/65535, since
    ``convert`` would clip every value above 255 to white; float images are refused.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decodes fully: a truncated file fails here, not later
            img = upright(img)
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
    """(width, height) of :func:`read_image`'s array, from the header alone."""
    try:
        with Image.open(path) as img:
            return upright_size(img)
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


_REBUILT: dict[tuple, _Base] = {}
_REBUILT_MAX = 4


def rebuilt(kind: type[_Base], cfg: Any, weak: WeakConfig, labels: str | None) -> _Base:
    """The reader ``kind(cfg, weak, labels)`` in this process, built once and reused while the
    folders and lists that define its images (:meth:`_Base.index_paths`) are unchanged: what a
    pickled reader turns into in a worker (see :meth:`_Base.__reduce__`)."""
    key = (kind, cfg.model_dump_json(), weak.model_dump_json(), labels, _stamp_of(kind.index_paths(cfg)))
    reader = _REBUILT.get(key)
    if reader is None:
        quiet = logging.getLogger("wsss.data")
        level, quiet.level = quiet.level, logging.ERROR  # the main process said it already
        try:
            reader = kind(cfg, weak, labels)
        finally:
            quiet.level = level
        while len(_REBUILT) >= _REBUILT_MAX:
            _REBUILT.pop(next(iter(_REBUILT)))
        _REBUILT[key] = reader
    return reader


def _stamp_of(paths: list[Path]) -> tuple:
    """(mtime_ns, size) of each path, None where it is absent: one ``stat`` each."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class _Base(abc.ABC):
    name: str
    class_names: list[str]

    def __init__(self, weak: WeakConfig, labels: str | None = None) -> None:
        self.weak_cfg = weak
        self.labels = labels
        self.needs = WEAK_NEEDS.get(labels, ALL_WEAK) if labels else ALL_WEAK

    def __reduce__(self) -> tuple[Any, tuple]:
        """Pickled as its config, not its index: every per-image task carries the dataset,
        and a reader's path lists grow with the images (megabytes at VOC size). The worker
        rebuilds the reader once (:func:`rebuilt`) and every later task finds it."""
        return rebuilt, (type(self), self.cfg, self.weak_cfg, self.labels)

    @classmethod
    def index_paths(cls, cfg: Any) -> list[Path]:
        """The folders and files whose change changes the reader's index (which images, which
        splits): a rebuilt reader is reused while their modification times stand."""
        return []

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

    def input_files(self, image_id: str) -> list[Path]:
        """The files read for this one image (image, GT, per-image weak labels); none for
        synthetic data. Whole-dataset files are in :meth:`weak_fingerprint` instead."""
        return []

    def input_stamp(self, image_id: str) -> str:
        """Size and modification time (ns) of each :meth:`input_files` entry, hashed: a file
        edited, replaced or removed gives another stamp. One ``stat`` per file, no reading:
        a content hash would read every image on every run."""
        try:
            files = self.input_files(image_id)
        except DataError:
            return "unreadable"
        names = [path.name for path in files]
        return hashlib.blake2b(repr((names, _stamp_of(files))).encode(), digest_size=8).hexdigest()

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except ValueError as err:
        raise DataError(path, f"malformed JSON ({err})") from None

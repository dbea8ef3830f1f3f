"""The ``masks`` reader: a folder of images and a folder of GT masks with the same stems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from stages.base import IGNORE, Box, DataError, Point, WeakLabels, safe_name

from ..config import MasksDataset, WeakConfig
from ..store import read_label_png, upright
from ..weak import box_problem, clip_boxes
from .base import IMAGE_EXTS, _Base, _gray16_to_8, _image_size, _read_json, log, read_image, warn_once


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

    @classmethod
    def index_paths(cls, cfg: MasksDataset) -> list[Path]:
        root = Path(cfg.root)
        lists = [root / name for name in (cfg.train_list, cfg.val_list) if name]
        weak = [Path(cfg.weak_dir)] if cfg.weak_dir else []
        return [root / cfg.images, root / cfg.masks, *lists, *weak]

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
        # per-image scribble PNGs are in input_files' stamps: no command reads all of them
        if not self.cfg.weak_dir:
            return []
        root = Path(self.cfg.weak_dir)
        return [root / f"{n}.json" for n in ("boxes", "points", "tags") if n == "tags" or n in self.needs]

    def input_files(self, image_id: str) -> list[Path]:
        files = [self._images[image_id]] + ([self._masks[image_id]] if image_id in self._masks else [])
        if self.cfg.weak_dir and "scribbles" in self.needs:
            files.append(Path(self.cfg.weak_dir) / "scribbles" / f"{image_id}.png")
        return files

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
                img = upright(img)
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
            for b in entries[image_id]:
                problem = box_problem(b[:4]) if isinstance(b, list) and len(b) == 5 else "needs [x0, y0, x1, y1, cls]"
                if problem:
                    raise DataError(root / "boxes.json", f"image '{image_id}': {problem} ({b})")
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

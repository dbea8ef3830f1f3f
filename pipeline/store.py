"""The artifact store: the single source of truth for caching and resume.

Layout (docs/store.md)::

    <run>/config.yaml
    <run>/<stage>/<fingerprint>/manifest.json
    <run>/<stage>/<fingerprint>/items/<image_id>.png|.npz   labels | soft maps, arrays (graphs)
    <run>/<stage>/<fingerprint>/items/<map>/<image_id>.png   named extra maps (seeds: M_I, M_F, ...)
    <run>/<stage>/<fingerprint>/failed/<image_id>.json
    <run>/<stage>/<fingerprint>/inputs.json   per image: the stamp of its input files
    <run>/<stage>/<fingerprint>/model.pt, ckpt-*.pt (+ ckpt-*.json: size, SHA-256)
    <run>/<stage>/current -> <fingerprint>

Every file is written atomically (temp name in the same folder, fsync, rename), so an item
file that exists is complete: "done" is simply "its file exists", a killed run resumes with
the missing items, and a half-written file is never read (temp names start with a dot and
are never listed). A stage with extra named maps writes them before its main item, so
the main item's existence still means "this image is done". A training stage is done when
its ``model.pt`` exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

from models.seeds import labels_from_soft
from stages.base import DataError, safe_name

log = logging.getLogger("wsss")


class StageBusy(RuntimeError):
    """Another run holds the stage's lock (and ``lock: refuse``)."""


class DamagedFile(DataError):
    """A stored tensor file that is truncated, corrupt or unlike its record."""


class UnsafeFile(DataError):
    """A stored tensor file holding more than tensors and plain data: a pickled object that
    could run code on loading. Refused, never loaded."""


PLAIN = (str, int, float, bool, type(None))


def plain_state(obj: Any, where: str = "state") -> Any:
    """``obj`` as tensors and plain data (dict, list, tuple, str, int, float, bool, None):
    what ``torch.load(weights_only=True)`` reads back. NumPy arrays become tensors and NumPy
    scalars Python numbers; anything else is a programming error (TypeError)."""
    import torch

    if isinstance(obj, torch.Tensor | torch.Size | torch.dtype | torch.device) or isinstance(obj, PLAIN):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where}: {type(obj).__name__} is not a tensor or plain data; it cannot be stored")


def save_tensors(path: Path, state: dict[str, Any]) -> bytes:
    """``torch.save`` of :func:`plain_state` (atomic); returns the bytes written."""
    import torch

    buf = io.BytesIO()
    torch.save(plain_state(state), buf)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return data


def load_tensors(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """A file :func:`save_tensors` wrote (or its ``data``, already read), loaded with
    ``weights_only=True``: one holding a pickled object raises :class:`UnsafeFile`, a
    truncated or corrupt one :class:`DamagedFile`."""
    import pickle

    import torch

    try:
        return torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFile(
            path,
            f"holds more than tensors and plain data, so loading it could run code; refused ({_first_line(err)}). "
            "Delete it if you did not write it (wsss writes tensors only), or rerun with --force",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise DamagedFile(path, f"damaged or truncated ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


STAMPS = "inputs.json"  # the input stamps of the images a stage computed (not in the manifest's file list)
LABEL_EXT = ".png"
SOFT_EXT = ".npz"  # soft maps and named arrays (graphs)


def fingerprint(payload: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of a JSON-able payload."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_mode() -> int:
    """0666 less the process umask: what ``open()`` would give (``mkstemp`` gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> int:
    """Write through ``write(fileobj)`` to a temp file beside ``path``, fsync, rename.

    Returns the number of bytes written. On any error the temp file is removed and
    ``path`` is untouched. The file gets the umask's permissions, as a plain ``open`` would.
    A killed writer leaves its ``.<name>.*.tmp`` behind; :meth:`StageStore.clean_temp`
    removes those when the stage starts again.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
            os.fchmod(f.fileno(), _file_mode())
        os.replace(tmp, path)
        return size
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp):
            raise OSError(err.errno, err.strerror, str(path)) from None  # the file meant, not its temp name
        raise


def atomic_write_text(path: Path, text: str) -> int:
    return atomic_write(path, lambda f: f.write(text.encode()))


# The VOC colour map: label k gets the colour built from k's bits.
def voc_palette() -> list[int]:
    palette = []
    for k in range(256):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = voc_palette()


def encode_label_png(label: np.ndarray) -> bytes:
    """Single-channel PNG with the VOC palette (255 = ignore shows as off-white)."""
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    img = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="P")
    img.putpalette(_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


EXIF_ORIENTATION = 0x0112  # EXIF tag 274: how a viewer turns the stored pixels to show them


def orientation(img: Image.Image) -> int:
    """The EXIF orientation of an open image (1: stored upright). A PNG's ``eXIf`` chunk is
    read where it precedes the pixels, as the PNG spec places it, without decoding them."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (OSError, SyntaxError, ValueError, TypeError):
        return 1  # unreadable EXIF: the pixels as stored


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it (EXIF orientation applied; a copy where it turns)."""
    return img if orientation(img) == 1 else ImageOps.exif_transpose(img)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of :func:`upright` without decoding: orientations 5-8 swap the sides."""
    w, h = img.size
    return (h, w) if orientation(img) in (5, 6, 7, 8) else (w, h)


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel label map (palette indices or gray values), EXIF orientation applied
    as for the image it labels."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DataError(path, f"label PNG must be single-channel (P or L), got mode {img.mode}")
            return np.array(upright(img), dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise DataError(path, f"unreadable label PNG ({err})") from None


class StageStore:
    """One stage's folder for one fingerprint: items, failures, manifest, checkpoints."""

    def __init__(self, run_dir: Path, stage: str, fp: str, output: str = "label") -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.fingerprint = fp
        self.kind = output
        self.dir = self.run_dir / stage / fp
        self.items_dir = self.dir / "items"
        self.failed_dir = self.dir / "failed"
        self.ext = SOFT_EXT if output in ("soft", "arrays") else LABEL_EXT

    # ----------------------------------------------------------------- items
    def item_path(self, image_id: str, variant: str | None = None) -> Path:
        folder = self.items_dir if variant is None else self.items_dir / safe_name(variant, "map name")
        return folder / f"{safe_name(image_id, 'image id')}{self.ext}"

    def has(self, image_id: str, variant: str | None = None) -> bool:
        return self.item_path(image_id, variant).is_file()

    def done_ids(self) -> set[str]:
        if not self.items_dir.is_dir():
            return set()
        n = len(self.ext)
        return {
            e.name[:-n] for e in os.scandir(self.items_dir) if e.name.endswith(self.ext) and not e.name.startswith(".")
        }

    def write_label(self, image_id: str, label: np.ndarray, variant: str | None = None) -> None:
        """A label PNG; ``variant`` names an extra map (write those before the main one)."""
        data = encode_label_png(label)
        atomic_write(self.item_path(image_id, variant), lambda f: f.write(data))
        if variant is None:
            self.clear_failure(image_id)

    def write_soft(self, image_id: str, probs: np.ndarray, class_ids: np.ndarray) -> None:
        """Soft maps: float16 (n, H, W) with the class ids they cover."""
        probs = np.asarray(probs, dtype=np.float16)
        class_ids = np.asarray(class_ids, dtype=np.int16)
        if probs.ndim != 3 or probs.shape[0] != class_ids.size:
            raise ValueError(f"soft map shape {probs.shape} does not match {class_ids.size} class ids")
        self.write_arrays(image_id, {"probs": probs, "class_ids": class_ids})

    def write_arrays(self, image_id: str, arrays: dict[str, np.ndarray]) -> None:
        """Named arrays of one image (an ``arrays`` stage, e.g. a graph), compressed npz."""
        atomic_write(self.item_path(image_id), lambda f: np.savez_compressed(f, **arrays))
        self.clear_failure(image_id)

    def read_arrays(self, image_id: str) -> dict[str, np.ndarray]:
        path = self.item_path(image_id)
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.stage}: no output for image '{image_id}' ({path})") from None

    def read_label(self, image_id: str, variant: str | None = None) -> np.ndarray:
        path = self.item_path(image_id, variant)
        if not path.is_file():
            what = "" if variant is None else f" map '{variant}'"
            raise FileNotFoundError(f"{self.stage}: no output{what} for image '{image_id}' ({path})")
        return read_label_png(path)

    def read_soft(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        z = self.read_arrays(image_id)
        return z["probs"], z["class_ids"]

    def labels_of(self, image_id: str, variant: str | None = None) -> np.ndarray:
        """A hard label map whatever the output kind (argmax of soft maps)."""
        if self.kind == "soft":
            probs, ids = self.read_soft(image_id)
            return labels_from_soft(probs, ids)
        return self.read_label(image_id, variant)

    def write_file(self, name: str, data: bytes) -> Path:
        """A whole-dataset file in the stage folder (e.g. ``instances.json``), atomically."""
        path = self.dir / safe_name(name, "file name")
        atomic_write(path, lambda f: f.write(data))
        return path

    # ----------------------------------------------------------------- trained model
    @property
    def model_path(self) -> Path:
        return self.dir / "model.pt"

    def has_model(self) -> bool:
        return self.model_path.is_file()

    def write_model(self, state: dict[str, Any]) -> None:
        """The final model of a training stage (atomic; its existence marks the stage done):
        tensors and plain data only (:func:`plain_state`), so it loads without unpickling code."""
        save_tensors(self.model_path, state)

    def read_model(self) -> dict[str, Any]:
        if not self.has_model():
            raise FileNotFoundError(f"{self.stage}: no trained model at {self.model_path}")
        return load_tensors(self.model_path)

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int = 2) -> Path:
        """Atomically write ``ckpt-<step>.pt`` (model/optimizer/scheduler/RNG state: tensors and
        plain data) with its size and SHA-256 beside it (``ckpt-<step>.json``), and keep only
        the newest ``keep`` checkpoints."""
        path = self.checkpoint_path(step)
        data = save_tensors(path, state)
        atomic_write_text(
            path.with_suffix(".json"), json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        )
        for old in self.checkpoints()[:-keep]:
            self.remove_checkpoint(old)
        return path

    @staticmethod
    def remove_checkpoint(path: Path) -> None:
        """A checkpoint and its record."""
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)

    def drop_model(self) -> None:
        """The trained model and every checkpoint: the stage trains again from the start."""
        self.model_path.unlink(missing_ok=True)
        for ckpt in self.checkpoints():
            self.remove_checkpoint(ckpt)

    def checkpoint_path(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:08d}.pt"

    def checkpoints(self) -> list[Path]:
        return sorted(self.dir.glob("ckpt-*.pt")) if self.dir.is_dir() else []

    def latest_checkpoint(self) -> tuple[int, dict[str, Any]] | None:
        """(step, state) of the newest intact checkpoint, or None to start from scratch. A
        damaged one (size or hash unlike its record, or unreadable) is removed with a warning
        and the one before it tried."""
        found = self.checkpoints()
        for k in range(len(found) - 1, -1, -1):
            path = found[k]
            try:
                state = load_tensors(path, self._checked_bytes(path))
            except DamagedFile as err:
                after = f"resuming from {found[k - 1].name}" if k else "training from the start"
                log.warning("%s: %s; %s", self.stage, err, after)
                self.remove_checkpoint(path)
                continue
            return int(path.stem.split("-")[1]), state
        return None

    @staticmethod
    def _checked_bytes(path: Path) -> bytes | None:
        """The file's bytes once they match its ``.json`` record (read once, for the check and
        the load); :class:`DamagedFile` when they do not; None for a file written before
        records were kept, which is checked by loading it."""
        try:
            record = json.loads(path.with_suffix(".json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        data = path.read_bytes()
        if len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise DamagedFile(path, f"damaged ({len(data)} bytes, written as {record.get('bytes')} with another hash)")
        return data

    # ----------------------------------------------------------------- failures
    def record_failure(self, image_id: str, message: str) -> None:
        path = self.failed_dir / f"{safe_name(image_id, 'image id')}.json"
        atomic_write_text(path, json.dumps({"id": image_id, "error": message, "time": time.time()}))

    def clear_failure(self, image_id: str) -> None:
        try:
            (self.failed_dir / f"{image_id}.json").unlink()
        except FileNotFoundError:
            pass

    def failures(self) -> dict[str, str]:
        out = {}
        if self.failed_dir.is_dir():
            for p in sorted(self.failed_dir.glob("*.json")):
                try:
                    rec = json.loads(p.read_text())
                    out[rec["id"]] = rec["error"]
                except (OSError, ValueError, KeyError):
                    continue
        return out

    # ----------------------------------------------------------------- input stamps
    @property
    def stamps_path(self) -> Path:
        return self.dir / STAMPS

    def read_stamps(self) -> dict[str, str]:
        """``image id -> stamp`` of the input files each image was computed from (see
        ``Dataset.input_stamp``); empty where none were recorded."""
        try:
            data = json.loads(self.stamps_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_stamps(self, stamps: dict[str, str]) -> None:
        atomic_write_text(self.stamps_path, json.dumps(stamps, separators=(",", ":"), sort_keys=True))

    def remove_item(self, image_id: str) -> None:
        """An image's main item and its extra maps (it is computed again)."""
        self.item_path(image_id).unlink(missing_ok=True)
        if self.items_dir.is_dir():
            for sub in os.scandir(self.items_dir):
                if sub.is_dir():
                    (Path(sub.path) / self.item_path(image_id).name).unlink(missing_ok=True)

    # ----------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = dict(manifest, updated=time.time())
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True, default=str))

    def is_complete(self) -> bool:
        """Every image attempted (some may have failed) and every file the manifest lists intact."""
        m = self.read_manifest()
        return bool(m and m.get("status") == "complete") and not self.damaged(m)

    # ----------------------------------------------------------------- inventory
    def inventory(self) -> dict[str, int]:
        """The files the stage wrote, ``relative path -> bytes``: items, extra maps, the model
        and stage files; not the manifest, failures, checkpoints or temp files."""
        out: dict[str, int] = {}
        if not self.dir.is_dir():
            return out
        for root, dirs, files in os.walk(self.dir):
            rel = os.path.relpath(root, self.dir)
            if rel == ".":
                dirs[:] = [d for d in dirs if d != "failed"]
            for name in files:
                if name.startswith(".") or (
                    rel == "." and (name in ("manifest.json", STAMPS) or name.startswith("ckpt-"))
                ):
                    continue
                try:
                    out[name if rel == "." else f"{rel}/{name}"] = os.path.getsize(os.path.join(root, name))
                except FileNotFoundError:  # removed while we listed
                    continue
        return out

    def damaged(self, manifest: dict[str, Any] | None = None) -> dict[str, str]:
        """Files the manifest lists (``files``) that are gone or changed size since it was
        written: ``relative path -> what is wrong``. Files written later are not listed and
        need no check: every write is atomic."""
        m = self.read_manifest() if manifest is None else manifest
        listed = (m or {}).get("files") or {}
        out = {}
        for rel, size in listed.items():
            try:
                now = os.path.getsize(self.dir / rel)
            except OSError:
                out[rel] = "missing"
                continue
            if now != size:
                out[rel] = f"{now} bytes, the manifest says {size}"
        return out

    def repair(self) -> list[str]:
        """Delete what :meth:`damaged` found, and for a damaged item or extra map the image's
        main item too, so the image counts as not done and is computed again; a damaged
        ``model.pt`` is retrained from the last checkpoint. Returns the paths."""
        bad = self.damaged()
        for rel in bad:
            (self.dir / rel).unlink(missing_ok=True)
            parts = Path(rel).parts
            if parts[0] == "items":
                image_id = Path(parts[-1]).name[: -len(self.ext)] if parts[-1].endswith(self.ext) else None
                if image_id:
                    self.item_path(image_id).unlink(missing_ok=True)
        return sorted(bad)

    def clean_temp(self) -> int:
        """Remove the temp files of writes that were killed (call with the stage lock held)."""
        n = 0
        if self.dir.is_dir():
            for root, _, files in os.walk(self.dir):
                for name in files:
                    if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                        Path(root, name).unlink(missing_ok=True)
                        n += 1
        return n

    # ----------------------------------------------------------------- lock
    @property
    def lock_path(self) -> Path:
        # Beside the fingerprint folder, not in it: --force deletes that folder under the lock.
        return self.run_dir / self.stage / f".{self.fingerprint}.lock"

    @contextlib.contextmanager
    def locked(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold this stage fingerprint's lock (``flock``: the kernel drops it when the holder
        dies, so a killed run never leaves a stale lock). If another run holds it: block when
        ``wait`` (after calling ``on_wait`` with who holds it), else raise :class:`StageBusy`."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.lock_holder()
                if not wait:
                    raise StageBusy(
                        f"{self.stage} (fingerprint {self.fingerprint}) is being computed by another run "
                        f"({holder}); run again when it is done, or set lock: wait"
                    ) from None
                if on_wait is not None:
                    on_wait(
                        f"{self.stage} (fingerprint {self.fingerprint}) is being computed by another run "
                        f"({holder}); waiting for it"
                    )
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(
                fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0
            )
            yield
        finally:
            os.close(fd)  # releases the flock

    def lock_holder(self) -> str:
        try:
            rec = json.loads(self.lock_path.read_text() or "{}")
            since = time.strftime("%H:%M:%S", time.localtime(rec["since"]))
            return f"pid {rec['pid']} on {rec['host']}, since {since}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def bytes_on_disk(self) -> int:
        total = 0
        for root, _, files in os.walk(self.dir):
            for name in files:
                if name != "manifest.json":
                    total += os.path.getsize(os.path.join(root, name))
        return total

    def set_current(self) -> None:
        """Point ``<stage>/current`` at this fingerprint (atomic symlink swap)."""
        link = self.run_dir / self.stage / "current"
        tmp = link.with_name(f".current.{os.getpid()}.tmp")
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.symlink(self.fingerprint, tmp)
        os.replace(tmp, link)

"""Benchmark of the input stamps: what noticing an edited image costs per run, against a
content hash of the same files."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from .core import Case, bench


def _timed(work) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def _row(label: str, n: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "case": label,
        "images": n,
        "seconds": round(seconds, 4),
        "images_per_s": round(n / max(seconds, 1e-9), 1),
        "s_per_image": round(seconds / n, 7),
        **extra,
    }


@bench("stamps")
def bench_stamps(case: Case, image_kb: int = 100, **_: Any) -> list[dict[str, Any]]:
    """``case.images`` image + mask pairs (images of ``image_kb`` KB, masks of 2 KB, written to
    a temp folder): the stamps of every image (one ``stat`` per file, what each stage does per
    run), writing and reading the stage's ``inputs.json``, and a SHA-256 of the same files for
    comparison (page cache warm from writing them: a cold disk reads slower)."""
    import tempfile
    from pathlib import Path

    from ..config import MasksDataset, WeakConfig
    from ..datasets import MasksData
    from ..store import StageStore

    n = case.images
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="wsss-bench-") as tmp:
        root = Path(tmp) / "d"
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        blob, mask = rng.bytes(image_kb * 1024), rng.bytes(2048)
        for k in range(n):  # a file's bytes do not matter to a stat or a hash
            (root / "images" / f"{k:06d}.jpg").write_bytes(blob)
            (root / "masks" / f"{k:06d}.png").write_bytes(mask)
        data = MasksData(MasksDataset(root=str(root), val_fraction=0.0), WeakConfig(), "box")
        ids = data.ids("train")
        stamps: dict[str, str] = {}
        stamp_s = _timed(lambda: stamps.update({i: data.input_stamp(i) for i in ids}))
        store = StageStore(Path(tmp) / "run", "s", "f")
        write_s = _timed(lambda: store.write_stamps(stamps))
        read_s = _timed(store.read_stamps)

        def digest() -> None:
            for i in ids:
                for path in data.input_files(i):
                    with open(path, "rb") as f:
                        hashlib.file_digest(f, "sha256")

        hash_s = _timed(digest)
        size = store.stamps_path.stat().st_size
    return [
        _row("stamp: size + mtime (2 stat per image)", n, stamp_s),
        _row("inputs.json write + read", n, write_s + read_s, json_bytes=size),
        _row(f"content hash instead (sha256, {image_kb + 2} KB per image)", n, hash_s),
    ]

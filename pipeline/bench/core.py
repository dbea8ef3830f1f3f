"""What every benchmark shares: the :class:`Case`, the registry of measurements (one per
stage name, plus ``scale_out``), the child process each case runs in, the timers, and the
synthetic inputs.
"""

from __future__ import annotations


import resource
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import numpy as np

from ..processes import forkserver, stop_temporary_server


BENCHES: dict[str, Callable[..., list[dict[str, Any]]]] = {}


def tiny_training() -> dict[str, dict[str, Any]]:
    """Every registered stage's settings for a run in seconds (:attr:`stages.base.StageSpec.tiny`):
    the upstream of a per-image stage whose speed, not quality, is measured (``scale_out``),
    and the tests' tiny runs."""
    import stages
    from stages.base import STAGES

    stages.load_all()
    return {name: dict(STAGES.get(name).tiny) for name in STAGES.names() if STAGES.get(name).tiny}


@dataclass(frozen=True)
class Case:
    """What every measurement shares: the device, the torch / OpenCV threads, and the
    synthetic images (count and size). A measurement gets it plus its own named options."""

    device: str
    threads: int
    images: int
    height: int
    width: int

    def samples(self) -> list[tuple[np.ndarray, np.ndarray, Any]]:
        return demo_samples(self.images, self.height, self.width)

    def grid(self, stride: int = 8) -> tuple[int, int]:
        return -(-self.height // stride), -(-self.width // stride)

    def setup(self) -> None:
        """In the measuring process: the thread count for torch and OpenCV."""
        import cv2
        import torch

        torch.set_num_threads(self.threads)
        cv2.setNumThreads(self.threads)


def bench(name: str):
    def register(fn):
        BENCHES[name] = fn
        return fn

    return register


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child(fn, case, options, queue) -> None:
    try:
        case.setup()
        queue.put(("ok", fn(case, **options)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))
    finally:
        stop_temporary_server()


def in_child(fn: Callable, case: Case, **options: Any) -> dict[str, Any]:
    """Run ``fn(case, **options)`` in a child process (threads set from ``case``); its dict
    result carries the process's own peak memory."""
    ctx = forkserver()
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, case, options, queue))
    proc.start()
    status, out = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(out)
    return out


def measured(work: Callable[[], int], device: str, warmup: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Time ``work()`` (returns how many images it did) and read the peak memory."""
    import torch

    if warmup is not None:
        warmup()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    t0 = time.perf_counter()
    n = work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 3),
        "s_per_image": round(seconds / n, 4),
        "rss_before_mb": round(base, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    out["peak_over_start_mb"] = round(out["peak_rss_mb"] - base, 1)
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def measured_steps(loss_fn: Callable[[], Any], opt, steps: int, batch: int, device: str) -> dict[str, Any]:
    """Time ``steps`` optimiser steps on ``loss_fn()`` after one warm-up step; images = steps x batch."""

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return measured_repeat(step, steps, batch, device)


def measured_repeat(step: Callable[[], Any], steps: int, batch: int, device: str) -> dict[str, Any]:
    """Time ``steps`` calls of ``step()`` after one warm-up call; images = steps x batch."""

    def work() -> int:
        for _ in range(steps):
            step()
        return steps * batch

    return measured(work, device, warmup=step)


def demo_samples(n: int, height: int, width: int) -> list[tuple[np.ndarray, np.ndarray, Any]]:
    """(image, GT, weak labels) of ``n`` synthetic images of the given size."""
    from ..config import DemoDataset, WeakConfig
    from ..datasets import DemoData

    data = DemoData(DemoDataset(num_train=n, num_val=1, height=height, width=width), WeakConfig())
    return [(data.load_image(i), data.load_gt(i), data.load_weak(i)) for i in data.ids("train")]

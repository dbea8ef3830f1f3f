"""The process pool per-image work runs on: one shared pool per worker count, forked from the
preloaded server (:mod:`pipeline.processes`), its threads shared out, stopped on a signal.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from stages.base import StageContext, progress_bar

from .errors import PipelineError
from .processes import forkserver


def track(items: list, desc: str) -> Iterator:
    with progress_bar() as bar:
        task = bar.add_task(desc, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def set_threads(threads: int) -> None:
    """torch's thread count in this process (``threads: 0`` leaves it as it is)."""
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process the moment its parent ends (Linux
    ``PR_SET_PDEATHSIG``; elsewhere :mod:`pipeline.reaper` alone ends it): a worker of a killed
    run must not write on for seconds."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


PR_SET_PDEATHSIG = 1


def _worker_init(threads: int) -> None:
    # Ctrl-C reaches the whole process group; the main process ends the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    set_threads(threads)


@functools.lru_cache(maxsize=4)
def _pool(workers: int, threads: int) -> cf.ProcessPoolExecutor:
    # The workers share the cores: torch in each would otherwise start one thread per core.
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    return cf.ProcessPoolExecutor(workers, mp_context=forkserver(), initializer=_worker_init, initargs=(threads,))


def stop_workers() -> None:
    """End the worker processes at once (on SIGTERM / Ctrl-C): what they were writing is a
    temp file that the next run removes, so nothing finished is lost."""
    for pool in list(_POOLS):
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()


_POOLS: list[cf.ProcessPoolExecutor] = []


def close_pools() -> None:
    """Shut the shared pools down and forget them (a process that started them and is about
    to exit as a ``multiprocessing`` child, which would otherwise wait on their workers)."""
    for pool in list(_POOLS):
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()
    _pool.cache_clear()


def _in_process(workers: int, n_items: int) -> bool:
    """Whether work runs one item at a time in this process: one worker, one item, or inside
    a daemonic process (a Dask worker), which may not start processes of its own."""
    return workers <= 1 or n_items <= 1 or multiprocessing.current_process().daemon


def _shared_pool(workers: int, threads: int) -> cf.ProcessPoolExecutor:
    """The cached pool of ``workers``, registered so :func:`stop_workers` can end it."""
    pool = _pool(workers, threads)
    if pool not in _POOLS:
        _POOLS.append(pool)
    return pool


def _pool_died(err: BaseException, what: str) -> PipelineError:
    """The error for a broken pool (the cached one is dropped, the next call starts afresh)."""
    _pool.cache_clear()
    return PipelineError(f"{what}: a worker process died (out of memory or a crash in native code); rerun to resume")


def pool_map(fn: Callable[[Any], Any], items: list[Any], workers: int, threads: int = 0) -> list[Any]:
    """``[fn(x) for x in items]`` on the shared process pool of ``workers`` (see
    :func:`_in_process` for when it stays in this process); results in order."""
    if _in_process(workers, len(items)):
        return [fn(x) for x in items]
    try:
        return list(_shared_pool(workers, threads).map(fn, items))
    except cf.process.BrokenProcessPool as err:
        raise _pool_died(err, "pool job") from err


def process_mapper(
    fn: Callable[[StageContext, str], Any], ctx: StageContext, ids: list[str], desc: str
) -> Iterator[tuple[str, Any]]:
    """Run ``fn(ctx, id)`` over ids on ``ctx.workers`` processes with a progress bar; one
    at a time in this process inside a daemonic process (a Dask worker), which may not
    start processes of its own."""
    with progress_bar() as bar:
        task = bar.add_task(desc, total=len(ids))
        if _in_process(ctx.workers, len(ids)):
            for image_id in ids:
                try:
                    out: Any = fn(ctx, image_id)
                except Exception as err:  # noqa: BLE001 - a per-item failure, reported by the stage
                    out = err
                bar.advance(task)
                yield image_id, out
            return
        pool = _shared_pool(ctx.workers, ctx.config.threads)
        futures = {pool.submit(fn, ctx, image_id): image_id for image_id in ids}
        try:
            for fut in cf.as_completed(futures):
                bar.advance(task)
                err = fut.exception()
                if isinstance(err, cf.process.BrokenProcessPool):
                    died = _pool_died(err, ctx.stage)
                    raise PipelineError(f"{died}, or set workers: 1 to find the image") from err
                yield futures[fut], (err if err is not None else fut.result())
        finally:
            for fut in futures:
                fut.cancel()

"""Stage execution without Prefect: the DAG, fingerprints, and begin -> shards -> finish.

The Prefect flow (``pipeline/flow.py``) calls exactly these functions from its tasks; the
``local`` engine calls them directly. Tasks pass the config (JSON) and image ids, never
tensors; the store decides what is already done.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import stages  # noqa: F401  (importing the package registers every stage)
from models.metrics import confusion_matrix, scores
from stages.base import STAGES, DataError, StageContext, StageResult, StageSpec

from .config import Config, ConfigError, config_from_dict, dump_config
from .datasets import build_dataset
from .store import StageStore, atomic_write_text, fingerprint

log = logging.getLogger("wsss")


class PipelineError(RuntimeError):
    """A run that cannot go on, with a message for the user (missing upstream, dead worker)."""


# --------------------------------------------------------------------------- progress
def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


def track(items: list, desc: str) -> Iterator:
    with progress_bar() as bar:
        task = bar.add_task(desc, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


# --------------------------------------------------------------------------- parallel map
@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> cf.ProcessPoolExecutor:
    # forkserver: children start clean (no Prefect/torch threads inherited through fork).
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))


def process_mapper(fn: Callable[[StageContext, str], Any], ctx: StageContext, ids: list[str],
                   desc: str) -> Iterator[tuple[str, Any]]:
    """Run ``fn(ctx, id)`` over ids on ``ctx.workers`` processes with a progress bar."""
    with progress_bar() as bar:
        task = bar.add_task(desc, total=len(ids))
        if ctx.workers <= 1 or len(ids) <= 1:
            for image_id in ids:
                try:
                    out: Any = fn(ctx, image_id)
                except Exception as err:  # noqa: BLE001 - a per-item failure, reported by the stage
                    out = err
                bar.advance(task)
                yield image_id, out
            return
        pool = _pool(ctx.workers)
        futures = {pool.submit(fn, ctx, image_id): image_id for image_id in ids}
        try:
            for fut in cf.as_completed(futures):
                bar.advance(task)
                err = fut.exception()
                if isinstance(err, cf.process.BrokenProcessPool):
                    _pool.cache_clear()
                    raise PipelineError(f"{ctx.stage}: a worker process died (out of memory or a crash in "
                                       "native code); rerun to resume, or set workers: 1 to find the image") from err
                yield futures[fut], (err if err is not None else fut.result())
        finally:
            for fut in futures:
                fut.cancel()


# --------------------------------------------------------------------------- the run
def environment(device: str) -> dict[str, Any]:
    """Where a stage last ran. Trained stages are bit-reproducible for one environment; another
    torch build, CPU instruction set (AVX2 vs AVX512 kernels), thread count or GPU changes float
    rounding, and a from-scratch network then ends a point or two away."""
    import platform

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
                           "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Run:
    """A config bound to its dataset, its DAG and every stage's fingerprint."""

    config: Config
    dataset: Any
    dag: list[StageSpec]
    fingerprints: dict[str, str] = field(default_factory=dict)
    upstream: dict[str, list[str]] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.dag]

    def spec(self, name: str) -> StageSpec:
        if name not in self.names:
            raise ConfigError(f"stage '{name}' is not part of this run (supervision "
                              f"'{self.config.supervision}': {', '.join(self.names)})")
        return STAGES.get(name)

    def store(self, name: str) -> StageStore:
        return StageStore(self.run_dir, name, self.fingerprints[name], self.spec(name).output)

    def ids(self, name: str) -> list[str]:
        return self.dataset.ids(self.spec(name).split)

    def config_json(self) -> str:
        return self.config.model_dump_json()

    def downstream(self, name: str) -> list[str]:
        out, frontier = [], {name}
        for s in self.dag:
            if frontier & set(self.upstream[s.name]):
                out.append(s.name)
                frontier.add(s.name)
        return out


def build_dag(config: Config) -> tuple[list[StageSpec], dict[str, list[str]]]:
    """Registered stages that apply to the config's supervision, in registration order."""
    dag, upstream = [], {}
    for name in STAGES.names():
        spec = STAGES.get(name)
        if config.supervision not in spec.supervisions or not spec.enabled(config):
            continue
        inputs = spec.inputs(config)
        missing = [u for u in inputs if u not in upstream]
        if missing:
            raise ConfigError(f"stage '{name}' needs {missing}, which do not run for supervision "
                              f"'{config.supervision}'")
        dag.append(spec)
        upstream[name] = inputs
    if not dag:
        raise ConfigError(f"no stage is implemented yet for supervision '{config.supervision}' "
                          f"(registered: {', '.join(STAGES.names())})")
    return dag, upstream


def make_run(config: Config) -> Run:
    """Bind a config to its dataset (errors here stop before any work) and fingerprints."""
    dataset = build_dataset(config)
    dag, upstream = build_dag(config)
    for spec in dag:
        if spec.preflight is not None:
            try:
                spec.preflight(config)
            except (OSError, ValueError) as err:
                raise ConfigError(f"{spec.name}: {err}") from None
    run = Run(config, dataset, dag, upstream=upstream)
    data_fp = dataset.fingerprint()
    for spec in dag:
        run.fingerprints[spec.name] = fingerprint({
            "stage": spec.name, "version": spec.version, "config": config.section(spec.name),
            "seed": config.seed, "dataset": data_fp, "split": spec.split,
            "upstream": {u: run.fingerprints[u] for u in upstream[spec.name]},
        })
    return run


@functools.lru_cache(maxsize=8)
def run_from_json(config_json: str) -> Run:
    """Rebuild a run inside a task (cached per process)."""
    return make_run(config_from_dict(json.loads(config_json), "<task config>"))


def select(run: Run, only: list[str] | None = None, start: str | None = None, until: str | None = None) -> list[str]:
    """The stages to run, in DAG order: ``--only`` wins; else the span ``--from``..``--until``."""
    names = run.names
    for n in [*(only or []), start, until]:
        if n is not None:
            run.spec(n)
    if only:
        return [n for n in names if n in only]
    lo = names.index(start) if start else 0
    hi = names.index(until) if until else len(names) - 1
    if lo > hi:
        raise ConfigError(f"--from {start} comes after --until {until} in the DAG ({' -> '.join(names)})")
    return names[lo:hi + 1]


def forced(run: Run, force: list[str] | None) -> set[str]:
    """``--force S`` recomputes S and, since its outputs change, everything downstream of it."""
    out: set[str] = set()
    for name in force or []:
        run.spec(name)
        out |= {name, *run.downstream(name)}
    return out


# --------------------------------------------------------------------------- one stage
def done_ids(run: Run, name: str) -> set[str]:
    """Images whose output exists; a training stage has all or none (its ``model.pt``)."""
    spec, store = run.spec(name), run.store(name)
    if not spec.per_image:
        return set(run.ids(name)) if store.has_model() else set()
    return store.done_ids()


def shards(run: Run, name: str, todo: list[str]) -> list[list[str]]:
    """Per-image stages split into shards of ``shard_size``; a training stage is one shard."""
    if not todo:
        return []
    if not run.spec(name).per_image:
        return [todo]
    size = run.config.shard_size
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def stage_context(run: Run, name: str, ids: list[str], workers: int | None = None) -> StageContext:
    spec, store, cfg = run.spec(name), run.store(name), run.config
    n_workers = (os.cpu_count() or 1) if cfg.workers == 0 else cfg.workers
    if workers is not None:
        n_workers = workers
    if not spec.parallel:
        n_workers = 1
    return StageContext(
        stage=name, cfg=getattr(cfg, name, None), config=cfg, dataset=run.dataset, ids=run.ids(name), todo=list(ids),
        out=store, upstream={u: run.store(u) for u in run.upstream[name]}, device=resolve_device(cfg.device),
        workers=n_workers, mapper=process_mapper)


def begin_stage(run: Run, name: str, force: bool = False) -> list[str]:
    """Prepare the stage folder and return the image ids still to compute."""
    spec, store = run.spec(name), run.store(name)
    for up in run.upstream[name]:
        if not run.store(up).is_complete():
            raise PipelineError(f"{name} needs '{up}' (fingerprint {run.fingerprints[up]}), which has not been "
                               f"computed for this config; run without --only, or with --from {up}")
    if force and store.dir.exists():
        shutil.rmtree(store.dir)
    ids = run.ids(name)
    done = done_ids(run, name)
    todo = [i for i in ids if i not in done]
    manifest = store.read_manifest() or {
        "stage": name, "fingerprint": store.fingerprint, "created": time.time(),
    }
    manifest.update({
        "upstream": {u: run.fingerprints[u] for u in run.upstream[name]},
        "config": run.config.section(name), "code_version": spec.version, "output": spec.output,
        "split": spec.split, "status": "partial" if todo else manifest.get("status", "partial"),
        "counts": {"total": len(ids), "done": len(ids) - len(todo), "failed": 0},
        "environment": environment(resolve_device(run.config.device)),
    })
    store.write_manifest(manifest)
    store.set_current()
    return todo


def execute_stage(run: Run, name: str, ids: list[str], workers: int | None = None) -> StageResult:
    """Run the stage over ``ids`` (one shard); per-item failures are recorded in the store."""
    spec, store = run.spec(name), run.store(name)
    result = spec.run(stage_context(run, name, ids, workers))
    for image_id, message in result.failures.items():
        store.record_failure(image_id, message)
    return result


def evaluate_maps(run: Run, name: str, maps: list[str | None]) -> dict[str | None, dict[str, Any]]:
    """mIoU / coverage / precision against GT of a label stage's main map (``None``) and
    named extra maps, over the images it labeled; each GT is read once for all maps."""
    spec, store = run.spec(name), run.store(name)
    if spec.output not in ("label", "soft"):
        return {}
    c = run.dataset.num_classes
    conf = {m: np.zeros((c, c + 1), np.int64) for m in maps}
    seen = dict.fromkeys(maps, 0)
    for image_id in sorted(store.done_ids()):
        try:
            gt = run.dataset.load_gt(image_id)
        except DataError as err:
            log.warning("eval %s: %s", name, err)
            continue
        if gt is None:
            continue
        for m in maps:
            if m is not None and not store.has(image_id, m):
                continue
            pred = store.labels_of(image_id, m)
            if pred.shape != gt.shape:
                raise DataError(store.item_path(image_id, m), f"labels are {pred.shape[::-1]} but the GT of "
                                                              f"'{image_id}' is {gt.shape[::-1]}")
            conf[m] += confusion_matrix(pred, gt, c)
            seen[m] += 1
    return {m: {**scores(conf[m], run.dataset.class_names), "images": seen[m]} for m in maps if seen[m]}


def evaluate_store(run: Run, name: str, variant: str | None = None) -> dict[str, Any] | None:
    """The scores of one map of a stage (the main one by default), or None without GT."""
    return evaluate_maps(run, name, [variant]).get(variant)


def finish_stage(run: Run, name: str, results: list[StageResult], seconds: float, computed: int) -> dict[str, Any]:
    """Aggregate shards, score against GT, mark the manifest complete.

    ``computed``: how many images this run attempted (for the per-image timing).
    """
    spec, store = run.spec(name), run.store(name)
    ids = run.ids(name)
    done, failures = done_ids(run, name), store.failures()
    manifest = store.read_manifest() or {}
    missing = [i for i in ids if i not in done and i not in failures]
    timings = dict(manifest.get("timings", {}))
    timings["total_s"] = round(timings.get("total_s", 0.0) + seconds, 3)
    if computed:
        timings.update(last_run_s=round(seconds, 3), last_run_images=computed,
                       per_image_s=round(seconds / computed, 4))
    manifest.update({
        "status": "complete" if not missing else "partial",
        "counts": {"total": len(ids), "done": len(done & set(ids)), "failed": len(failures)},
        "failures": failures, "timings": timings, "bytes": store.bytes_on_disk(),
    })
    if spec.per_image and done:
        manifest["bytes_per_image"] = round(manifest["bytes"] / len(done))
    info = {k: v for r in results for k, v in r.info.items()}
    if info:
        manifest["info"] = info
    scored = evaluate_maps(run, name, [None, *spec.variants(run.config)])
    metrics = scored.pop(None, {})
    if scored:
        metrics["maps"] = scored
    for r in results:
        metrics.update(r.metrics)
    if spec.report is not None and not missing:
        metrics.update(spec.report(stage_context(run, name, [])))
    if metrics:
        manifest["metrics"] = metrics
    store.write_manifest(manifest)
    return manifest


def run_stage_local(run: Run, name: str, force: bool = False) -> dict[str, Any]:
    """begin -> one shard with the process pool -> finish, in this process."""
    store = run.store(name)
    if store.is_complete() and not force:
        return store.read_manifest() or {}
    t0 = time.time()
    todo = begin_stage(run, name, force)
    results = [execute_stage(run, name, todo)] if todo else []
    return finish_stage(run, name, results, time.time() - t0, len(todo))


def save_resolved_config(run: Run) -> Path:
    """Write the run's resolved config and point ``<stage>/current`` at the fingerprint this
    config uses for every stage it has complete (cached stages included)."""
    path = run.run_dir / "config.yaml"
    atomic_write_text(path, dump_config(run.config))
    for name in run.names:
        store = run.store(name)
        if store.is_complete():
            store.set_current()
    return path


def run_local(run: Run, names: list[str], force: set[str] | None = None) -> dict[str, dict[str, Any]]:
    save_resolved_config(run)
    return {n: run_stage_local(run, n, n in (force or set())) for n in names}


def pending(run: Run, names: list[str], force: set[str]) -> list[str]:
    """Stages that would do work (not complete, or forced)."""
    return [n for n in names if n in force or not run.store(n).is_complete()]

"""Stage execution without Prefect: the DAG, fingerprints, and begin -> shards -> finish.

The Prefect flow (``pipeline/flow.py``) calls exactly these functions from its tasks; the
``local`` engine calls them directly. Tasks pass the config (JSON) and image ids, never
tensors; the store decides what is already done.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np

import stages
from models.metrics import confusion_matrix, scores
from stages.base import STAGES, DataError, StageContext, StageResult, StageSpec, describe_error, progress_bar
from stages.methods import stage_runs

from .config import ConfigError, RunConfig, config_from_dict, dump_config
from .datasets import build_dataset
from .processes import forkserver

from .store import StageBusy, StageStore, atomic_write_text, fingerprint

stages.load_all()

log = logging.getLogger("wsss")


class PipelineError(RuntimeError):
    """A run that cannot go on, with a message for the user (missing upstream, dead worker)."""


class StageFailed(PipelineError):
    """A stage in which every image failed (downstream stages cannot run)."""

    def __init__(self, name: str, failures: dict[str, str]) -> None:
        self.name, self.failures = name, failures
        first = "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        super().__init__(f"{name}: every image failed, e.g. {first}{more}")

    def __reduce__(self) -> tuple[Any, tuple[str, dict[str, str]]]:
        return type(self), (self.name, self.failures)


# Top-level config fields that never change a result: they say where and how a run executes.
# Every other top-level field is a stage's own section or one of the fields a stage declares
# in ``StageSpec.reads`` (dataset, weak, seed, labels), which enter its fingerprint.
RESULT_NEUTRAL = {
    "run": "names the run folder",
    "output_root": "where run folders live",
    "device": "cpu / cuda: the same computation (float rounding aside, as recorded in the manifest's environment)",
    "workers": "how many processes share the per-image work",
    "shard_size": "how the per-image work is split into tasks",
    "engine": "prefect or local: the same stage functions",
    "task_runner": "how Prefect schedules the shards",
    "threads": "torch threads per process (float rounding aside, as recorded in the manifest's environment)",
    "dask": "where the Dask task runner's workers are",
    "lock": "what a second run does while another computes a stage",
    "min_usable": "when a training stage refuses to start; it never changes which images it uses",
    "notes": "lines the quality ladder prints beside a figure",
    "imports": "which modules register more methods and stages (each stage's results are in its own fingerprint)",
}


# --------------------------------------------------------------------------- progress
def track(items: list, desc: str) -> Iterator:
    with progress_bar() as bar:
        task = bar.add_task(desc, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


# --------------------------------------------------------------------------- parallel map
def set_threads(threads: int) -> None:
    """torch's thread count in this process (``threads: 0`` leaves it as it is)."""
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def _worker_init(threads: int) -> None:
    # Ctrl-C reaches the whole process group; the main process ends the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


# --------------------------------------------------------------------------- the run
def environment(device: str) -> dict[str, Any]:
    """Where a stage last ran. Trained stages are bit-reproducible for one environment; another
    torch build, processor (model or vendor: :func:`cpu_model`), instruction set (AVX2 vs AVX512
    kernels), thread count or GPU changes float rounding, and a from-scratch network then ends
    a point or two away."""
    import platform

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def cpu_model() -> str:
    """The processor's model name: MKL picks its matrix kernels by processor (vendor and
    instruction set), so the same torch build rounds MKL-backed ops (linear, bmm) apart on
    another CPU, while oneDNN's convolutions agree."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Run:
    """A config bound to its dataset, its DAG and every stage's fingerprint."""

    config: RunConfig
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
            raise ConfigError(
                f"stage '{name}' is not part of this run ({self.config.labels} "
                f"-> {self.config.method}: {', '.join(self.names)})"
            )
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


def build_dag(config: RunConfig) -> tuple[list[StageSpec], dict[str, list[str]]]:
    """The registered stages of the config's method and labels, ordered from their
    declared inputs (a topological order; ties keep registration order)."""
    specs = {name: STAGES.get(name) for name in STAGES.names()}
    upstream = {name: spec.inputs(config) for name, spec in specs.items() if stage_runs(spec, config)}
    if not upstream:
        raise ConfigError(
            f"no stage is implemented yet for method '{config.method}' on labels '{config.labels}' "
            f"(registered: {', '.join(STAGES.names())})"
        )
    for name, inputs in upstream.items():
        missing = [u for u in inputs if u not in upstream]
        if missing:
            raise ConfigError(
                f"stage '{name}' needs {missing}, which do not run for labels "
                f"'{config.labels}' and method '{config.method}'"
            )
    order: list[str] = []
    while len(order) < len(upstream):
        ready = [n for n in upstream if n not in order and all(u in order for u in upstream[n])]
        if not ready:
            cycle = sorted(n for n in upstream if n not in order)
            raise ConfigError(f"the stages {cycle} depend on each other in a cycle")
        order.append(ready[0])
    return [specs[n] for n in order], upstream


def make_run(config: RunConfig) -> Run:
    """Bind a config to its dataset (errors here stop before any work) and fingerprints."""
    unknown = sorted(set(config.notes) - set(STAGES.names()))
    if unknown:
        raise ConfigError(f"notes: '{unknown[0]}' is not a stage (stages: {', '.join(STAGES.names())})")
    dataset = build_dataset(config)
    dag, upstream = build_dag(config)
    for spec in dag:
        if spec.preflight is not None:
            try:
                spec.preflight(config)
            except (OSError, ValueError) as err:
                raise ConfigError(f"{spec.name}: {err}") from None
    run = Run(config, dataset, dag, upstream=upstream)
    reads = shared_reads(config, dataset)
    for spec in dag:
        run.fingerprints[spec.name] = fingerprint(
            fingerprint_payload(config, spec, reads, {u: run.fingerprints[u] for u in upstream[spec.name]})
        )
    return run


def shared_reads(config: RunConfig, dataset: Any) -> dict[str, Any]:
    """The values of the top-level fields a stage may declare in ``StageSpec.reads``:
    the dataset description, the weak-label settings with the content hash of the weak-label
    files the dataset reads, the seed and the label kind."""
    return {
        "dataset": dataset.fingerprint(),
        "seed": config.seed,
        "labels": config.labels,
        "weak": fingerprint({"settings": config.weak.model_dump(mode="json"), "files": dataset.weak_fingerprint()}),
    }


def fingerprint_payload(config: RunConfig, spec: StageSpec, reads: dict[str, Any], upstream: dict[str, str]) -> dict:
    """What a stage's fingerprint hashes: its name, code version, config section, split,
    the top-level fields it reads and its upstream fingerprints."""
    return {
        "stage": spec.name,
        "version": spec.version,
        "config": config.section(spec.name),
        "split": spec.split,
        "reads": {k: reads[k] for k in spec.reads},
        "upstream": upstream,
    }


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
    return names[lo : hi + 1]


def forced(run: Run, force: list[str] | None) -> set[str]:
    """``--force S`` recomputes S and, since its outputs change, everything downstream of it."""
    out: set[str] = set()
    for name in force or []:
        run.spec(name)
        out |= {name, *run.downstream(name)}
    return out


# --------------------------------------------------------------------------- one stage
def per_image_inputs(run: Run, name: str) -> list[str]:
    """Upstream stages with one output per image of this stage's split: an image missing
    from any of them cannot be computed (or trained on) here."""
    split = run.spec(name).split
    return [u for u in run.upstream[name] if run.spec(u).per_image and run.spec(u).split == split]


def done_ids(run: Run, name: str) -> set[str]:
    """Images whose output exists; for a training stage, the images it trained on once its
    ``model.pt`` exists (those it skipped are its failures)."""
    spec, store = run.spec(name), run.store(name)
    if not spec.per_image:
        return set(run.ids(name)) - set(store.failures()) if store.has_model() else set()
    return store.done_ids()


def shards(run: Run, name: str, todo: list[str]) -> list[list[str]]:
    """Per-image stages split into shards of ``shard_size``; a training stage is one shard."""
    if not todo:
        return []
    if not run.spec(name).per_image:
        return [todo]
    size = run.config.shard_size
    return [todo[i : i + size] for i in range(0, len(todo), size)]


def stage_context(run: Run, name: str, ids: list[str], workers: int | None = None) -> StageContext:
    """The context of one shard; a training stage's ``ids`` are the usable images it trains on."""
    spec, store, cfg = run.spec(name), run.store(name), run.config
    n_workers = (os.cpu_count() or 1) if cfg.workers == 0 else cfg.workers
    if workers is not None:
        n_workers = workers
    device = resolve_device(cfg.device)
    if not spec.parallel or (spec.parallel == "cpu" and device != "cpu"):
        n_workers = 1
    return StageContext(
        stage=name,
        section=getattr(cfg, name, None),
        config=cfg,
        dataset=run.dataset,
        ids=run.ids(name) if spec.per_image else list(ids),
        todo=list(ids),
        out=store,
        upstream={u: run.store(u) for u in run.upstream[name]},
        device=device,
        workers=n_workers,
        mapper=process_mapper,
        pool_map=functools.partial(pool_map, threads=cfg.threads),
    )


class Skipped(Exception):
    """An image a stage cannot use because an upstream stage failed on it."""


def skip_reason(upstream: str, message: str) -> str:
    """Why an image is skipped: the first stage's failure, not a chain of "skipped"."""
    return message if message.startswith("skipped: ") else f"skipped: {upstream} failed for it: {message}"


def check_usable(ctx: StageContext, image_id: str, upstreams: tuple[str, ...] = ()) -> None:
    """Raise if a training stage cannot use the image: no output in a per-image upstream
    stage (``upstreams``), an unreadable image, unreadable weak labels (stages that read
    them), or the stage's own ``usable`` check."""
    spec = STAGES.get(ctx.stage)
    for up in upstreams:
        if not ctx.upstream[up].has(image_id):
            raise Skipped(skip_reason(up, ctx.upstream[up].failures().get(image_id, "no output")))
    ctx.dataset.load_image(image_id)
    if "weak" in spec.reads:
        ctx.dataset.load_weak(image_id)
    if spec.usable is not None:
        spec.usable(ctx, image_id)


def usable_ids(run: Run, name: str, ids: list[str]) -> tuple[list[str], dict[str, str]]:
    """(usable ids, ``id -> reason`` for the others) of a training stage, checked in parallel."""
    ctx = stage_context(run, name, ids)
    ctx.workers = (os.cpu_count() or 1) if run.config.workers == 0 else run.config.workers
    check = functools.partial(check_usable, upstreams=tuple(per_image_inputs(run, name)))
    bad: dict[str, str] = {}
    for image_id, outcome in process_mapper(check, ctx, ids, f"{name}: checking inputs"):
        if isinstance(outcome, BaseException):
            bad[image_id] = str(outcome) if isinstance(outcome, Skipped) else f"skipped: {describe_error(outcome)}"
    return [i for i in ids if i not in bad], bad


class WorkKind(StrEnum):
    """Why a stage runs again."""

    FORCED = "forced"
    NOT_RUN = "not run"
    UNFINISHED = "unfinished"  # the manifest says partial (or failed)
    DAMAGED = "damaged"  # stored files missing or changed size
    RETRY = "retry"  # per-image: the failed images are retried
    RETRAIN = "retrain"  # training: skipped images became usable; everything downstream follows


@dataclass(frozen=True)
class Work:
    """What :func:`needs_work` found: its kind and one line for the log."""

    kind: WorkKind
    why: str


def needs_work(run: Run, name: str, force: bool = False) -> Work | None:
    """Why the stage must run now, or None when its stored outputs can be used as they are.

    Failures are not results: a stage with failed images retries them (only them); a
    training stage that skipped images retrains, with everything downstream, once one of
    them has become usable. Damaged files (missing, changed size) are recomputed.
    """
    spec, store = run.spec(name), run.store(name)
    m = store.read_manifest()
    if force:
        return Work(WorkKind.FORCED, "forced")
    if m is None:
        return Work(WorkKind.NOT_RUN, "not run")
    if m.get("status") != "complete":
        return Work(WorkKind.UNFINISHED, str(m.get("status", "partial")))
    bad = store.damaged(m)
    if bad:
        return Work(
            WorkKind.DAMAGED, f"{len(bad)} damaged file(s), e.g. {next(iter(bad))} ({next(iter(bad.values()))})"
        )
    failed = store.failures()
    if not failed:
        return None
    if spec.per_image:
        return Work(WorkKind.RETRY, f"retrying {len(failed)} failed image(s)")
    now_usable, _ = usable_ids(run, name, sorted(failed))
    return Work(WorkKind.RETRAIN, f"retrain: {len(now_usable)} skipped image(s) now usable") if now_usable else None


def begin_stage(run: Run, name: str, force: bool = False) -> list[str]:
    """Prepare the stage folder and return the image ids still to compute (a training
    stage: the usable images, or none when its model exists). Call with the stage lock held."""
    spec, store = run.spec(name), run.store(name)
    for up in run.upstream[name]:
        if not run.store(up).is_complete():
            raise PipelineError(
                f"{name} needs '{up}' (fingerprint {run.fingerprints[up]}), which has not been "
                f"computed for this config; run without --only, or with --from {up}"
            )
    if force and store.dir.exists():
        shutil.rmtree(store.dir)
    store.clean_temp()
    for rel in store.repair():
        log.warning("%s: %s was missing or damaged; computing it again", name, rel)
    ids = run.ids(name)
    if spec.per_image:
        done = store.done_ids()
        todo = [i for i in ids if i not in done]
        blocked = upstream_failures(run, name, todo)
    else:
        todo, blocked = ([], {}) if store.has_model() else usable_ids(run, name, ids)
        if len(todo) < run.config.min_usable * len(ids) and not store.has_model():
            first = "; ".join(f"{k}: {v}" for k, v in list(blocked.items())[:3])
            raise PipelineError(
                f"{name}: only {len(todo)} of {len(ids)} {spec.split} images are usable, below "
                f"min_usable {run.config.min_usable} (e.g. {first})"
            )
    for image_id in ids:
        if image_id in blocked:
            store.record_failure(image_id, blocked[image_id])
        elif image_id in todo:
            store.clear_failure(image_id)
    if spec.per_image:
        todo = [i for i in todo if i not in blocked]
    manifest = store.read_manifest() or {
        "stage": name,
        "fingerprint": store.fingerprint,
        "created": time.time(),
    }
    manifest.update(
        {
            "upstream": {u: run.fingerprints[u] for u in run.upstream[name]},
            "config": run.config.section(name),
            "code_version": spec.version,
            "output": spec.output,
            "split": spec.split,
            "status": "partial" if todo else manifest.get("status", "partial"),
            "counts": {"total": len(ids), "done": len(done_ids(run, name) & set(ids)), "failed": len(store.failures())},
            "environment": environment(resolve_device(run.config.device)),
        }
    )
    store.write_manifest(manifest)
    store.set_current()
    return todo


def upstream_failures(run: Run, name: str, todo: list[str]) -> dict[str, str]:
    """``id -> reason`` for the images of ``todo`` that a per-image upstream stage has no
    output for (it failed on them): they are recorded as failed here without any work."""
    out: dict[str, str] = {}
    for up in per_image_inputs(run, name):
        store = run.store(up)
        done, failed = store.done_ids(), None
        for image_id in todo:
            if image_id not in done and image_id not in out:
                failed = store.failures() if failed is None else failed
                out[image_id] = skip_reason(up, failed.get(image_id, "no output"))
    return out


def execute_stage(run: Run, name: str, ids: list[str], workers: int | None = None) -> StageResult:
    """Run the stage over ``ids`` (one shard); per-item failures are recorded in the store."""
    spec, store = run.spec(name), run.store(name)
    set_threads(run.config.threads)
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
                raise DataError(
                    store.item_path(image_id, m),
                    f"labels are {pred.shape[::-1]} but the GT of '{image_id}' is {gt.shape[::-1]}",
                )
            conf[m] += confusion_matrix(pred, gt, c)
            seen[m] += 1
    return {m: {**scores(conf[m], run.dataset.class_names), "images": seen[m]} for m in maps if seen[m]}


def evaluate_store(run: Run, name: str, variant: str | None = None) -> dict[str, Any] | None:
    """The scores of one map of a stage (the main one by default), or None without GT."""
    return evaluate_maps(run, name, [variant]).get(variant)


def process_name() -> str:
    """``host:pid`` of this process: where a shard ran (the manifest's ``ran_on``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def finish_stage(
    run: Run, name: str, results: list[StageResult], seconds: float, computed: int, ran_on: list[str] | None = None
) -> dict[str, Any]:
    """Aggregate shards, score against GT, mark the manifest complete.

    ``computed``: how many images this run attempted (for the per-image timing); ``ran_on``:
    the processes its shards ran in (:func:`process_name`), recorded when it computed any.
    """
    spec, store = run.spec(name), run.store(name)
    ids = run.ids(name)
    done, failures = done_ids(run, name), store.failures()
    manifest = store.read_manifest() or {}
    missing = [i for i in ids if i not in done and i not in failures]
    timings = dict(manifest.get("timings", {}))
    timings["total_s"] = round(timings.get("total_s", 0.0) + seconds, 3)
    if computed:
        timings.update(last_run_s=round(seconds, 3), last_run_images=computed, per_image_s=round(seconds / computed, 4))
        manifest["ran_on"] = sorted(set(ran_on or []))
    if missing:
        status = "partial"
    else:  # every image attempted; a stage with nothing to show for it has failed
        status = "failed" if failures and not done & set(ids) else "complete"
    manifest.update(
        {
            "status": status,
            "counts": {"total": len(ids), "done": len(done & set(ids)), "failed": len(failures)},
            "failures": failures,
            "timings": timings,
            "bytes": store.bytes_on_disk(),
        }
    )
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
    for warning in degenerate(name, metrics):
        log.warning("%s", warning)
    manifest["files"] = store.inventory()  # what status and the next run check (see StageStore.damaged)
    store.write_manifest(manifest)
    return manifest


def degenerate(name: str, metrics: dict[str, Any]) -> list[str]:
    """Warnings for label maps that lost a class the GT has (no background at all, say)."""
    out = []
    for label, m in [(name, metrics), *((f"{name}/{v}", sub) for v, sub in metrics.get("maps", {}).items())]:
        if m.get("lost"):
            out.append(
                f"{label}: no pixel is labelled {', '.join(m['lost'])}, although the ground truth has "
                f"{'it' if len(m['lost']) == 1 else 'them'}: these labels are degenerate"
            )
    return out


def run_stage_local(run: Run, name: str, force: bool = False) -> dict[str, Any]:
    """begin -> one shard with the process pool -> finish, in this process; a stage whose
    outputs can be used as they are is returned as it is (see :func:`needs_work`)."""
    if needs_work(run, name, force) is None:
        return run.store(name).read_manifest() or {}
    return _execute_local(run, name, force)


def run_stages(
    run: Run,
    names: list[str],
    force: set[str] | None = None,
    execute: Callable[[Run, str, bool], dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The stage loop both engines share: each stage under its fingerprint's lock (a second
    run waits, or with ``lock: refuse`` stops, and then finds the stage done), skipped when
    :func:`needs_work` says its outputs stand, else run by ``execute(run, name, force)``
    (default: in this process). A training stage retrained because skipped images became
    usable takes everything downstream with it. A stage in which every image failed stops
    the run (:class:`StageFailed`)."""
    execute = execute or _execute_local
    forced_now = set(force or ())
    save_resolved_config(run)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        store = run.store(name)
        try:
            with store.locked(wait=run.config.lock == "wait", on_wait=log.warning):
                work = needs_work(run, name, name in forced_now)
                if work is None:
                    out[name] = store.read_manifest() or {}
                    continue
                if work.kind is WorkKind.RETRAIN:
                    log.warning(
                        "%s: %s; training again (and recomputing %s)",
                        name,
                        work.why,
                        ", ".join(run.downstream(name)) or "nothing downstream",
                    )
                    forced_now.add(name)
                    for down in run.downstream(name):
                        forced_now.add(down)
                        if down not in names and run.store(down).dir.exists():
                            shutil.rmtree(run.store(down).dir)
                elif work.kind is not WorkKind.NOT_RUN:
                    log.info("%s: %s", name, work.why)
                out[name] = execute(run, name, name in forced_now)
        except StageBusy as err:
            raise PipelineError(str(err)) from None
        if out[name].get("status") == "failed":
            raise StageFailed(name, out[name].get("failures", {}))
    return out


def _execute_local(run: Run, name: str, force: bool) -> dict[str, Any]:
    t0 = time.time()
    todo = begin_stage(run, name, force)
    results = [execute_stage(run, name, todo)] if todo else []
    return finish_stage(run, name, results, time.time() - t0, len(todo), [process_name()])


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
    return run_stages(run, names, force)


def pending(run: Run, names: list[str], force: set[str]) -> list[str]:
    """Stages that would do work now (see :func:`needs_work`)."""
    return [n for n in names if needs_work(run, n, n in force) is not None]

"""Stage execution without Prefect: the DAG, fingerprints, and begin -> shards -> finish.

The Prefect flow (``pipeline/flow.py``) calls exactly these functions from its tasks; the
``local`` engine calls them directly. Tasks pass the config (JSON) and image ids, never
tensors; the store decides what is already done.

The pieces live beside it: :mod:`pipeline.dag` (the run, its DAG and selections),
:mod:`pipeline.fingerprints`, :mod:`pipeline.pool` (the process pool) and
:mod:`pipeline.scoring`; this module is the stage lifecycle and re-exports them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from stages.base import STAGES, StageContext, StageResult, describe_error

from .config import dump_config
from .dag import Run, build_dag, cpu_model, environment, forced, make_run, resolve_device, run_from_json, select  # noqa: F401 (re-exported)
from .errors import PipelineError, StageFailed  # noqa: F401 (re-exported)
from .fingerprints import RESULT_NEUTRAL, fingerprint_payload, shared_reads  # noqa: F401 (re-exported)
from .pool import pool_map, process_mapper, set_threads, stop_workers, track  # noqa: F401 (re-exported)
from .scoring import agreement, degenerate, evaluate_maps, evaluate_store  # noqa: F401 (re-exported)
from .store import StageBusy, atomic_write_text

log = logging.getLogger("wsss")


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


SHARDS_PER_SLOT = 4  # shards per process that runs them: a slow shard is a quarter of a slot's work
MIN_SHARD = 16  # images: below this a shard's task-run overhead (tens of ms) shows


def shard_size(run: Run, n: int) -> int:
    """Images per shard of a stage with ``n`` to do: ``shard_size``, or with ``auto``
    ``SHARDS_PER_SLOT`` shards per slot (the thread runner's one process pool; ``workers``
    processes; the Dask cluster's workers), at least ``MIN_SHARD`` images each: a stage pays
    its task-run overhead a handful of times at any dataset size, not once per 16 images."""
    cfg = run.config
    if cfg.shard_size != "auto":
        return cfg.shard_size
    if cfg.task_runner == "dask":
        slots = cfg.dask.n_workers * cfg.dask.threads_per_worker
    elif cfg.task_runner == "process":
        slots = (os.cpu_count() or 1) if cfg.workers == 0 else cfg.workers
    else:
        slots = 1
    return max(MIN_SHARD, -(-n // (SHARDS_PER_SLOT * slots)))


def shards(run: Run, name: str, todo: list[str]) -> list[list[str]]:
    """Per-image stages split into shards (:func:`shard_size`); a training stage is one shard."""
    if not todo:
        return []
    if not run.spec(name).per_image:
        return [todo]
    size = shard_size(run, len(todo))
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
    EDITED = "edited"  # input files of images changed: their items again (training: all, and downstream)


@dataclass(frozen=True)
class Work:
    """What :func:`needs_work` found: its kind and one line for the log."""

    kind: WorkKind
    why: str


def input_stamps(run: Run, name: str) -> dict[str, str]:
    """``image id -> Dataset.input_stamp`` for the stage's images; empty for synthetic data.
    Within :func:`stamps_once` each split is stamped once."""
    split, cache = run.spec(name).split, run.stamp_cache
    if cache is not None and split in cache:
        return cache[split]
    ids = run.ids(name)
    stamps = {i: run.dataset.input_stamp(i) for i in ids} if ids and run.dataset.input_files(ids[0]) else {}
    if cache is not None:
        cache[split] = stamps
    return stamps


@contextlib.contextmanager
def stamps_once(run: Run) -> Iterator[None]:
    """Stamp each split's input files once for the commands inside (a run's skip decisions
    and stage starts): a file edited meanwhile is stamped as it was, so the next run
    computes its image again, never less."""
    outer = run.stamp_cache
    run.stamp_cache = {} if outer is None else outer
    try:
        yield
    finally:
        run.stamp_cache = outer


def edited_ids(
    run: Run, name: str, stamps: dict[str, str] | None = None, recorded: dict[str, str] | None = None
) -> list[str]:
    """The stage's images whose input files changed since it computed them (a failed image
    has nothing computed from its old files: it is retried as a failure). ``stamps`` /
    ``recorded``: the current and the stored stamps, where the caller has them."""
    store = run.store(name)
    recorded = store.read_stamps() if recorded is None else recorded
    if not recorded:
        return []
    stamps = input_stamps(run, name) if stamps is None else stamps
    edited = [i for i, stamp in stamps.items() if i in recorded and recorded[i] != stamp]
    if edited:
        failed = store.failures()
        edited = [i for i in edited if i not in failed]
    return edited


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
    edited = edited_ids(run, name)
    if edited:
        return Work(WorkKind.EDITED, f"{len(edited)} image(s) whose files changed since it ran, e.g. {edited[0]}")
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
    stamps = input_stamps(run, name)
    recorded = store.read_stamps() if stamps else {}
    edited = edited_ids(run, name, stamps, recorded)
    if edited and spec.per_image:
        for image_id in edited:
            store.remove_item(image_id)
            store.clear_failure(image_id)
    elif edited:  # the model learnt from the old files (run_stages forces everything downstream)
        store.drop_model()
    if stamps and any(recorded.get(i) != stamp for i, stamp in stamps.items()):
        store.write_stamps({**recorded, **stamps})
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
    for image_id, reason in blocked.items():
        store.record_failure(image_id, reason)
    pending = set(todo)
    for image_id in store.failures():
        if image_id in pending and image_id not in blocked:
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
    ctx = stage_context(run, name, ids, workers)
    result = spec.run(ctx)
    result.work_s = ctx.work_s
    for image_id, message in result.failures.items():
        store.record_failure(image_id, message)
    return result


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
        work = sum(r.work_s for r in results)
        if work:  # a per-item stage: what its items took, the rest of last_run_s is orchestration
            timings["last_run_work_s"] = round(work, 3)
        else:
            timings.pop("last_run_work_s", None)
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
    per_image: dict[str, dict[str, float]] = {}
    scored = evaluate_maps(run, name, [None, *spec.variants(run.config)], per_image)
    if per_image:  # what the ladder holds against the map a stage starts from
        manifest["image_miou"] = per_image
    else:
        manifest.pop("image_miou", None)
    agreed = agreement(run, name) if not missing else {}
    if agreed:  # the same without GT: what `status` and `export` list for a person to check
        manifest["image_agreement"] = agreed
    else:
        manifest.pop("image_agreement", None)
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
    with stamps_once(run):
        return _run_stages(run, names, set(force or ()), execute or _execute_local)


def _run_stages(
    run: Run, names: list[str], forced_now: set[str], execute: Callable[[Run, str, bool], dict[str, Any]]
) -> dict[str, dict[str, Any]]:
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
                if work.kind is WorkKind.RETRAIN or (work.kind is WorkKind.EDITED and not run.spec(name).per_image):
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
    with stamps_once(run):
        return [n for n in names if needs_work(run, n, n in force) is not None]

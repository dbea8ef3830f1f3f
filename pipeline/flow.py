"""The Prefect flow: one task per stage step, per-image stages mapped over shards of images.

Prefect orchestrates; it is not the cache (every task has ``NO_CACHE``): the artifact store
decides what is done. Tasks receive the config as JSON and lists of image ids, and return
small dicts, never tensors. With ``task_runner: thread`` shards run one after another and
each uses a process pool of ``workers``; with ``task_runner: process`` shards run in
parallel processes (one image at a time each); with ``task_runner: dask`` they run on the
workers of a Dask cluster (``pipeline/cluster.py``), one image at a time each.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from stages.base import DataError

from .cluster import dask_task_runner, placement
from .config import ConfigError
from .errors import WRITE_ERRNOS, PipelineError, cannot_write
from .runner import begin_stage, execute_stage, finish_stage, process_name, run_from_json, run_stages, shards


# Task runs are named "<stage>/begin", "<stage>/shard-<k>", "<stage>/finish" in the UI.
@task(name="begin", task_run_name="{name}/begin", cache_policy=NO_CACHE)
def begin_task(config_json: str, name: str, force: bool) -> list[str]:
    return begin_stage(run_from_json(config_json), name, force)


@task(name="shard", task_run_name="{name}/shard-{index}", cache_policy=NO_CACHE)
def shard_task(config_json: str, name: str, index: int, ids: list[str], workers: int | None) -> dict[str, Any]:
    result = execute_stage(run_from_json(config_json), name, ids, workers=workers)
    return {
        "failures": result.failures,
        "info": result.info,
        "metrics": result.metrics,
        "work_s": result.work_s,
        "ran_on": process_name(),
    }


@task(name="finish", task_run_name="{name}/finish", cache_policy=NO_CACHE)
def finish_task(
    config_json: str, name: str, shard_results: list[dict[str, Any]], seconds: float, computed: int
) -> dict[str, Any]:
    from stages.base import StageResult

    run = run_from_json(config_json)
    results = [StageResult(r["failures"], r["info"], r["metrics"], r["work_s"]) for r in shard_results]
    manifest = finish_stage(run, name, results, seconds, computed, [r["ran_on"] for r in shard_results])
    publish(run.config.run, name, manifest)
    return manifest


def artifact_key(run_name: str, stage: str, what: str) -> str:
    """``<run>-<stage>-<what>`` in the lowercase letters, digits and dashes Prefect keys allow."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{run_name}-{stage}-{what}".lower())).strip("-")


def publish(run_name: str, name: str, manifest: dict[str, Any]) -> None:
    """Stage metrics as Prefect artifacts (they show in the UI next to the flow run), keyed
    by run and stage so two runs' artifacts stay apart."""
    key = artifact_key(run_name, name, "metrics")
    metrics = manifest.get("metrics") or {}
    rows = [{"class": k, "iou": None if v is None else round(v, 4)} for k, v in metrics.get("iou", {}).items()]
    if rows:
        create_table_artifact(key=key, table=rows, description=f"{name}: per-class IoU")
    counts = manifest.get("counts", {})
    lines = [
        f"### {name} `{manifest.get('fingerprint')}`",
        "",
        f"- images: {counts.get('done')}/{counts.get('total')} done, {counts.get('failed')} failed",
    ]
    for k in ("miou", "coverage", "precision", *(k for k in metrics if k.startswith("mAP@"))):
        if k in metrics:
            lines.append(f"- {k}: {metrics[k]:.4f}")
    for variant, sub in metrics.get("maps", {}).items():
        lines.append(f"- {variant}: mIoU {sub['miou']:.4f}")
    create_markdown_artifact(key=f"{key}-summary", markdown="\n".join(lines), description=f"{name} summary")


@flow(name="wsss", log_prints=True)
def wsss_flow(config_json: str, names: list[str], force: list[str]) -> dict[str, Any]:
    run = run_from_json(config_json)
    # Shards in parallel processes open no process pool of their own: one image at a time.
    parallel_shards = run.config.task_runner in ("process", "dask")

    def execute(run, name: str, forced: bool) -> dict[str, Any]:
        t0 = time.time()
        todo = begin_task(config_json, name, forced)
        parts = shards(run, name, todo)
        with placement(run.config, run.spec(name).per_image):
            futures = (
                shard_task.map(config_json, name, list(range(len(parts))), parts, 1 if parallel_shards else None)
                if parts
                else []
            )
        results = [f.result() for f in futures]
        return finish_task(config_json, name, results, time.time() - t0, len(todo))

    # The loop, the locks and the skip decisions are the local engine's (runner.run_stages).
    return run_stages(run, names, set(force), execute)


class ReportedInOneLine(logging.Filter):
    """Drops Prefect's log of a failed task or flow run (with its traceback) when the error
    is one the CLI reports in one line: bad data or config, a run that cannot go on, a disk
    that refused a write."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, DataError | ConfigError | PipelineError):
            return False
        if cannot_write(err) is not None:
            return False
        # the failed state's one-line summary names the exception's type, not the exception
        message = record.getMessage()
        return not (message.startswith("Finished in state Failed") and ONE_LINE_ERRORS.search(message))


ONE_LINE_ERRORS = re.compile(
    r"exception (DataError|DamagedFile|UnsafeFile|ConfigError|PipelineError|StageFailed|CannotWrite|"
    rf"OSError: \[Errno ({'|'.join(str(e) for e in sorted(WRITE_ERRNOS))})\])"
)


ONE_LINE = ReportedInOneLine()


def run_prefect(run, names: list[str], force: set[str]) -> dict[str, Any]:
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.flow_engine", "prefect.task_engine"):
        if ONE_LINE not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(ONE_LINE)
    cfg = run.config
    if cfg.task_runner == "dask":
        with dask_task_runner(cfg) as runner:
            return _run_flow(run, names, force, runner)
    workers = (os.cpu_count() or 1) if cfg.workers == 0 else cfg.workers
    runner = (
        ProcessPoolTaskRunner(max_workers=workers)
        if cfg.task_runner == "process"
        else ThreadPoolTaskRunner(max_workers=1)
    )
    return _run_flow(run, names, force, runner)


def _run_flow(run, names: list[str], force: set[str], runner) -> dict[str, Any]:
    return wsss_flow.with_options(task_runner=runner, flow_run_name=f"{run.config.run}")(
        run.config_json(), names, sorted(force)
    )

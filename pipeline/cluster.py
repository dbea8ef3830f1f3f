"""``task_runner: dask``: Prefect's ``DaskTaskRunner`` (prefect-dask) on a Dask cluster.

Prefect still maps every per-image stage over shards of images; Dask places the shard tasks
on its workers (one shard per worker thread). The cluster is either an existing scheduler
(``dask.address``) or a local one started for the run (``dask.n_workers`` processes).

- **The store is the hand-off.** A shard reads its upstream stages' items and writes its own
  from whichever worker it lands on, so every worker must see the dataset, the weights files
  and ``output_root`` at the same (relative or absolute) paths: a shared filesystem, and the
  workers started in the directory the run is started in when the config's paths are
  relative. :func:`check_workers` writes a probe file into the run folder and asks every
  worker to read it back (and to write beside it) before any work starts.
- **Daemonic workers.** A Dask worker process may not start processes of its own, so a shard
  there computes one image at a time (``runner.process_mapper`` sees the daemonic process).
- **Threads.** The nanny sets ``OMP_NUM_THREADS=1`` in its workers; a local cluster sets
  ``cores / (n_workers x threads_per_worker)`` instead, and ``threads`` in the config, when
  set, wins everywhere (so the same config gives the same float rounding under either engine;
  the manifest records the thread count a stage ran with).
- **GPU placement.** ``dask.resources`` (e.g. ``{GPU: 1}``) is asked for by the training
  stages' tasks, so they land on workers started with ``--resources GPU=1``.
- **A worker that dies** mid-shard loses only the item it was writing (items are written to a
  temp file and renamed); Dask runs the shard again elsewhere, or the run stops and the next
  run computes only the images without an item.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from .config import RunConfig
from .runner import PipelineError


def local_threads(config: RunConfig) -> int:
    """torch threads of each local-cluster worker: ``threads``, else the cores shared out."""
    d = config.dask
    return config.threads or max(1, (os.cpu_count() or 1) // (d.n_workers * d.threads_per_worker))


def shared_paths(config: RunConfig) -> list[str]:
    """The paths every worker must see: the dataset root and weak-label folder, and any
    weights file a stage loads."""
    paths = [getattr(config.dataset, key, None) for key in ("root", "weak_dir")]
    for name in type(config).model_fields:
        weights = getattr(getattr(config, name), "weights", None)
        if isinstance(weights, str) and weights not in ("none", "imagenet"):
            paths.append(weights)
    return [p for p in paths if p]


def _probe(paths: list[str], probe: str, token: str) -> list[str]:
    """On a worker: what it cannot see (paths, the probe file) or write (the run folder)."""
    problems = [f"{p} does not exist (worker cwd {os.getcwd()})" for p in paths if not os.path.exists(p)]
    try:
        if Path(probe).read_text() != token:
            problems.append(f"{probe} holds another run's token: not the same filesystem as the run's")
    except OSError as err:
        problems.append(f"cannot read {probe}, written by the run ({err.strerror}; worker cwd {os.getcwd()})")
        return problems
    mine = Path(probe).with_name(f".dask-probe-{token}-{os.getpid()}")
    try:
        mine.write_text(token)
        mine.unlink()
    except OSError as err:
        problems.append(f"cannot write in {mine.parent} ({err.strerror})")
    return problems


def check_workers(client: Any, config: RunConfig) -> None:
    """Fail before any work when a worker cannot see the dataset or the run folder, or when
    no worker offers the resources the training stages ask for."""
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = run_dir / f".dask-probe-{token}"
    probe.write_text(token)
    try:
        answers = client.run(_probe, shared_paths(config), str(probe), token)
    finally:
        probe.unlink(missing_ok=True)
    bad = {worker: problems for worker, problems in answers.items() if problems}
    if bad:
        lines = "; ".join(f"{worker}: {', '.join(problems)}" for worker, problems in sorted(bad.items()))
        raise PipelineError(
            f"task_runner dask: {len(bad)} of {len(answers)} workers cannot use the run's files "
            f"(the dataset and output_root must be on a filesystem every worker shares, at the "
            f"same paths): {lines}"
        )
    wanted = config.dask.resources
    if wanted:
        offered = [w.get("resources", {}) for w in client.scheduler_info(n_workers=-1)["workers"].values()]
        if not any(all(r.get(k, 0) >= v for k, v in wanted.items()) for r in offered):
            raise PipelineError(
                f"task_runner dask: the training stages ask for resources {dict(wanted)}, which no "
                f"worker offers (start one with `dask worker ADDRESS --resources "
                f"{','.join(f'{k}={v:g}' for k, v in wanted.items())}`), or drop dask.resources"
            )


@contextlib.contextmanager
def dask_task_runner(config: RunConfig) -> Iterator[Any]:
    """A ``DaskTaskRunner`` on ``dask.address``, or on a local cluster that lives for the run;
    the workers are checked (:func:`check_workers`) before it is handed out."""
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    d = config.dask
    with contextlib.ExitStack() as stack:
        if d.address:
            address = d.address
        else:
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=d.n_workers,
                    threads_per_worker=d.threads_per_worker,
                    processes=True,
                    resources=dict(d.resources) or None,
                    dashboard_address=None,
                    env={"OMP_NUM_THREADS": str(local_threads(config))},
                )
            )
            address = cluster.scheduler_address
        try:
            client = stack.enter_context(Client(address, timeout=d.connect_timeout, set_as_default=False))
            client.wait_for_workers(1, timeout=d.connect_timeout)
        except (OSError, TimeoutError) as err:
            raise PipelineError(
                f"task_runner dask: no worker at the scheduler {address} within "
                f"{d.connect_timeout:g} s ({type(err).__name__}: {err})"
            ) from None
        check_workers(client, config)
        yield DaskTaskRunner(address=address)


def placement(config: RunConfig, per_image: bool) -> contextlib.AbstractContextManager:
    """The Dask annotation a stage's tasks are submitted under: a training stage asks for
    ``dask.resources`` (a GPU worker); everything else goes anywhere."""
    if config.task_runner != "dask" or per_image or not config.dask.resources:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=dict(config.dask.resources))

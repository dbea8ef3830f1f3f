"""Benchmark of orchestration: a stage's wall time over engines, task runners and workers."""

from __future__ import annotations


import time
from typing import Any


from .core import Case, bench, tiny_training


def _timed_stage(data: dict[str, Any], stage: str, label: str) -> dict[str, Any]:
    """Recompute ``stage`` under the config ``data``; its manifest's timing (begin to finish,
    without Prefect's or the cluster's start) and the wall time with them."""
    from ..config import config_from_dict
    from ..runner import make_run, run_local

    run = make_run(config_from_dict(data, "<bench>"))
    t0 = time.perf_counter()
    if run.config.engine == "prefect":
        from ..flow import run_prefect

        run_prefect(run, [stage], {stage})
    else:
        run_local(run, [stage], {stage})
    wall = time.perf_counter() - t0
    manifest = run.store(stage).read_manifest()
    n, seconds = manifest["timings"]["last_run_images"], manifest["timings"]["last_run_s"]
    return {
        "case": label,
        "images": n,
        "seconds": seconds,
        "images_per_s": round(n / seconds, 3),
        "s_per_image": round(seconds / n, 4),
        "wall_s_with_startup": round(wall, 1),
        "processes": len(manifest.get("ran_on", [])),
    }


@bench("scale_out")
def bench_scale_out(
    case: Case, stage: str = "crf", workers: tuple[int, ...] = (1, 2), shard_size: int = 1, **_: Any
) -> list[dict[str, Any]]:
    """Images/s of one per-image stage (``stage``: crf, graph, a2gnn, box_seeds, ...) on
    ``case.images`` demo images at the case size, in one run: the local engine with a process
    pool of each ``workers`` count (1: in the process), then Prefect's Dask task runner on a
    local cluster of as many worker processes (shards of ``shard_size`` images). The upstream
    stages are computed once with tiny training settings (not timed). torch threads per process:
    the cores shared out (``threads: 0``); ``processes``: how many processes ran shards."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="wsss-bench-") as tmp:
        base = {
            "run": "bench",
            "output_root": tmp,
            "device": case.device,
            "engine": "local",
            "shard_size": shard_size,
            **tiny_training(),
            "dataset": {
                "kind": "demo",
                "num_train": case.images,
                "num_val": 1,
                "height": case.height,
                "width": case.width,
            },
        }
        from ..config import config_from_dict
        from ..runner import make_run, run_local

        run = make_run(config_from_dict(base, "<bench>"))
        if stage not in run.names or not run.spec(stage).per_image:
            raise ValueError(
                f"scale_out: '{stage}' is not a per-image stage of the demo DAG "
                f"({', '.join(n for n in run.names if run.spec(n).per_image)})"
            )
        run_local(run, run.names[: run.names.index(stage)])
        rows = [
            _timed_stage(
                {**base, "workers": k},
                stage,
                f"{stage}: local engine, " + ("in the process" if k == 1 else f"process pool of {k}"),
            )
            for k in workers
        ]
        rows += [
            _timed_stage(
                {**base, "engine": "prefect", "task_runner": "dask", "dask": {"n_workers": k}},
                stage,
                f"{stage}: Prefect + Dask, {k} worker process{'es' if k > 1 else ''}",
            )
            for k in workers
        ]
    return rows

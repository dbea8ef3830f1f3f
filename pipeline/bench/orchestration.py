"""Benchmark of orchestration at dataset scale: what the pipeline adds per image, from a few
hundred images to VOC size and beyond, for every engine."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .core import Case, bench, in_child

PARALLEL = {"pool": 2, "workers: 1": 1, "prefect": 2, "dask": 2}
"""Processes each engine case computes on (the pool's and the cluster's two workers)."""


def synthetic_set(root: Path, n: int, width: int, height: int) -> Path:
    """``n`` image + mask pairs (masks kind): one rendered pair of a box-shaped object,
    written ``n`` times under distinct names (the files' bytes do not change the orchestration)."""
    import cv2

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    image = rng.integers(40, 90, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    image[mask > 0] = rng.integers(150, 220, (int((mask > 0).sum()), 3), dtype=np.uint8)
    ok_i, png_i = cv2.imencode(".png", image)
    ok_m, png_m = cv2.imencode(".png", mask)
    for k in range(n):
        (root / "images" / f"{k:06d}.png").write_bytes(png_i.tobytes())
        (root / "masks" / f"{k:06d}.png").write_bytes(png_m.tobytes())
    return root


def _config(tmp: Path, root: Path, engine: str, stage_workers: int) -> dict[str, Any]:
    data: dict[str, Any] = {
        "run": "orchestration",
        "output_root": str(tmp / "artifacts"),
        "labels": "box",
        "device": "cpu",
        "workers": stage_workers,
        "threads": 1,
        "engine": "local" if engine in ("pool", "workers: 1") else "prefect",
        "dataset": {"kind": "masks", "root": str(root), "val_fraction": 0.0},
    }
    if engine == "dask":
        data.update(task_runner="dask", dask={"n_workers": 2})
    return data


def _cli_seconds(args: list[str], env: dict[str, str]) -> float:
    """Wall seconds of ``wsss ARGS`` in a fresh process (what a user waits for), imports included."""
    wsss = str(Path(sys.executable).with_name("wsss"))
    t0 = time.perf_counter()
    res = subprocess.run([wsss, *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"wsss {' '.join(args)}: {res.stderr.strip()[-400:]}")
    return time.perf_counter() - t0


def one_size(case: Case, n: int, stage: str, engines: tuple[str, ...], cli: bool = True) -> list[dict[str, Any]]:
    """Every engine case at one dataset size, in one process (its peak RSS is this size's)."""
    from ..config import config_from_dict
    from ..runner import make_run, run_local

    rows = []
    with tempfile.TemporaryDirectory(prefix="wsss-orch-") as tmp_name:
        tmp = Path(tmp_name)
        root = synthetic_set(tmp / "data", n, case.width, case.height)
        from ..pool import pool_map

        pool_map(abs, [-1, -2, -3, -4], 2, threads=1)  # the run's shared pool, started once per process
        for engine in engines:
            data = _config(tmp, root, engine, PARALLEL[engine])
            run = make_run(config_from_dict(data, "<bench>"))
            t0 = time.perf_counter()
            if data["engine"] == "prefect":
                from ..flow import run_prefect

                run_prefect(run, [stage], {stage})
            else:
                run_local(run, [stage], {stage})
            wall = time.perf_counter() - t0
            m = run.store(stage).read_manifest()
            seconds, work = m["timings"]["last_run_s"], m["timings"]["last_run_work_s"]
            rows.append(
                {
                    "case": f"{engine} N={n}",
                    "images": n,
                    "seconds": seconds,
                    "images_per_s": round(n / seconds, 1),
                    "s_per_image": round(seconds / n, 5),
                    "work_s_per_image": round(work / n, 5),
                    # the processes' time not spent inside an item: dispatch, reads of the
                    # manifest and stamps, waiting at the end for the last item
                    "overhead_s_per_image": round((seconds * PARALLEL[engine] - work) / n, 5),
                    "wall_s": round(wall, 1),
                }
            )
        if cli:
            config = tmp / "c.yaml"
            config.write_text(yaml.safe_dump(_config(tmp, root, "pool", 2)))
            env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect")}
            status_s = _cli_seconds(["status", str(config)], env)
            cached_s = _cli_seconds(["run", str(config), "--until", stage, "--engine", "local"], env)
            for row in rows:
                row["status_s"], row["cached_run_s"] = round(status_s, 2), round(cached_s, 2)
        manifest = run.store(stage).manifest_path.stat().st_size
        for row in rows:
            row["manifest_kb"] = round(manifest / 1024, 1)
            row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return rows


@bench("orchestration")
def bench_orchestration(
    case: Case,
    sizes: tuple[int, ...] = (250, 1000, 4000, 10000),
    stage: str = "box_seeds",
    engines: tuple[str, ...] = tuple(PARALLEL),
    large: int = 0,
    cli: bool = True,
    **_: Any,
) -> list[dict[str, Any]]:
    """``stage`` (default ``box_seeds``, the cheapest real per-image stage) over ``sizes``
    synthetic image sets at the case size (use ``--size 64x48``): for each engine (the local
    pool of 2, ``workers: 1``, Prefect's thread runner on the pool, Prefect on a 2-worker Dask
    cluster) the stage's seconds per image (begin to finish, without Prefect's or the
    cluster's start), the work per image (the seconds inside the item functions, the
    manifest's ``last_run_work_s``) and the orchestration overhead per image: the computing
    processes' seconds (stage seconds x processes) not spent inside an item, over N; a fresh
    ``wsss status`` and a fully cached ``wsss run`` (imports included); the manifest's size;
    the peak RSS of the process that ran the size (``cli: false`` leaves out the two fresh
    ``wsss`` processes). ``large``: one more size on the pool alone
    (e.g. 100000). A row per engine and size, then the growth of the overhead from the
    smallest to the largest size per engine."""
    rows: list[dict[str, Any]] = []
    for n in sizes:
        rows += in_child(_rows_of, case, n=n, stage=stage, engines=tuple(engines), cli=cli)["rows"]
    if large:
        rows += in_child(_rows_of, case, n=large, stage=stage, engines=("pool",), cli=cli)["rows"]
    for engine in engines:
        mine = [r for r in rows if r["case"].rsplit(" N=", 1)[0] == engine]
        if len(mine) > 1:
            lo, hi = mine[0], mine[-1]
            rows.append(
                {
                    "case": f"{engine}: growth N={lo['images']} -> {hi['images']}",
                    "overhead_growth": round(hi["overhead_s_per_image"] / max(lo["overhead_s_per_image"], 1e-6), 2),
                    "s_per_image_growth": round(hi["s_per_image"] / lo["s_per_image"], 2),
                }
            )
    return rows


def _rows_of(case: Case, n: int, stage: str, engines: tuple[str, ...], cli: bool) -> dict[str, Any]:
    import logging

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # read when Prefect is first imported
    for noisy in ("distributed", "prefect", "httpx", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ..pool import close_pools

    try:
        return {"rows": one_size(case, n, stage, engines, cli)}
    finally:
        close_pools()

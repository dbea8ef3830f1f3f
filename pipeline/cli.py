"""``wsss``: run, resume and look inside the pipeline.

wsss run CONFIG [--from S] [--until S] [--only S] [--force S] [--set key=value]
wsss status CONFIG            a table: stage, fingerprint, done/total, failed, time, metrics
wsss dag CONFIG               the stages the config runs and their inputs, as a Mermaid flowchart
wsss inspect CONFIG IMAGE_ID  one PNG panel: image, GT, weak labels, every stage's labels, graph edges
wsss eval CONFIG --stage S    per-class IoU, mIoU, coverage, precision of one stage
wsss prepare CONFIG --out DIR synthesize weak labels (boxes, scribbles, points, tags) from GT
wsss export CONFIG --out DIR  a stage's labels as palette PNGs (mmseg layout) or COCO JSON
wsss predict CONFIG --images DIR --out DIR   the trained model on new images
wsss demo [--all]             the main flow (or every branch) on the built-in synthetic data
wsss bench NAME               images/s and peak memory of one stage's work (NAME: a stage; `wsss bench list`)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from stages.base import DataError, Scoring

from .config import ConfigError, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Weak labels (tags, boxes, scribbles, points) -> pixel pseudo-labels -> segmenter.",
)
# Piped output (CI logs, `| tee`) gets a wide table instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)

ConfigArg = typer.Argument(..., help="YAML run config (see configs/).", exists=False)
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set crf.iterations=5 (repeatable).")
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
# `wsss demo`: the main flow (the box pipeline, SPML left out) and the DFR branch; `--all` adds
# SPML beside A²GNN, the other single-stage branches and the few-shot task.
DEMO_MAIN = [DEMO_CONFIG.with_name("demo_dfr.yaml")]
DEMO_ALL = DEMO_MAIN + [DEMO_CONFIG.with_name(f"demo_{name}.yaml") for name in ("blpseg", "rrm", "fewshot")]


def _setup_logging(verbose: bool = False) -> None:
    # Prefect reads this when it is first imported (by the flow, after this point).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "DEBUG" if verbose else "WARNING")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("httpx", "prefect", "uvicorn", "alembic", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Exit codes (docs/reliability.md, "Exit codes"): 1 a stage failed for every image, 2 a config or data error
# (nothing ran, or the stage that met it stopped), 3 the disk refused a write, 130 / 143 stopped.
EXIT_STAGE_FAILED, EXIT_BAD_INPUT, EXIT_CANNOT_WRITE = 1, 2, 3


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@contextlib.contextmanager
def _writes() -> Iterator[None]:
    """A disk that refuses a write (full, over quota, read-only, no permission) as one line
    and exit 3; every finished item is on disk (atomic writes) and the command resumes."""
    from .errors import CannotWrite, cannot_write

    try:
        yield
    except (OSError, CannotWrite) as err:
        line = cannot_write(err)
        if line is None:
            raise
        _fail(str(line), EXIT_CANNOT_WRITE)


def _make_run(config: Path | None, overrides: list[str] | None):
    from .runner import make_run

    try:
        return make_run(load_config(config, overrides))
    except (ConfigError, DataError) as err:
        _fail(str(err))


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def status_table(run) -> Table:
    from .store import StageStore

    table = Table(title=f"run '{run.config.run}' ({run.config.labels} -> {run.config.method}, {run.dataset.name})")
    for col in ("stage", "fingerprint", "status", "done/total", "failed", "time s", "mIoU", "coverage", "precision"):
        table.add_column(col, justify="left" if col in ("stage", "fingerprint", "status") else "right")
    for name in run.names:
        store: StageStore = run.store(name)
        m = store.read_manifest()
        if m is None:
            table.add_row(name, store.fingerprint, "not run", f"0/{len(run.ids(name))}", "-", "-", "-", "-", "-")
            continue
        c, met = m.get("counts", {}), m.get("metrics", {})
        damaged = store.damaged(m)
        state = f"damaged: {len(damaged)} file(s) missing or changed" if damaged else m.get("status", "?")
        table.add_row(
            name,
            store.fingerprint,
            state,
            f"{c.get('done', 0)}/{c.get('total', 0)}",
            str(c.get("failed", 0)),
            _fmt(m.get("timings", {}).get("total_s"), 1),
            _fmt(met.get("miou")),
            _fmt(met.get("coverage")),
            _fmt(met.get("precision")),
        )
        for label, sub in extra_rows(met):
            table.add_row(
                f"  {label}",
                "",
                "",
                "",
                "",
                "",
                _fmt(sub.get("miou")),
                _fmt(sub.get("coverage")),
                _fmt(sub.get("precision")),
            )
    return table


def extra_rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Sub-rows of a stage: its extra maps (seeds: M_I, M_F, ...) and, for CAMs, the best
    constant background threshold of the sweep."""
    rows = [(f"└ {v}", sub) for v, sub in metrics.get("maps", {}).items()]
    if "best_threshold" in metrics:
        rows.append((f"└ best bg threshold {metrics['best_threshold']:.2f}", {"miou": metrics["best_threshold_miou"]}))
    return rows


def _print_review(run, most: int = 5) -> None:
    """The ``most`` images whose label stages moved the labels they started from the most (no
    GT needed): where a person should look first; ``export`` writes every image's row."""
    from .scoring import manifests, review

    rows = review(run, manifests(run))
    if not rows:
        return
    console.print(
        f"images to look at first (a stage departed most from the labels it started from; all {len(rows)} in "
        "`wsss export`'s review.csv):",
        highlight=False,
    )
    for r in rows[:most]:
        console.print(
            f"  {r['image']:<24} disagreement {r['disagreement']:.3f}   {r['stage']} against {r['against']}",
            highlight=False,
        )


def _print_failures(run, most: int = 5) -> None:
    """The first ``most`` failures of each stage (all of them are in its manifest), and the
    stages whose labels lost a class the GT has."""
    from .runner import degenerate

    for name in run.names:
        for warning in degenerate(name, (run.store(name).read_manifest() or {}).get("metrics", {})):
            err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
        failures = run.store(name).failures()
        for image_id, msg in list(failures.items())[:most]:
            err_console.print(f"[yellow]{name}: {image_id} failed:[/] {msg}", highlight=False)
        if len(failures) > most:
            err_console.print(
                f"[yellow]{name}: {len(failures) - most} more failed image(s)[/] (`wsss status` counts "
                f"them; {run.store(name).failed_dir} has each reason)",
                highlight=False,
            )


@app.command()
def run(
    config: Path = ConfigArg,
    start: str | None = typer.Option(None, "--from", help="Start at this stage (upstream must be cached)."),
    until: str | None = typer.Option(None, "--until", help="Stop after this stage."),
    only: list[str] | None = typer.Option(None, "--only", help="Run just this stage (repeatable)."),
    force: list[str] | None = typer.Option(None, "--force", help="Recompute this stage and its downstream."),
    overrides: list[str] | None = SetOpt,
    engine: str | None = typer.Option(None, help="prefect (default) or local (no Prefect server)."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Run the DAG for CONFIG; cached stages are skipped, interrupted ones resume."""
    _setup_logging(verbose)
    the_run = _make_run(config, (overrides or []) + ([f"engine={engine}"] if engine else []))
    execute(the_run, only, start, until, force)


def execute(the_run, only=None, start=None, until=None, force=None) -> None:
    """Run the selected stages; exit 1 (with the first reasons) when a stage failed for
    every image, 2 for config and data errors that stop the run, 3 when the disk refused a write."""
    from .runner import stamps_once

    with _writes(), stamps_once(the_run):
        _execute(the_run, only, start, until, force)


def _execute(the_run, only, start, until, force) -> None:
    from .errors import CannotWrite
    from .runner import PipelineError, StageFailed, forced, pending, run_local, save_resolved_config, select

    try:
        names = select(the_run, only, start, until)
        to_force = forced(the_run, force) & set(names)
    except ConfigError as err:
        _fail(str(err))
    todo = pending(the_run, names, to_force)
    try:
        if not todo:
            save_resolved_config(the_run)
            console.print(f"all {len(names)} stage(s) cached: {', '.join(names)}")
        elif the_run.config.engine == "local":
            run_local(the_run, names, to_force)
        else:
            from .flow import run_prefect

            run_prefect(the_run, names, to_force)
    except StageFailed as err:
        console.print(status_table(the_run))
        _print_failures(the_run)
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(EXIT_STAGE_FAILED) from None
    except CannotWrite:
        raise
    except (ConfigError, DataError, PipelineError) as err:
        _fail(str(err))
    console.print(status_table(the_run))
    _print_failures(the_run)
    console.print(f"artifacts: {the_run.run_dir}", highlight=False)


@app.command()
def export(
    config: Path = ConfigArg,
    stage: str = typer.Option("crf", "--stage", help="The stage whose labels to export."),
    out: Path = typer.Option(..., "--out", help="Folder to write (created)."),
    fmt: str = typer.Option("png", "--format", help="png (an mmseg-ready folder) or coco (RLE JSON)."),
    soft: bool = typer.Option(False, "--soft", help="Also write the probability maps (soft stages)."),
    overrides: list[str] | None = SetOpt,
) -> None:
    """Write a stage's labels out of the artifact store, at each image's own size."""
    from .export import ExportError, export as export_stage

    the_run = _make_run(config, overrides)
    try:
        the_run.spec(stage)
        with _writes():
            summary = export_stage(the_run, stage, out, fmt, soft)
    except (ConfigError, DataError, ExportError) as err:
        _fail(str(err))
    console.print(
        f"exported {summary['images']} {summary['split']} image(s) of {stage} "
        f"({summary['fingerprint']}) to {out}" + (f": {summary['coco_json']}" if "coco_json" in summary else ""),
        highlight=False,
    )


@app.command()
def predict(
    config: Path = ConfigArg,
    images: Path = typer.Option(..., "--images", help="Folder of images to label."),
    out: Path = typer.Option(..., "--out", help="Folder for the label PNGs (created)."),
    overrides: list[str] | None = SetOpt,
) -> None:
    """The run's trained model (final_train, or dfr_train) on new images: one palette PNG each."""
    from .predict import PredictError, predict as predict_images

    _setup_logging()
    the_run = _make_run(config, overrides)
    try:
        with _writes():
            summary = predict_images(the_run, images, out)
    except (ConfigError, PredictError) as err:
        _fail(str(err))
    console.print(
        f"{summary['written']} label PNG(s) in {out} ({summary['model']} {summary['fingerprint']})"
        + (f"; {len(summary['failed'])} image(s) failed" if summary["failed"] else ""),
        highlight=False,
    )


@app.command()
def status(config: Path = ConfigArg, overrides: list[str] | None = SetOpt) -> None:
    """A table of every stage: fingerprint, done/total, failures, time and metrics."""
    the_run = _make_run(config, overrides)
    if not the_run.run_dir.is_dir():
        _fail(
            f"no run folder at {the_run.run_dir.resolve()} (output_root '{the_run.config.output_root}' is relative "
            f"to the folder you run wsss from: {Path.cwd()}); nothing has run for this config there"
        )
    console.print(status_table(the_run))
    _print_failures(the_run)
    _print_review(the_run)
    _print_loss_curves(the_run)


@app.command()
def dag(config: Path = ConfigArg, overrides: list[str] | None = SetOpt) -> None:
    """The stages this config runs and what each reads, as a Mermaid flowchart (paste it into
    any Markdown that renders Mermaid, or read it as text)."""
    from .dag import mermaid

    print(mermaid(_make_run(config, overrides)))


def _print_loss_curves(run) -> None:
    """Where each training stage drew its loss curve."""
    from stages.training import LOSS_CURVE

    for name in run.names:
        path = run.store(name).dir / LOSS_CURVE
        if path.is_file():
            console.print(f"{name} loss curve: {path}", highlight=False)


@app.command("eval")
def eval_cmd(
    config: Path = ConfigArg,
    stage: str = typer.Option(..., "--stage", help="Stage to score."),
    map_name: str | None = typer.Option(
        None, "--map", help="One of the stage's extra maps (seeds: M_I, M_I_reliable, M_F, affinity)."
    ),
    overrides: list[str] | None = SetOpt,
) -> None:
    """Per-class IoU, mIoU, coverage and precision of one stage's labels against GT."""
    from .runner import edited_ids, evaluate_store

    the_run = _make_run(config, overrides)
    try:
        spec = the_run.spec(stage)
        known = spec.variants(the_run.config)
        if map_name is not None and map_name not in known:
            raise ConfigError(
                f"stage '{stage}' has no map '{map_name}' in this run (maps: {', '.join(known) or 'none'})"
            )
        metrics = evaluate_store(the_run, stage, map_name)
    except (ConfigError, DataError) as err:
        _fail(str(err))
    if not metrics:
        _fail(f"stage '{stage}' has no labeled images with ground truth yet (run it first)")
    store = the_run.store(stage)
    damaged, manifest = store.damaged(), store.read_manifest() or {}
    if damaged or manifest.get("status") != "complete":
        state = "damaged" if damaged else manifest.get("status", "not run")
        err_console.print(
            f"[yellow]warning:[/] {stage} is {state}"
            f"{f' ({len(damaged)} file(s) missing or changed)' if damaged else ''}: these scores cover "
            f"the {metrics['images']} images it has; run it again to complete it",
            highlight=False,
        )
    edited = edited_ids(the_run, stage)
    if edited:
        err_console.print(
            f"[yellow]warning:[/] {len(edited)} image(s) changed since {stage} ran (e.g. {edited[0]}): its labels "
            "of the old files are scored against the current GT; `wsss run` recomputes them",
            highlight=False,
        )
    table = Table(title=f"{stage}{'' if map_name is None else '/' + map_name}: {metrics['images']} images")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for cls, iou in metrics["iou"].items():
        table.add_row(cls, _fmt(iou))
    table.add_row("[bold]mean", f"[bold]{_fmt(metrics['miou'])}")
    console.print(table)
    console.print(f"coverage {_fmt(metrics['coverage'])}  precision {_fmt(metrics['precision'])}")


@app.command()
def inspect(
    config: Path = ConfigArg,
    image_id: str = typer.Argument(..., help="Image id, e.g. train_0003."),
    out: Path | None = typer.Option(None, help="Output PNG (default artifacts/<run>/inspect/<id>.png)."),
    pixel: str | None = typer.Option(
        None, help="X,Y of the pixel whose graph edges to show (default: the image centre)."
    ),
    overrides: list[str] | None = SetOpt,
) -> None:
    """Write one PNG panel: image, GT, the weak labels, every stage's labels for IMAGE_ID and
    the graph edges of one pixel as a heat map; print its path."""
    from .visualize import inspect_panel

    the_run = _make_run(config, overrides)
    where = None
    if pixel is not None:
        try:
            x, y = (int(v) for v in pixel.split(","))
        except ValueError:
            _fail(f"--pixel {pixel!r}: expected X,Y, e.g. 80,60")
        where = (x, y)
    try:
        with _writes():
            path = inspect_panel(the_run, image_id, out, where)
    except (DataError, KeyError) as err:
        _fail(str(err).strip('"'))
    console.print(str(path))


@app.command()
def prepare(
    config: Path = ConfigArg,
    out: Path = typer.Option(..., "--out", help="Folder for the weak labels."),
    split: str = typer.Option("all", help="train, val or all."),
    overrides: list[str] | None = SetOpt,
) -> None:
    """Synthesize weak labels from GT masks (boxes.json, points.json, tags.json, scribbles/*.png)
    with the config's ``weak`` seed; point ``dataset.weak_dir`` at OUT to use them."""
    from .prepare import write_weak_labels

    the_run = _make_run(config, overrides)
    splits = ["train", "val"] if split == "all" else [split]
    try:
        with _writes():
            summary = write_weak_labels(the_run.config, splits, out)
    except DataError as err:
        _fail(str(err))
    console.print_json(json.dumps(summary))


@app.command()
def demo(
    overrides: list[str] | None = SetOpt,
    engine: str | None = typer.Option(None, help="prefect (default) or local."),
    all_branches: bool = typer.Option(False, "--all", help="Every branch, not only the main flow."),
) -> None:
    """Run the main flow on the built-in synthetic data and print its quality ladders:
    configs/demo.yaml (boxes, the A²GNN pipeline to the final model and its instances) and
    configs/demo_dfr.yaml (the single-stage DFR branch on scribbles). ``--all`` adds SPML
    beside A²GNN, configs/demo_blpseg.yaml, configs/demo_rrm.yaml (image tags) and
    configs/demo_fewshot.yaml (the few-shot task). ``--set`` applies to the first."""
    _setup_logging()
    extra = [f"engine={engine}"] if engine else []
    main_flow = [] if all_branches else ["method=a2gnn"]
    runs = [_make_run(DEMO_CONFIG if DEMO_CONFIG.is_file() else None, main_flow + (overrides or []) + extra)]
    runs += [_make_run(path, extra) for path in (DEMO_ALL if all_branches else DEMO_MAIN) if path.is_file()]
    for the_run in runs:
        execute(the_run)
    for the_run in runs:
        _print_ladder(the_run)


def _print_ladder(the_run) -> None:
    console.print(
        f"[bold]quality ladder[/] of '{the_run.config.run}' ({the_run.config.labels} -> {the_run.config.method}; mIoU: "
        "pseudo-labels on the train split, trained models on val; seeds count unlabeled pixels as misses)"
    )
    from .scoring import CHANGED, changed_images, manifests as read_manifests

    manifests = read_manifests(the_run)
    for name in the_run.names:
        spec = the_run.spec(name)
        m = manifests[name].get("metrics", {})
        label = name if spec.split == "train" else f"{name} ({spec.split})"
        if spec.scores is Scoring.MASK_AP and "gt_objects" in m:
            aps = "   ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k.startswith("mAP@"))
            console.print(f"  {label:<34} {aps}   ({m['gt_objects']} GT objects)", highlight=False)
        for key in shot_keys(spec, m):
            base = m.get(f"{key}_prototype", {})
            console.print(
                f"  {label + ' ' + key:<34} class mIoU {_fmt(m[key]['miou'])}   FB-IoU {_fmt(m[key]['fb_iou'])}"
                f"   (prototype baseline {_fmt(base.get('miou'))} / {_fmt(base.get('fb_iou'))})",
                highlight=False,
            )
        if spec.scores is Scoring.MAPS and "miou" in m:
            rows = [(label, m)] + [(f"  {sub_label}", sub) for sub_label, sub in extra_rows(m)]
            for row_label, sub in rows:
                lost = f"   [bold yellow]no {', '.join(sub['lost'])} pixel![/]" if sub.get("lost") else ""
                console.print(
                    f"  {row_label:<34} mIoU {_fmt(sub.get('miou'))}   coverage {_fmt(sub.get('coverage'))}   "
                    f"precision {_fmt(sub.get('precision'))}{lost}",
                    highlight=False,
                )
            for change in changed_images(the_run, name, manifests):
                worst = f" (worst: {', '.join(change['worst'])})" if change["worse"] else ""
                console.print(
                    f"    per image against {change['against']}: {change['worse']} worse and {change['better']} "
                    f"better by more than {CHANGED:g} mIoU, of {change['images']}{worst}",
                    highlight=False,
                )
        for figure, value, baseline, base_value in baseline_pairs(the_run, name, m):
            if value > base_value:
                continue
            why = the_run.config.notes.get(name, "no note in the config's `notes` says why")
            console.print(
                f"    [yellow]{figure} {_fmt(value)} is not above {baseline} {_fmt(base_value)}:[/] {why}",
                highlight=False,
            )


def shot_keys(spec, metrics: dict[str, Any]) -> list[str]:
    """The per-shot-count metrics (``1shot``, ``5shot``, ...) of a few-shot stage."""
    if spec.scores is not Scoring.EPISODES:
        return []
    return [f"{k}shot" for k in sorted(int(key[: -len("shot")]) for key in metrics if key[: -len("shot")].isdigit())]


def baseline_pairs(the_run, name: str, metrics: dict[str, Any]) -> list[tuple[str, float, str, float]]:
    """(figure, its mIoU, baseline, its mIoU) of a stage that has a baseline in the same run:
    the final box pseudo-labels (``crf``) against one plain GrabCut call per box, RRM's maps
    against the plain CAM + CRF of its classification branch, each few-shot count against
    the prototype-only baseline."""
    pairs = []
    if name == "crf" and "miou" in metrics and "box_seeds" in the_run.names:
        filled = (
            (the_run.store("box_seeds").read_manifest() or {})
            .get("metrics", {})
            .get("maps", {})
            .get("grabcut_filled", {})
            .get("miou")
        )
        if filled is not None:
            pairs.append(("crf", metrics["miou"], "GrabCut filled", filled))
    if "cam_crf" in metrics.get("maps", {}) and "miou" in metrics:
        pairs.append((name, metrics["miou"], "its CAM + CRF", metrics["maps"]["cam_crf"]["miou"]))
    for key in shot_keys(the_run.spec(name), metrics):
        base = metrics.get(f"{key}_prototype", {}).get("miou")
        if base is not None:
            pairs.append((f"{key} class mIoU", metrics[key]["miou"], "the prototype baseline", base))
    return pairs


@app.command("bench")
def bench_cmd(
    name: str = typer.Argument(
        ...,
        help="What to measure: a stage that has a benchmark, or scale_out; `list` names them.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    size: str = typer.Option("500x375", help="Image WIDTHxHEIGHT (VOC-typical default)."),
    images: int = typer.Option(8, help="Images per case."),
    threads: int = typer.Option(0, help="torch/OpenCV threads (0 = all cores)."),
    options: list[str] | None = typer.Option(None, "--opt", help="Case option KEY=VALUE, e.g. depth=101."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the rows as JSON."),
) -> None:
    """Images per second and peak memory of one stage's work; prints a table."""
    import yaml

    from .bench import BENCHES, Case
    from .runner import resolve_device

    if name == "list":
        console.print("\n".join(sorted(BENCHES)), highlight=False)
        return
    if name not in BENCHES:
        _fail(f"unknown benchmark '{name}' (known: {', '.join(sorted(BENCHES))})")
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        _fail(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 500x375")
    kwargs = {}
    for item in options or []:
        key, _, value = item.partition("=")
        kwargs[key.strip()] = yaml.safe_load(value)
    dev = resolve_device(device)
    case = Case(device=dev, threads=threads or (os.cpu_count() or 1), images=images, height=height, width=width)
    rows = BENCHES[name](case, **kwargs)
    table = Table(title=f"bench {name}: {width}x{height}, {dev}, {threads or os.cpu_count()} threads")
    cols = ["case", "images_per_s", "s_per_image", "peak_rss_mb", "peak_over_start_mb", "peak_gpu_mb"]
    hidden = {"images", "seconds", "rss_before_mb"}
    cols += [k for k in dict.fromkeys(k for row in rows for k in row) if k not in cols and k not in hidden]
    for col in cols:
        table.add_column(col, justify="left" if col == "case" else "right")
    for row in rows:
        table.add_row(*[str(row.get(c, "-")) for c in cols])
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2))


STOP_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM / Ctrl-C: one line, end every child process (the process pool, Prefect's
    temporary server) and exit 130 / 143 at once. Every finished item, checkpoint and
    manifest is on disk (atomic writes); a write cut short is a temp file the next run removes."""
    try:
        err_console.print(
            f"{'interrupted' if signum == signal.SIGINT else 'stopped'}; run again to resume", highlight=False
        )
        from .runner import stop_workers

        stop_workers()
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # already gone
                child.kill()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(STOP_CODES.get(signum, 1))


def main() -> None:
    from .reaper import start

    for sig in STOP_CODES:
        signal.signal(sig, _stop)
    start()  # no child outlives the command, even one killed with SIGKILL
    try:
        app()
    except OSError as err:  # a write outside the commands' own handling (logging, caches)
        from .errors import cannot_write

        line = cannot_write(err)
        if line is None:
            raise
        err_console.print(f"[bold red]error:[/] {line}", highlight=False)
        sys.exit(EXIT_CANNOT_WRITE)


if __name__ == "__main__":
    main()

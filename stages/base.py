"""The stage contract: data types, :class:`StageContext`, :class:`StageResult`, the registry.

A stage is plain Python: ``run(ctx: StageContext) -> StageResult``. It reads its config
slice, the dataset and upstream outputs through ``ctx``, and writes its own items through
``ctx.out`` (atomic per-image writes). It never imports Prefect and never reads another
stage's folder by path. The pipeline package builds the context; this module only defines
what a stage may rely on, so the dependency direction stays pipeline -> stages -> models.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from models.types import IGNORE, Box, Point, WeakLabels  # noqa: F401  (re-exported for stages and datasets)


def progress_bar(*extra: ProgressColumn) -> Progress:
    """The one progress bar of the CLI: description, bar, done/total, ``extra`` columns
    (a training loop adds its loss and rate), elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def storage_error(err: BaseException | object) -> bool:
    """Whether ``err`` is the disk refusing a write (full, over quota, read-only): not the
    image's fault, so it stops the stage instead of failing the image."""
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS


class DataError(ValueError):
    """Bad input data. The message names the file and what is wrong with it.

    Picklable (``__reduce__``), so a worker process hands it back intact: the default
    exception pickling re-calls ``__init__`` with the formatted message alone, which fails
    for two arguments and breaks the process pool.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return type(self), (self.path, self.problem)


_SAFE_NAME = re.compile(r"^[^./\\\x00-\x1f\s][^/\\\x00-\x1f]*(?<=\S)$")


def safe_name(value: str, what: str) -> str:
    """``value`` if it can name one file or folder inside the artifacts folder, else ValueError.

    The one check for run names, image ids and map names: no path separator, no control
    character, no leading dot (so never ``.`` or ``..``, nor a name like the store's hidden
    temp files), no leading or trailing space, at most 200 characters.
    """
    if not isinstance(value, str) or len(value) > 200 or not _SAFE_NAME.match(value):
        raise ValueError(
            f"{what} {value!r} cannot name a file inside the artifacts folder (no '/' or '\\', "
            "no leading '.', no control characters or edge spaces, at most 200 characters)"
        )
    return value


# --------------------------------------------------------------------------- datasets
class Dataset(Protocol):
    """What stages may ask of a dataset (implemented in ``pipeline/datasets.py``)."""

    name: str
    class_names: list[str]

    @property
    def num_classes(self) -> int: ...
    def ids(self, split: str) -> list[str]: ...
    def image_path(self, image_id: str) -> str: ...
    def load_image(self, image_id: str) -> np.ndarray: ...
    def load_gt(self, image_id: str) -> np.ndarray | None: ...
    def load_weak(self, image_id: str) -> WeakLabels: ...
    def gt_objects(self, image_id: str) -> list[tuple[int, np.ndarray]] | None: ...


# --------------------------------------------------------------------------- IO protocols
class ItemReader(Protocol):
    """Read access to one upstream stage's per-image outputs."""

    stage: str
    kind: str  # "label" | "soft" | "arrays" | "model" | "instances" (instance-id PNGs)

    def has(self, image_id: str, variant: str | None = None) -> bool: ...
    def read_label(self, image_id: str, variant: str | None = None) -> np.ndarray: ...
    def read_soft(self, image_id: str) -> tuple[np.ndarray, np.ndarray]: ...
    def read_arrays(self, image_id: str) -> dict[str, np.ndarray]: ...
    def labels_of(self, image_id: str, variant: str | None = None) -> np.ndarray: ...
    def read_model(self) -> dict[str, Any]: ...
    def failures(self) -> dict[str, str]: ...


class ItemWriter(Protocol):
    """Atomic writes into the running stage's folder: per-image items (``variant`` names an
    extra map, written before the main item), for training stages checkpoints and the
    final model, and whole-dataset files (``write_file``: e.g. a COCO JSON)."""

    def write_label(self, image_id: str, label: np.ndarray, variant: str | None = None) -> None: ...
    def write_soft(self, image_id: str, probs: np.ndarray, class_ids: np.ndarray) -> None: ...
    def write_arrays(self, image_id: str, arrays: dict[str, np.ndarray]) -> None: ...
    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int = 2) -> Any: ...
    def latest_checkpoint(self) -> tuple[int, dict[str, Any]] | None: ...
    def write_model(self, state: dict[str, Any]) -> None: ...
    def write_file(self, name: str, data: bytes) -> Any: ...


# --------------------------------------------------------------------------- context
T = TypeVar("T")


@dataclass
class StageContext:
    """Everything a stage gets. Picklable, so per-image work can run in worker processes.

    ``map_items`` runs on the pipeline's ``mapper`` (a process pool with a progress bar)
    when one is bound; without it, sequentially, so a stage can be driven by hand in a test.
    """

    stage: str
    section: Any  # the stage's own config section (``config.<stage>``); ``config`` is the whole run's
    config: Any  # the whole run config (class names, seed, ...)
    dataset: Dataset
    ids: list[str]
    todo: list[str]
    out: ItemWriter
    upstream: dict[str, ItemReader]
    device: str = "cpu"
    workers: int = 1
    mapper: Any = None  # pipeline-provided callable(fn, ctx, ids, desc) -> iterator
    pool_map: Any = None  # pipeline-provided callable(fn, items, workers) -> list, in worker processes
    work_s: float = 0.0  # seconds inside ``map_items``' item functions, summed over the processes that ran them

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"wsss.{self.stage}")

    def input(self, name: str | None = None) -> ItemReader:
        """The upstream reader called ``name`` (or the only one)."""
        if name is None:
            if len(self.upstream) != 1:
                raise KeyError(f"{self.stage}: expected one upstream stage, got {sorted(self.upstream)}")
            return next(iter(self.upstream.values()))
        return self.upstream[name]

    def map_items(
        self, fn: Callable[[StageContext, Any], T], ids: Iterable[Any] | None = None, desc: str | None = None
    ) -> Iterator[tuple[Any, T | BaseException]]:
        """Apply ``fn(ctx, item)`` to every item (default: the image ids of ``todo``; or any
        picklable items, e.g. a group of images with what they need), in parallel where the
        pipeline allows, yielding ``(item, result_or_exception)`` as items finish."""
        ids = list(self.todo if ids is None else ids)
        for image_id, timed in self._outcomes(functools.partial(_timed, fn), ids, desc):
            # not a pair: an error the mapper raised outside the item (a lost worker)
            outcome, seconds = timed if isinstance(timed, tuple) else (timed, 0.0)
            self.work_s += seconds
            if storage_error(outcome):
                raise outcome  # the disk, not the image: every later item would fail the same way
            yield image_id, outcome

    def _outcomes(
        self, fn: Callable[[StageContext, str], T], ids: list[str], desc: str | None
    ) -> Iterator[tuple[str, T | BaseException]]:
        if self.mapper is not None:
            yield from self.mapper(fn, self, ids, desc or self.stage)
            return
        for image_id in ids:
            try:
                yield image_id, fn(self, image_id)
            except Exception as err:  # noqa: BLE001 - reported per item by the caller
                yield image_id, err

    def parallel_map(self, fn: Callable[[Any], T], items: list[Any], workers: int) -> list[T]:
        """``[fn(x) for x in items]``, on ``workers`` processes where the pipeline bound a pool
        (``fn`` and the items must pickle); exceptions propagate."""
        if self.pool_map is None:
            return [fn(x) for x in items]
        return self.pool_map(fn, items, workers)

    def __getstate__(self) -> dict[str, Any]:
        """What a per-image task carries to its worker: no mapper (workers run their items
        sequentially) and no id lists, so a task costs the same at any dataset size (the
        dataset pickles as its config, see ``pipeline.datasets``); ``ids`` and ``todo`` are
        None there, for the stage's own loop only."""
        state = dict(self.__dict__)
        state["mapper"] = state["pool_map"] = None
        state["ids"] = state["todo"] = None
        return state


def _timed(fn: Callable[[StageContext, Any], T], ctx: StageContext, item: Any) -> tuple[T | Exception, float]:
    """``(fn(ctx, item) or the exception it raised, the seconds it took)``, in the process that runs it."""
    t0 = time.perf_counter()
    try:
        out: T | Exception = fn(ctx, item)
    except Exception as err:  # noqa: BLE001 - the caller's per-item failure, as without the timing
        out = err
    return out, time.perf_counter() - t0


@dataclass
class StageResult:
    """What a stage reports back: per-item failures, extra info, metrics it computed, and the
    seconds its per-item functions took (``work_s``; the rest of a stage's time is orchestration)."""

    failures: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    work_s: float = 0.0


def run_items(ctx: StageContext, fn: Callable[[StageContext, str], Any], desc: str | None = None) -> StageResult:
    """The common body of a per-image stage: ``fn`` writes one image's outputs; exceptions
    are collected as per-item failures (the run goes on)."""
    result = StageResult()
    for image_id, outcome in ctx.map_items(fn, desc=desc):
        if isinstance(outcome, BaseException):
            result.failures[image_id] = describe_error(outcome)
            ctx.log.warning("%s: %s failed: %s", ctx.stage, image_id, result.failures[image_id])
    return result


def describe_error(err: BaseException) -> str:
    """A failure message for the manifest: the bad file for data errors, else type and text."""
    return str(err) if isinstance(err, DataError) else f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------- registry
class Output(StrEnum):
    """What a stage writes: the kind of its store's files."""

    LABEL = "label"  # label PNGs (class ids, IGNORE unknown)
    SOFT = "soft"  # class probabilities (float16 npz) and their class ids
    ARRAYS = "arrays"  # named arrays (npz: graphs)
    INSTANCES = "instances"  # instance-id PNGs, scored as masks, not as semantic labels
    MODEL = "model"  # one trained model (and checkpoints)


class Scoring(StrEnum):
    """What a stage's metrics are where GT is known; the quality ladder prints each its way."""

    MAPS = "maps"  # mIoU, coverage and precision of the main map and of each extra map
    MASK_AP = "mask_ap"  # instance masks: mask AP at the IoU thresholds
    EPISODES = "episodes"  # few-shot: class mIoU and FB-IoU per shot count, beside the prototype baseline
    NONE = "none"  # a training stage: its last loss


DEFAULT_SCORING = {Output.LABEL: Scoring.MAPS, Output.SOFT: Scoring.MAPS, Output.INSTANCES: Scoring.MASK_AP}


@dataclass(frozen=True)
class StageSpec:
    """A registered stage.

    ``section``: its config section (a :class:`stages.sections.Section`, read as
    ``config.<name>``); ``resolve(config)``: fills the section's defaults that follow from the
    run's labels and method, or raises ValueError for what it needs of other sections, when a
    config loads; ``labels``: the label kinds it runs for (None: every kind its methods take).
    ``tiny``: section settings that make it run in seconds on a few small images (the tests'
    tiny runs, the ``scale_out`` benchmark's upstream).
    The methods that run it list it (:attr:`stages.methods.MethodSpec.stages`).
    ``inputs(config)`` names the upstream stages for a run; ``output``: what it writes
    (:class:`Output`); ``scores``: what its metrics are (:class:`Scoring`; default: maps for
    label and soft outputs, mask AP for instances, none otherwise); ``version`` is bumped whenever the stage's numerics
    change, which invalidates its cached outputs (it is part of the fingerprint).
    ``per_image=False`` (training stages) runs once over all images, never sharded;
    ``parallel=False`` keeps per-image work in the main process (torch stages that batch on
    one device), ``parallel="cpu"`` only on a GPU; ``variants(config)`` names extra label maps scored next to
    the main one; ``report(ctx)`` adds stage-specific metrics once all images are done (``ctx.out`` is
    then readable too); ``preflight(config)`` checks what the stage will need (weights
    files, ...) when the run is built, so a missing file stops the run before any work.
    ``usable(ctx, image_id)`` (training stages) raises when the stage cannot train on an
    image beyond the common checks (readable image and weak labels, upstream outputs).
    ``reads`` names the top-level config fields beyond the stage's own section that change
    its results (``dataset``, ``weak``: the weak-label settings *and* files, ``seed``,
    ``labels``); they enter its fingerprint, and a stage that reads ``weak`` checks
    each image's weak labels before training on it.
    """

    name: str
    run: Callable[[StageContext], StageResult]
    inputs: Callable[[Any], list[str]]
    output: Output = Output.LABEL
    version: str = "1"
    per_image: bool = True
    split: str = "train"
    enabled: Callable[[Any], bool] = lambda config: True
    parallel: bool | Literal["cpu"] = True
    variants: Callable[[Any], list[str]] = lambda config: []
    report: Callable[[StageContext], dict[str, Any]] | None = None
    preflight: Callable[[Any], None] | None = None
    reads: tuple[str, ...] = ("dataset",)
    usable: Callable[[StageContext, str], None] | None = None
    labels: tuple[str, ...] | None = None
    section: type | None = None
    resolve: Callable[[Any], None] | None = None
    scores: Scoring | None = None
    tiny: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Output(self.output))
        if self.scores is None:
            object.__setattr__(self, "scores", DEFAULT_SCORING.get(self.output, Scoring.NONE))


S = TypeVar("S")


class Registry(Generic[S]):
    """A tiny name -> object map (after fvcore's ``Registry``); an object is registered
    under its own ``name``."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._items: dict[str, S] = {}

    def register(self, obj: S) -> S:
        name = obj.name  # type: ignore[attr-defined]
        if name in self._items:
            raise KeyError(f"{self._what} '{name}' is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> S:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self._what} '{name}' (known: {', '.join(self._items)})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return list(self._items)


STAGES: Registry[StageSpec] = Registry("stage")

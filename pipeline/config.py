"""Run configuration: a pydantic v2 schema, YAML files and ``--set a.b=c`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key and the
file. Each stage reads only its own section (its *config slice*); the slice is part of the
stage's fingerprint, so changing it recomputes that stage and everything downstream.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, ValidationError, create_model, field_validator
from pydantic import model_validator

from stages.base import STAGES, safe_name
from stages.methods import LABEL_KINDS, METHODS
from stages.sections import Section


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


# --------------------------------------------------------------------------- datasets
class DatasetSection(Section):
    """What every dataset kind shares: the working image size. ``max_side``: the input guard
    (``oversize``). ``min_side``: an image whose shorter side is below it is upscaled
    (bilinear; GT and weak labels follow) so the stride-8 grid of the affinity net, graph and
    A2GNN has enough nodes (a 200x150 horse gives 25x19); every stage then works, and writes,
    at that working size. ``null``: images are used at their own size (VOC-size data)."""

    max_side: Annotated[int, Field(ge=32)] = 2048
    oversize: Literal["downscale", "fail"] = "downscale"  # an image whose longer side is above max_side
    min_side: Annotated[int, Field(ge=8)] | None = None


class DemoDataset(DatasetSection):
    """The project's own synthetic dataset (see ``pipeline/demo.py``)."""

    kind: Literal["demo"] = "demo"
    num_train: PositiveInt = 32
    num_val: PositiveInt = 12
    height: Annotated[int, Field(ge=48)] = 120
    width: Annotated[int, Field(ge=48)] = 160
    seed: int = 0


class ShapesDataset(DatasetSection):
    """The many-class synthetic dataset (see ``pipeline/shapes.py``): ``num_classes``
    foreground classes, each a shape family, a texture family and a colour distribution; 2-3
    objects of distinct classes an image. Made for few-shot episodes (``method: scl``)."""

    kind: Literal["shapes"] = "shapes"
    num_classes: Annotated[int, Field(ge=2, le=48)] = 48
    part_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.3  # of each object, in its part colour
    num_train: PositiveInt = 480
    num_val: PositiveInt = 240
    height: Annotated[int, Field(ge=48)] = 96
    width: Annotated[int, Field(ge=48)] = 96
    seed: int = 0


class MasksDataset(DatasetSection):
    """A folder of images and a folder of GT masks with the same file stems."""

    kind: Literal["masks"] = "masks"
    root: str
    images: str = "images"
    masks: str = "masks"
    threshold: Annotated[int, Field(ge=1, le=255)] | None = 128
    class_names: list[str] = ["background", "object"]
    class_map: dict[int, int] | None = None
    resize: Literal["error", "image_to_mask"] = "error"
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    split_seed: int = 0
    train_list: str | None = None  # split lists (ids, one a line; relative to root): replace val_fraction
    val_list: str | None = None
    weak_dir: str | None = None
    limit: PositiveInt | None = None


class VocDataset(DatasetSection):
    """A VOCdevkit-style folder (``.../VOCdevkit/VOC2012`` or your own): ``JPEGImages``
    (``.jpg`` or ``.png``), ``Annotations`` XML boxes, optional ``ImageSets/Segmentation``
    lists (absent: every annotated image is train, val is empty), optional GT PNGs.
    ``class_names``: the classes, background first (default VOC's 20 and their aliases)."""

    kind: Literal["voc"] = "voc"
    root: str
    class_names: list[str] | None = None
    train_split: str = "train"
    val_split: str = "val"
    gt_dir: Literal["auto", "SegmentationClassAug", "SegmentationClass", "none"] = "auto"
    scribbles: str | None = None
    scribble_width: PositiveInt = 3
    points: str | None = None
    limit: PositiveInt | None = None


class CocoDataset(DatasetSection):
    """An image folder and a COCO instances JSON per split (paths relative to ``root``):
    categories with any ids -> class ids 1..K by id; boxes -> box supervision, categories
    present -> tags; masks (polygons or RLE), where given, -> GT (``iscrowd`` ignored).
    ``points``: the project's points JSON (``{image id: [{x, y, cls}]}``, ``cls`` a class id
    or category name); ``scribbles``: a folder of scribble PNGs (class ids, 255 elsewhere).
    Without them, points and scribbles are synthesized from the masks (when there are any)."""

    kind: Literal["coco"] = "coco"
    root: str
    images: str = "images"
    train_json: str
    val_json: str | None = None
    points: str | None = None
    scribbles: str | None = None
    limit: PositiveInt | None = None


DATASET_SECTIONS = (DemoDataset, ShapesDataset, MasksDataset, VocDataset, CocoDataset)
DATASET_KINDS = tuple(d.model_fields["kind"].default for d in DATASET_SECTIONS)
DatasetConfig = Annotated[Union[DATASET_SECTIONS], Field(discriminator="kind")]  # noqa: UP007 (Union of a tuple)


class WeakConfig(Section):
    """How ``wsss prepare`` (and on-the-fly synthesis) turns GT masks into weak labels."""

    seed: int = 0
    min_object_area: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.001
    scribble_coverage: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.03
    scribble_length: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6
    scribble_background: bool = True
    background_points: Annotated[int, Field(ge=0)] = 0


class DaskConfig(Section):
    """``task_runner: dask``: Prefect's ``DaskTaskRunner`` on a Dask cluster. ``address``: an
    existing scheduler (``tcp://host:8786``; its workers must see the dataset and
    ``output_root`` at the same paths: a shared filesystem); absent, a local cluster of
    ``n_workers`` processes with ``threads_per_worker`` threads each is started for the run.
    ``resources`` (e.g. ``{GPU: 1}``): what a training stage's task asks for, so it runs on a
    worker started with them (``dask worker ... --resources GPU=1``); a local cluster gives
    each of its workers these resources."""

    address: str | None = None
    n_workers: PositiveInt = 2
    threads_per_worker: PositiveInt = 1
    resources: dict[str, PositiveFloat] = {}
    connect_timeout: PositiveFloat = 60.0  # seconds to wait for the first worker of an existing cluster


class RunConfig(Section):
    """A whole run's top level; :func:`config_model` adds one section per registered stage
    (``config.<stage>``, :attr:`stages.base.StageSpec.section`). Defaults are the built-in
    demo (boxes into the A²GNN pipeline on synthetic data).

    ``labels``: what the user has (``box | scribble | point | tags | masks``; null: the
    method's first); ``method``: what runs on them (:data:`stages.methods.METHODS`);
    ``imports``: modules imported before the config is read, which register more methods,
    stages and their sections (mmseg's ``custom_imports``)."""

    run: str = "demo"
    output_root: str = "artifacts"
    imports: list[str] = []
    labels: Literal[LABEL_KINDS] | None = None  # type: ignore[valid-type]
    method: str = "a2gnn"
    seed: int = 0
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    workers: Annotated[int, Field(ge=0)] = 0
    # images per Prefect task; auto: a few shards per process that runs them (see runner.shards)
    shard_size: PositiveInt | Literal["auto"] = "auto"
    engine: Literal["prefect", "local"] = "prefect"
    task_runner: Literal["thread", "process", "dask"] = "thread"
    # torch threads in every process that runs stage code; 0: all cores in a single process,
    # cores / workers in each process-pool worker, the worker's OMP_NUM_THREADS under Dask
    threads: Annotated[int, Field(ge=0)] = 0
    lock: Literal["wait", "refuse"] = "wait"  # a stage another run is computing: wait for it, or stop
    min_usable: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # share of a training stage's images that must be usable
    # stage -> one line: why its figure can stay at or under its baseline on this data; the
    # quality ladder of `wsss demo` prints it beside such a figure
    notes: dict[str, str] = Field(default_factory=dict)
    dataset: DatasetConfig = Field(default_factory=DemoDataset)
    weak: WeakConfig = Field(default_factory=WeakConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)

    @field_validator("run")
    @classmethod
    def _check_run(cls, value: str) -> str:
        return safe_name(value, "run name")

    @model_validator(mode="after")
    def _resolve(self) -> RunConfig:
        """Check the (labels, method) pair, fill the labels (the method's first kind), then
        let every registered stage fill its defaults that follow from them
        (:attr:`stages.base.StageSpec.resolve`), so the saved ``config.yaml`` is what ran."""
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r} (known: {', '.join(METHODS.names())})")
        takes = METHODS.get(self.method).labels
        if self.labels is None:  # assigning re-runs this validator (validate_assignment)
            self.labels = takes[0]
        if self.labels not in takes:
            raise ValueError(f"labels: method {self.method!r} takes labels: {' | '.join(takes)} (got {self.labels!r})")
        for name in STAGES.names():
            if STAGES.get(name).resolve is not None:
                STAGES.get(name).resolve(self)
        return self

    def run_dir(self) -> Path:
        return Path(self.output_root) / self.run

    def section(self, name: str) -> dict[str, Any]:
        """The JSON-able config slice of a stage (or ``dataset``/``weak``)."""
        value = getattr(self, name, None)
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else {}


_MODELS: dict[tuple[str, ...], type[RunConfig]] = {}


def config_model() -> type[RunConfig]:
    """The run config's schema: :class:`RunConfig` with a section per registered stage (the
    built-in stages are loaded first), built once per set of registered stages."""
    import stages

    stages.load_all()
    specs = [STAGES.get(name) for name in STAGES.names()]
    key = tuple(spec.name for spec in specs)
    if key not in _MODELS:
        sections = {s.name: (s.section, Field(default_factory=s.section)) for s in specs if s.section is not None}
        _MODELS[key] = create_model("Config", __base__=RunConfig, **sections)
    return _MODELS[key]


def __getattr__(name: str) -> Any:
    """``Config``: the schema of the stages registered now (:func:`config_model`)."""
    if name == "Config":
        return config_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _import_plugins(data: dict[str, Any], source: str) -> None:
    """Import the modules of ``imports:`` (they register methods, stages and sections)."""
    names = data.get("imports", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{source}: imports: expected a list of module names")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"{source}: imports: cannot import {name!r}: {err}") from None


# --------------------------------------------------------------------------- loading
def _set_dotted(data: dict[str, Any], dotted: str, raw: str, source: str) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"{source}: bad override key '{dotted}'")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def parse_overrides(items: list[str] | None) -> list[tuple[str, str]]:
    """``["a.b=1", ...]`` -> ``[("a.b", "1"), ...]``."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. crf.iterations=5)")
        key, value = item.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out


def _format_errors(err: ValidationError, source: str, overridden: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        if len(parts) > 1 and parts[0] == "dataset" and parts[1] in DATASET_KINDS:
            parts.pop(1)  # the discriminator tag pydantic inserts; the key is dataset.<field>
        loc = ".".join(parts)
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        value = "" if e["type"] == "extra_forbidden" or not loc else f" (got {e.get('input')!r})"
        origin = f" (from --set {loc}={overridden[loc]})" if loc in overridden else ""
        lines.append(f"{source}: {loc}: {msg}{value}{origin}" if loc else f"{source}: {msg}")  # whole-config checks
    return "\n".join(lines)


# Keys that moved: (section or None for the top level, key) -> what to write instead.
MOVED = {
    (None, "task"): "method: scl (for task: fewshot)",
    ("spml_train", "enabled"): "method: spml",
    ("dfr_train", "labels"): "the top-level labels: (scribble or point)",
    ("blpseg_train", "labels"): "the top-level labels: (scribble or point)",
}


# An older config's supervision: value -> what to write instead.
OLD_SUPERVISION = {
    "box": "labels: box",
    "scribble": "labels: scribble",
    "point": "labels: point",
    "image": "labels: tags",
    "dfr": "method: dfr (labels: scribble or point)",
    "blpseg": "method: blpseg (labels: scribble or point)",
    "rrm": "method: rrm (labels: tags)",
    "fewshot": "method: scl",
}


def _check_moved_keys(data: dict[str, Any], source: str) -> None:
    """One line for a key of an older config: what replaced it."""
    if "supervision" in data:
        old = data["supervision"]
        instead = OLD_SUPERVISION.get(str(old), "labels: and method:")
        raise ConfigError(
            f"{source}: supervision: was split into labels: (what you have) and method: (what runs); "
            f"for supervision: {old} write {instead}"
        )
    for (section, key), instead in MOVED.items():
        node = data if section is None else data.get(section)
        if isinstance(node, dict) and key in node:
            where = key if section is None else f"{section}.{key}"
            raise ConfigError(f"{source}: {where}: this key is gone; write {instead}")


def config_from_dict(data: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None) -> RunConfig:
    data = expand_bases(data or {}, Path.cwd(), source)  # a deep copy, bases (if any) merged
    pairs = parse_overrides(overrides)
    for key, value in pairs:
        _set_dotted(data, key, value, f"{source} (--set {key}={value})")
    _check_moved_keys(data, source)
    if isinstance(data.get("dataset"), dict):
        data["dataset"].setdefault("kind", "demo")
    _import_plugins(data, source)
    try:
        return config_model().model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, dict(pairs))) from None


BASE_KEY = "_base_"  # a config file (or a list of them) this one is written over
DELETE_KEY = "_delete_"  # in a mapping: replace the base's mapping instead of merging into it


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, recursively; anything else
    (lists included) replaces, as does a mapping with ``_delete_: true`` (mmseg's rule)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict):
            start = out.get(key) if isinstance(out.get(key), dict) and not value.get(DELETE_KEY) else {}
            out[key] = merge_config(start, {k: v for k, v in value.items() if k != DELETE_KEY})
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_mapping(path: Path, mentioned_by: str | None) -> dict[str, Any]:
    where = f"{mentioned_by}: {BASE_KEY}: {path}" if mentioned_by else str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a text (UTF-8) file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot read it ({err.strerror})") from None
    if data is None:  # an empty file is a mistake, not a request for the built-in demo
        raise ConfigError(f"{where}: the file is empty (no settings; configs/ has examples)")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    return data


def expand_bases(data: dict[str, Any], here: Path, source: str, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``data`` with its ``_base_`` files (one path or a list, relative to the folder
    ``here``) merged in order under it, each base expanded the same way first."""
    bases = data.get(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{source}: {BASE_KEY}: expected a file name or a list of them")
    merged: dict[str, Any] = {}
    for name in bases:
        path = (here / name).resolve()
        if path in chain:
            raise ConfigError(
                f"{source}: {BASE_KEY}: {name} includes itself (through {' -> '.join(p.name for p in chain)})"
            )
        base = _read_mapping(path, source)
        merged = merge_config(merged, expand_bases(base, path.parent, str(path), chain + (path,)))
    return merge_config(merged, {k: v for k, v in data.items() if k != BASE_KEY})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file stands for: its bases merged, its own keys on top."""
    path = Path(path)
    return expand_bases(_read_mapping(path, None), path.resolve().parent, str(path), (path.resolve(),))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (``None``: the built-in demo) with its bases, apply overrides, validate."""
    if path is None:
        return config_from_dict({}, "<built-in demo>", overrides)
    return config_from_dict(read_config_file(path), str(path), overrides)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

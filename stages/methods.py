"""The methods a run can use (``method:``) and the label kinds a user can bring (``labels:``).

A method declares the label kinds it accepts (the first is its default), the stages that
give its model and its val scores (``wsss predict``), and, where it builds on another
method, that method: its stages run too. Stages say which methods they belong to
(:attr:`stages.base.StageSpec.methods`); the DAG of a run is every registered stage of the
run's method (and the one it extends) whose label kinds include the run's. A new method is
one :func:`METHODS.register <stages.base.Registry.register>` call and its stages' specs.

No torch here: the config imports this module to validate ``labels`` / ``method``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Registry

LABEL_KINDS = ("box", "scribble", "point", "tags", "masks")
"""What a user can bring: object boxes, scribbles, points, image-level tags, or full masks
(few-shot support masks: ``scl``)."""

STROKES = ("scribble", "point")
"""The sparse label maps of the single-stage scribble methods."""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method. ``labels``: the label kinds it accepts, the first its default;
    ``model``: the training stage whose model ``wsss predict`` uses; ``evaluation``: the val
    inference stage whose settings (scales, flip) ``predict`` follows; ``extends``: a method
    whose stages run too; ``paper``: where its equations come from."""

    name: str
    labels: tuple[str, ...]
    model: str
    evaluation: str
    extends: str | None = None
    paper: str = ""

    def family(self) -> tuple[str, ...]:
        """This method and every method it extends, nearest first."""
        out, spec = [self.name], self
        while spec.extends is not None:
            spec = METHODS.get(spec.extends)
            out.append(spec.name)
        return tuple(out)


METHODS: Registry[MethodSpec] = Registry("method")

METHODS.register(
    MethodSpec("a2gnn", ("box", "scribble", "point", "tags"), "final_train", "final_eval", paper="thesis Ch. 3")
)
METHODS.register(
    MethodSpec(
        "spml",
        ("box", "scribble", "point", "tags"),
        "final_train",
        "final_eval",
        extends="a2gnn",
        paper="SPML (Ke et al.)",
    )
)
METHODS.register(MethodSpec("dfr", STROKES, "dfr_train", "dfr_eval", paper="DFR; thesis Ch. 4"))
METHODS.register(MethodSpec("blpseg", STROKES, "blpseg_train", "blpseg_eval", paper="BLPSeg"))
METHODS.register(MethodSpec("rrm", ("tags",), "rrm_train", "rrm_eval", paper="thesis Ch. 2 (RRM)"))
METHODS.register(MethodSpec("scl", ("masks",), "fewshot_train", "fewshot_eval", paper="thesis Ch. 5 (SCL)"))

PIPELINE = ("a2gnn", "spml")
"""The methods of the multi-stage pipeline (seeds, affinity, graph, A²GNN, CRF, final model)."""


def stage_runs(spec, config) -> bool:
    """Whether a registered stage (:class:`stages.base.StageSpec`) is part of ``config``'s run:
    it belongs to the run's method or one that method extends, takes the run's labels, and
    is enabled."""
    family = METHODS.get(config.method).family()
    takes = spec.labels is None or config.labels in spec.labels
    return bool(set(spec.methods) & set(family)) and takes and spec.enabled(config)


def check_pair(labels: str, method: str) -> None:
    """ValueError naming the allowed label kinds (or the known methods) when ``method``
    cannot run on ``labels``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS.names())})")
    spec = METHODS.get(method)
    if labels not in spec.labels:
        raise ValueError(f"method {method!r} takes labels: {' | '.join(spec.labels)} (got {labels!r})")


# The keys that ``labels`` / ``method`` replaced, and what to write instead.
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

"""The methods a run can use (``method:``) and the label kinds a user can bring (``labels:``).

A method declares the label kinds it accepts (the first is its default), the stages it adds
(the one list of stages: :func:`stages.load_all` imports ``stages.<name>`` for each one not
registered yet), the stages that give its model and its val scores (``wsss predict``), and,
where it builds on another method, that method: its stages run too. The DAG of a run is every
stage of the run's method (and the ones it extends) that takes the run's labels and is
enabled, ordered by the stages' inputs. A new method is one ``METHODS.register`` call and its
stages' specs, in any importable module the config names in ``imports:``.

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
    ``stages``: the stages it adds, in the order they register (the DAG's tie-break);
    ``model``: the training stage whose model ``wsss predict`` uses; ``evaluation``: the val
    inference stage whose settings (scales, flip) ``predict`` follows; ``extends``: a method
    whose stages run too; ``paper``: where its equations come from."""

    name: str
    labels: tuple[str, ...]
    stages: tuple[str, ...]
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

    def all_stages(self) -> tuple[str, ...]:
        """The stages of this method and of every method it extends, the base's first."""
        return tuple(name for method in reversed(self.family()) for name in METHODS.get(method).stages)


METHODS: Registry[MethodSpec] = Registry("method")

PIPELINE_STAGES = (
    "box_seeds", "cam_train", "cam", "seeds", "affinity_train", "graph", "random_walk", "a2gnn", "crf",
    "final_train", "final_eval", "instances", "instance_train",
)  # fmt: skip
ANY_SPARSE = ("box", "scribble", "point", "tags")
METHODS.register(MethodSpec("a2gnn", ANY_SPARSE, PIPELINE_STAGES, "final_train", "final_eval", paper="thesis Ch. 3"))
METHODS.register(
    MethodSpec("spml", ANY_SPARSE, ("spml_train", "spml"), "final_train", "final_eval", "a2gnn", "SPML (Ke et al.)")
)
METHODS.register(MethodSpec("dfr", STROKES, ("dfr_train", "dfr_eval"), "dfr_train", "dfr_eval", paper="DFR"))
METHODS.register(
    MethodSpec("blpseg", STROKES, ("blpseg_train", "blpseg_eval"), "blpseg_train", "blpseg_eval", paper="BLPSeg")
)
METHODS.register(
    MethodSpec("rrm", ("tags",), ("rrm_train", "rrm_eval", "rrm_labels"), "rrm_train", "rrm_eval", paper="thesis Ch. 2")
)
METHODS.register(
    MethodSpec(
        "scl", ("masks",), ("fewshot_train", "fewshot_eval"), "fewshot_train", "fewshot_eval", paper="thesis Ch. 5"
    )
)


def in_pipeline(config) -> bool:
    """Whether the run's method is (or extends) the A²GNN pipeline."""
    return "a2gnn" in METHODS.get(config.method).family()


def stage_runs(spec, config) -> bool:
    """Whether a registered stage (:class:`stages.base.StageSpec`) is part of ``config``'s run:
    the run's method (or one it extends) lists it, it takes the run's labels, and it is
    enabled."""
    takes = spec.labels is None or config.labels in spec.labels
    return spec.name in METHODS.get(config.method).all_stages() and takes and spec.enabled(config)

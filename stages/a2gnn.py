"""``a2gnn``: per-image transductive A²GNN (thesis Sect. 3.3.5, 3.6.1), the thin adapter of
:mod:`models.transductive`: reads each image's graph (``graph``), node features X (Eq. 3.15,
stored or recomputed from ``affinity_train``'s net), seeds M_g (``seeds``) and boxes, trains
the per-image models and writes their class probabilities (float16, ``[0] + the image's
classes``; fused with ``random_walk`` for tags and points). The schedule's supervision
defaults are filled when the config loads (:data:`A2GNN_RELEASED`, :func:`resolve`).

On the CPU the images run in worker processes (``workers``; each loads the affinity net
once); on a GPU in the main process. Images of the same size and class count train
together (``batch``; :class:`models.a2gnn.GridGraph` path only).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt

from models.seeds import classes_of
from models.types import Box

from .affinity_train import load_affinity
from .base import STAGES, Output, StageContext, StageResult, StageSpec, describe_error
from .graph import node_features_of
from .routing import fuses_random_walk
from .sections import Section
from .training import release

if TYPE_CHECKING:  # models.transductive (torch_geometric) loads when the stage runs, not with the registry
    from models.transductive import Problem

# --------------------------------------------------------------------------- config section
A2GNN_RELEASED = {
    "box": {"epochs": 150, "lr": 0.035, "reg_weight": 0.01},
    "other": {"epochs": 50, "lr": 0.03, "reg_weight": 0.3},
}
"""The released A²GNN schedules (``train_infer_A2GNN_{box,others}.py``): epochs per phase, lr, lambda_1."""


class A2gnnConfig(Section):
    """Per-image A²GNN (thesis Sect. 3.3.4-3.3.5). Left out (``null``): the released value
    for the supervision (:data:`A2GNN_RELEASED`), filled in when the config is loaded.
    ``mp``, ``consistency`` and ``box_constraint`` apply to boxes only (off otherwise).

    ``path``: how the affinity attention layer runs: ``grid`` (tiled, the fast exact path;
    several images at once, ``batch``), ``edges`` (PyG message passing) or ``dense`` (the
    released N x N form); the GCN / GAT / AGNN baselines always run on edge lists. ``consistency_threshold``: seeds
    less similar (cosine) to their box's prototype are dropped; 0 as released. ``consistency_similarity``:
    ``centred`` compares mean-centred features (the check acts, as the thesis describes), ``raw`` the released
    cosine of non-negative features (>= 0, so at threshold 0 it never removes a seed).
    ``keep_seeds``: the pixels still seeds after the consistency check keep their label and
    A²GNN fills the rest (:func:`models.transductive.keep_seeds`; not the thesis; the horses
    config turns it on); ``seed_weight`` w: those pixels get ``w onehot + (1 - w) P``
    (1: hard; from 0.5 the seed still wins the argmax and the CRF keeps A²GNN's confidence). ``box_constraint``
    (boxes): a class keeps probability only inside its own boxes (:func:`models.boxes.restrict_to_boxes`; not
    in the thesis, which applies the box prior to the seeds only).
    """

    layer: Literal["a2gnn", "gcn", "gat", "agnn"] = "a2gnn"
    path: Literal["grid", "edges", "dense"] = "grid"
    tile: PositiveInt = 8
    batch: PositiveInt = 8
    beta: Annotated[float, Field(ge=0.0)] = 10.0
    negative: Literal["drop", "keep"] = "drop"
    hidden: PositiveInt = 256
    layers: PositiveInt = 3
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    epochs: PositiveInt | None = None  # per phase
    lr: PositiveFloat | None = None
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    reg_weight: Annotated[float, Field(ge=0.0)] | None = None  # lambda_1
    reg_radius: PositiveInt = 5
    sigma_xy: PositiveFloat = 6.0
    sigma_rgb: PositiveFloat = 0.1
    mp: bool = True
    consistency: bool = True
    consistency_threshold: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.0
    consistency_similarity: Literal["centred", "raw"] = "centred"
    rw_weight: Annotated[float, Field(ge=0.0)] = 3.0  # tags and points: (P + w P_rw) / (1 + w)
    box_constraint: bool = True
    keep_seeds: bool = False
    seed_weight: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0


VERSION = "2"


# --------------------------------------------------------------------------- IO
_LOADED: dict[tuple[str, int, str], Any] = {}


def _affinity_of(ctx: StageContext):
    """The affinity net that recomputes node features, or None when the graphs store them;
    loaded once per process (workers included), keyed by the file's path and ``mtime_ns``
    so a retrained model at the same path is read again."""
    if "affinity_train" not in ctx.upstream:
        return None
    reader = ctx.input("affinity_train")
    key = (str(reader.model_path), reader.model_path.stat().st_mtime_ns, ctx.device)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_affinity(reader.read_model(), ctx.device)[0]
    return _LOADED[key]


def _problem(ctx: StageContext, image_id: str, class_ids: np.ndarray, boxes: list[Box], cfg) -> Problem:
    from models.transductive import image_seed, make_problem

    affinity = _affinity_of(ctx)
    graph = ctx.input("graph").read_arrays(image_id)
    image = ctx.dataset.load_image(image_id)
    return make_problem(
        image,
        ctx.input("seeds").read_label(image_id),
        class_ids,
        boxes,
        node_features_of(graph, affinity, image, ctx.device),
        torch.from_numpy(graph["edge_index"].astype(np.int64)),
        torch.from_numpy(graph["weight"].astype(np.float32)),
        tuple(int(v) for v in graph["grid"]),
        cfg,
        image_seed(ctx.config.seed, image_id),
    )


def _run_group(ctx: StageContext, group: tuple[str, dict[str, tuple]], cfg, radius: int) -> dict[str, Any]:
    """Train one group of images together and write their outputs; returns the per-image
    failures and facts. ``group``: its key and each of its images' (class ids, boxes), the
    task's whole payload (the other groups' stay behind)."""
    from models.transductive import fit, fuse

    _, meta = group
    failures, problems, ids = {}, [], []
    for image_id in meta:
        try:
            problems.append(_problem(ctx, image_id, *meta[image_id], cfg))
        except Exception as err:  # noqa: BLE001 - one bad image does not stop its group
            failures[image_id] = describe_error(err)
            continue
        ids.append(image_id)
    if not problems:
        return {"failures": failures, "facts": []}
    probs, facts = fit(problems, cfg, radius, ctx.device)
    for image_id, p in zip(ids, probs.numpy()):
        class_ids = meta[image_id][0]
        if fuses_random_walk(ctx.config):
            p, class_ids = fuse(p, class_ids, *ctx.input("random_walk").read_soft(image_id), cfg.rw_weight)
        ctx.out.write_soft(image_id, p, class_ids)
    return {"failures": failures, "facts": facts}


def run(ctx: StageContext) -> StageResult:
    from models.transductive import batches

    cfg = ctx.section
    result, facts = StageResult(), []
    # One pass over the seeds and weak labels: each image's classes and boxes, and the
    # (size, class count) that decides which images can train stacked.
    meta: dict[str, tuple] = {}
    keys = []
    for image_id in ctx.todo:
        try:
            seeds, weak = ctx.input("seeds").read_label(image_id), ctx.dataset.load_weak(image_id)
        except Exception as err:  # noqa: BLE001 - recorded like any per-image failure
            result.failures[image_id] = describe_error(err)
            continue
        meta[image_id] = (classes_of(seeds, weak), weak.boxes)
        keys.append((seeds.shape, len(meta[image_id][0])))
    ids, batch = list(meta), cfg.batch if cfg.path == "grid" else 1
    groups = [(str(k), {ids[i]: meta[ids[i]] for i in chunk}) for k, chunk in enumerate(batches(keys, batch))]
    if "affinity_train" in ctx.upstream and not ctx.input("affinity_train").has_model():
        ctx.input("affinity_train").read_model()  # the error that names the missing file
    fn = functools.partial(_run_group, cfg=cfg, radius=ctx.config.affinity_train.radius)
    for group, outcome in ctx.map_items(fn, ids=groups, desc=f"a2gnn ({len(ctx.todo)} images)"):
        if isinstance(outcome, BaseException):
            result.failures.update({image_id: describe_error(outcome) for image_id in group[1]})
        else:
            result.failures.update(outcome["failures"])
            facts += outcome["facts"]
    for image_id, why in result.failures.items():
        ctx.log.warning("a2gnn: %s failed: %s", image_id, why)
    result.info.update(
        layer=cfg.layer,
        path=cfg.path,
        epochs=2 * cfg.epochs,
        batch=batch,
        fused_random_walk=fuses_random_walk(ctx.config),
    )
    if cfg.consistency and facts:
        result.info["check_removed_mean"] = round(float(np.mean([f["check_removed"] for f in facts])), 4)
    _LOADED.clear()
    release(ctx.device)
    return result


def inputs(config) -> list[str]:
    out = ["graph", "seeds"]
    if not config.graph.store_features:
        out.append("affinity_train")
    if fuses_random_walk(config):
        out.append("random_walk")
    return out


def resolve(config) -> None:
    """The released schedule of the label kind where left out (:data:`A2GNN_RELEASED`), the
    box-only terms off for other labels, edge lists for the torch_geometric baselines."""
    cfg, box = config.a2gnn, config.labels == "box"
    for key, value in A2GNN_RELEASED["box" if box else "other"].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if not box:
        cfg.mp = cfg.consistency = cfg.box_constraint = False
    if cfg.layer != "a2gnn":
        cfg.path = "edges"


SPEC = STAGES.register(
    StageSpec(
        name="a2gnn",
        tiny={"epochs": 2, "hidden": 16},
        resolve=resolve,
        section=A2gnnConfig,
        run=run,
        inputs=inputs,
        output=Output.SOFT,
        version=VERSION,
        parallel="cpu",
        reads=("dataset", "weak", "seed", "labels"),
    )
)

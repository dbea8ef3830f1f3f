"""``a2gnn``: per-image transductive A²GNN training (thesis Sect. 3.3.5, 3.6.1; the released
``train_infer_A2GNN_{box,others}.py`` is the reference).

For every image, a fresh :class:`models.a2gnn.A2GNN` is trained on that image's graph
(``graph``), node features X (Eq. 3.15, stored or recomputed from ``affinity_train``) and
seed labels M_g (``seeds``)::

    L_G = L_ce + L_mp + lambda_1 L_reg                                          (Eq. 3.20)

- ``L_ce`` (:func:`models.losses.seed_ce`): the grid logits upsampled bilinearly to the
  image (x8, cropped), background and foreground CE over the seed pixels;
- ``L_mp`` (boxes): :func:`models.losses.mp_loss` on the upsampled logits, each box's
  MP nodes' features sampled from the last attention layer;
- ``L_reg``: :func:`models.losses.potts_loss` on the grid softmax, Gaussian kernel on grid
  position (``sigma_xy``) and normalised colour (``sigma_rgb``), square window of
  ``reg_radius`` (the released gated-CRF loss);
- consistency checking (boxes, Eq. 3.27-3.28): every epoch, seed pixels of a box's class
  whose feature (cosine on the grid, upsampled) is less similar to the box prototype than
  ``consistency_threshold`` become unknown; removals accumulate, as in the released code.
  The cosine is of mean-centred features (:func:`models.losses.prototype_similarity`).

Schedule: Adam; phase 1 (``epochs``) without ``L_reg`` and the check, phase 2 (``epochs``)
with everything. Defaults by supervision as released: boxes 150 + 150 epochs, lr 0.035,
lambda_1 0.01; others 50 + 50, lr 0.03, lambda_1 0.3, no MP loss, no check.

Output: the softmax of the upsampled logits over ``[0] + the image's classes`` (the
released code uses all 21 VOC classes; absent classes can only add errors), float16; for
boxes, each class keeps its probability only inside its own boxes (``box_constraint``,
:func:`models.boxes.restrict_to_boxes`). For
tags and points the result is fused with the random walk, ``(P + rw_weight P_rw) /
(1 + rw_weight)`` (Sect. 3.6.1: 1:3).

Non-negative features: the embedding ends in a ReLU and each attention layer outputs
convex combinations of its inputs, so every node feature is non-negative and every cosine
is >= 0. In the released code the dropping of negative-cosine neighbours and the
consistency check at similarity 0 therefore never act. Here the check compares
mean-centred features (``consistency_similarity: centred``, the default), so it removes the
seeds whose features lie on the far side of the image average from their box's MP nodes,
as the thesis describes; ``raw`` is the released, inert form.

On the CPU the images run in worker processes (``workers``; each loads the affinity net
once); on a GPU in the main process. Images of the same size and class count are trained together as stacked independent
models (``batch``; :class:`models.a2gnn.GridGraph` path only): each model has its own
random generator (seeded from ``seed`` and the image id), so an image's result does not
depend on what it was batched with.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.a2gnn import A2GNN, DenseGraph, GridGraph
from models.boxes import restrict_to_boxes
from models.affinity import image_kernel, window_offsets
from models.types import IGNORE, PIPELINE
from models.graph import from_grid
from models.losses import Window, consistency_check, mp_loss, potts_loss, prototype_similarity, seed_ce

from .base import STAGES, Box, StageContext, StageResult, StageSpec, describe_error
from .affinity_train import load_affinity
from .graph import node_features_of
from .routing import STRIDE, fuses_random_walk
from .training import release

VERSION = "2"

def image_seed(seed: int, image_id: str) -> int:
    """A per-image random seed: the same image gets the same model whatever its batch."""
    return (seed * 1_000_003 + zlib.crc32(image_id.encode())) % (2 ** 62)


@dataclass
class Problem:
    """One image's transductive problem. ``seeds`` (H, W) holds class *indices* into the
    image's classes (IGNORE unknown); ``kernel`` (K, h, w) the L_reg pair weights; ``boxes``
    ``(window in pixels, class index)``."""

    x: torch.Tensor
    edge_index: torch.Tensor
    weight: torch.Tensor
    grid: tuple[int, int]
    seeds: torch.Tensor
    kernel: torch.Tensor
    num_classes: int
    boxes: list[tuple[Window, int]]
    seed: int

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.seeds.shape)


def _graph_of(problems: list[Problem], cfg, radius: int, device: str):
    """The graph argument of :meth:`A2GNN.forward` for the configured path, and the edge weights."""
    p = problems[0]
    if cfg.path == "grid":
        grids = [GridGraph.from_edges(q.edge_index, q.weight, q.grid, cfg.tile, radius) for q in problems]
        return GridGraph.stack(grids).to(device), None
    if len(problems) != 1:
        raise ValueError(f"path {cfg.path!r} / layer {cfg.layer!r} trains one image at a time")
    if cfg.path == "dense":
        return DenseGraph.from_edges(p.edge_index, p.weight, p.grid[0] * p.grid[1]).to(device), None
    return p.edge_index.to(device), p.weight.to(device)


def _check(labels: torch.Tensor, feats: torch.Tensor, protos: list[torch.Tensor], boxes: list[tuple[Window, int]],
           threshold: float, centred: bool) -> torch.Tensor:
    """Consistency checking of one image's labels against its boxes' prototypes."""
    for (window, cls), proto in zip(boxes, protos):
        cos = prototype_similarity(feats, proto, centred)
        labels = consistency_check(labels, from_grid(cos[None], labels.shape, STRIDE)[0], window, cls, threshold)
    return labels


def fit(problems: list[Problem], cfg, radius: int, device: str) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Train one model per problem (stacked), return the probabilities (M, C, H, W) on the
    CPU and per-image facts (seed pixels the check removed)."""
    m, first = len(problems), problems[0]
    (h, w), size, c = first.grid, first.size, first.num_classes
    if any(p.grid != first.grid or p.size != size or p.num_classes != c for p in problems):
        raise ValueError("images trained together need the same size and number of classes")
    model = A2GNN(first.x.shape[1], c, cfg.hidden, cfg.layers, cfg.dropout, cfg.layer, cfg.beta, cfg.negative, m)
    if cfg.layer != "a2gnn":
        torch.manual_seed(first.seed)  # the torch_geometric baselines initialise from the global generator
    model.reset_parameters([torch.Generator().manual_seed(p.seed) for p in problems])
    model.to(device)
    noise_gens = [torch.Generator(device=device).manual_seed(p.seed + 1) for p in problems]
    graph, edge_weight = _graph_of(problems, cfg, radius, device)
    x = torch.stack([p.x for p in problems]).to(device)
    labels = torch.stack([p.seeds for p in problems]).to(device)
    kernel = torch.stack([p.kernel for p in problems]).to(device)
    reg_offsets = window_offsets(cfg.reg_radius, "square")
    known = (labels != IGNORE).sum((1, 2))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for epoch in range(2 * cfg.epochs):
        phase2 = epoch >= cfg.epochs
        model.train()
        opt.zero_grad()
        noise = torch.stack([torch.rand(h * w, cfg.hidden, generator=g, device=device) for g in noise_gens]) \
            if cfg.dropout > 0 else None
        logits, feats = model(x, graph, edge_weight, noise)
        grid_logits = logits.transpose(1, 2).reshape(m, c, h, w)
        up = from_grid(grid_logits, size, STRIDE)
        loss = up.new_zeros(())
        if cfg.mp:
            feats_grid = feats.transpose(1, 2).reshape(m, -1, h, w)
            for i, p in enumerate(problems):
                if not p.boxes:
                    continue
                mp, protos = mp_loss(up[i], feats_grid[i], p.boxes, STRIDE)
                loss = loss + mp
                if phase2 and cfg.consistency:
                    labels[i] = _check(labels[i], feats_grid[i].detach(), protos, p.boxes, cfg.consistency_threshold,
                                       cfg.consistency_similarity == "centred")
        loss = loss + seed_ce(up, labels).sum()
        if phase2 and cfg.reg_weight > 0:
            # potts_loss averages over the batch; the models' losses are summed
            loss = loss + cfg.reg_weight * m * potts_loss(torch.softmax(grid_logits, 1), kernel, reg_offsets)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits, _ = model(x, graph, edge_weight)
        probs = torch.softmax(from_grid(logits.transpose(1, 2).reshape(m, c, h, w), size, STRIDE), 1).cpu()
    if cfg.box_constraint:
        probs = torch.stack([restrict_to_boxes(pr, p.boxes) for pr, p in zip(probs, problems)])
    removed = (known - (labels != IGNORE).sum((1, 2))).cpu()
    facts = [{"check_removed": float(r) / max(int(k), 1)} for r, k in zip(removed, known.cpu())]
    return probs, facts


def fuse(probs: np.ndarray, class_ids: np.ndarray, rw: np.ndarray, rw_ids: np.ndarray,
         rw_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """``(P + rw_weight P_rw) / (1 + rw_weight)`` over the union of both class lists."""
    ids = np.union1d(class_ids, rw_ids)
    out = np.zeros((len(ids),) + probs.shape[1:], np.float32)
    out[np.searchsorted(ids, class_ids)] += probs
    out[np.searchsorted(ids, rw_ids)] += rw_weight * rw.astype(np.float32)
    return out / (1.0 + rw_weight), ids


def classes_of(seeds: np.ndarray, weak) -> np.ndarray:
    """``[0]`` + every class the seeds or the weak labels of the image mention, sorted."""
    named = {b.cls for b in weak.boxes} | set(weak.tags) | {p.cls for p in weak.points}
    if weak.scribbles is not None:
        named |= set(np.unique(weak.scribbles[weak.scribbles != IGNORE]).tolist())
    return np.array(sorted({0, *named, *np.unique(seeds[seeds != IGNORE]).tolist()}), np.int64)


def class_index(class_ids: np.ndarray) -> np.ndarray:
    """A 256-entry lookup: class id -> its index in ``class_ids`` (IGNORE elsewhere)."""
    index = np.full(256, IGNORE, np.int64)
    index[class_ids] = np.arange(len(class_ids))
    return index


def make_problem(image: np.ndarray, seeds: np.ndarray, class_ids: np.ndarray, boxes: list[Box], x: torch.Tensor,
                 edge_index: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int], cfg, seed: int) -> Problem:
    """One image's :class:`Problem`: seeds and boxes mapped to class indices (boxes clipped
    to the image, empty ones dropped), the L_reg kernel from the image."""
    index = class_index(class_ids)
    h, w = seeds.shape
    windows = [((max(b.y0, 0), min(b.y1, h), max(b.x0, 0), min(b.x1, w)), int(index[b.cls])) for b in boxes
               if min(b.y1, h) > max(b.y0, 0) and min(b.x1, w) > max(b.x0, 0)]
    rgb = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    kernel = image_kernel(rgb, grid, window_offsets(cfg.reg_radius, "square"), cfg.sigma_xy, cfg.sigma_rgb)[0]
    return Problem(x=x, edge_index=edge_index, weight=weight, grid=grid, seeds=torch.from_numpy(index[seeds]),
                   kernel=kernel, num_classes=len(class_ids), boxes=windows, seed=seed)


def batches(keys: list, size: int) -> list[list[int]]:
    """Indices of equal keys together, in chunks of at most ``size`` (keys in first-seen order)."""
    by_key: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    return [ids[i:i + size] for ids in by_key.values() for i in range(0, len(ids), size)]


# --------------------------------------------------------------------------- IO
@functools.lru_cache(maxsize=1)
def _affinity(path: str, mtime_ns: int, device: str):
    """The affinity net of a checkpoint, loaded once per process (workers included);
    ``mtime_ns`` tells a retrained checkpoint at the same path apart."""
    return load_affinity(torch.load(path, map_location="cpu", weights_only=False), device)[0]


def _affinity_of(ctx: StageContext):
    """The affinity net that recomputes node features, or None when the graphs store them."""
    if "affinity_train" not in ctx.upstream:
        return None
    path = ctx.input("affinity_train").model_path
    return _affinity(str(path), path.stat().st_mtime_ns, ctx.device)


def _problem(ctx: StageContext, image_id: str, class_ids: np.ndarray, boxes: list[Box], cfg) -> Problem:
    affinity = _affinity_of(ctx)
    graph = ctx.input("graph").read_arrays(image_id)
    image = ctx.dataset.load_image(image_id)
    return make_problem(image, ctx.input("seeds").read_label(image_id), class_ids, boxes,
                        node_features_of(graph, affinity, image, ctx.device),
                        torch.from_numpy(graph["edge_index"].astype(np.int64)),
                        torch.from_numpy(graph["weight"].astype(np.float32)), tuple(int(v) for v in graph["grid"]),
                        cfg, image_seed(ctx.config.seed, image_id))


def _run_group(ctx: StageContext, key: str, groups: dict[str, list[str]], meta: dict[str, tuple], cfg,
               radius: int) -> dict[str, Any]:
    """Train one group of images together and write their outputs; returns the per-image
    failures and facts. ``meta``: each image's (class ids, boxes)."""
    failures, problems, ids = {}, [], []
    for image_id in groups[key]:
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
    groups = {str(k): [ids[i] for i in chunk] for k, chunk in enumerate(batches(keys, batch))}
    if "affinity_train" in ctx.upstream and not ctx.input("affinity_train").has_model():
        ctx.input("affinity_train").read_model()  # the error that names the missing file
    fn = functools.partial(_run_group, groups=groups, meta=meta, cfg=cfg, radius=ctx.config.affinity_train.radius)
    for key, outcome in ctx.map_items(fn, ids=list(groups), desc=f"a2gnn ({len(ctx.todo)} images)"):
        if isinstance(outcome, BaseException):
            result.failures.update({image_id: describe_error(outcome) for image_id in groups[key]})
        else:
            result.failures.update(outcome["failures"])
            facts += outcome["facts"]
    for image_id, why in result.failures.items():
        ctx.log.warning("a2gnn: %s failed: %s", image_id, why)
    result.info.update(layer=cfg.layer, path=cfg.path, epochs=2 * cfg.epochs, batch=batch,
                       fused_random_walk=fuses_random_walk(ctx.config))
    if cfg.consistency and facts:
        result.info["check_removed_mean"] = round(float(np.mean([f["check_removed"] for f in facts])), 4)
    _affinity.cache_clear()
    release(ctx.device)
    return result


def inputs(config) -> list[str]:
    out = ["graph", "seeds"]
    if not config.graph.store_features:
        out.append("affinity_train")
    if fuses_random_walk(config):
        out.append("random_walk")
    return out


SPEC = STAGES.register(StageSpec(
    name="a2gnn", run=run, inputs=inputs, supervisions=PIPELINE,
    output="soft", version=VERSION, parallel="cpu",
    reads=("dataset", "weak", "seed", "supervision")))

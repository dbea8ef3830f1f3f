"""Per-image transductive A²GNN training (thesis Sect. 3.3.5, 3.6.1; the released
``train_infer_A2GNN_{box,others}.py`` is the reference): one fresh :class:`models.a2gnn.A2GNN`
per image, trained on that image's graph, node features and seeds with L_G (Eq. 3.20,
:func:`models.losses.a2gnn_objective`).

The terms (:func:`models.losses.a2gnn_objective`):

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

Schedule: Adam; phase 1 (``epochs``) without L_reg and the consistency check, phase 2
(``epochs``) with everything. Images of the same size and class count train together as
stacked independent models; each has its own random generator (seeded from the run seed and
the image id), so an image's result does not depend on what it was batched with.

Output: the softmax of the upsampled logits over ``[0] + the image's classes``; for boxes,
each class keeps its probability only inside its own boxes (``box_constraint``,
:func:`models.boxes.restrict_to_boxes`). For tags and points the result is fused with the
random walk, ``(P + w P_rw) / (1 + w)`` (Sect. 3.6.1: 1:3), :func:`fuse`. With
``keep_seeds`` (not the thesis, off by default) the pixels that are still seeds after the
consistency check keep their seed label (:func:`keep_seeds`), as ``random_walk.keep_seeds``
does for the walk: ``seed_weight`` w mixes ``w onehot + (1 - w) P`` there (Zhou et al.'s soft
clamping); w >= 0.5 keeps every seed's label in the argmax while the CRF downstream still
sees A²GNN's confidence (w = 1: hard clamping, the CRF cannot move a seed).

Non-negative features: the embedding ends in a ReLU and each attention layer outputs
convex combinations of its inputs, so every node feature is non-negative and every cosine
is >= 0. In the released code the dropping of negative-cosine neighbours and the
consistency check at similarity 0 therefore never act. Here the check compares
mean-centred features (``consistency_similarity: centred``, the default), so it removes the
seeds whose features lie on the far side of the image average from their box's MP nodes,
as the thesis describes; ``raw`` is the released, inert form.

``cfg`` below is any object with the ``a2gnn`` config section's fields.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .a2gnn import A2GNN, DenseGraph, GridGraph
from .affinity import STRIDE, image_kernel, window_offsets
from .boxes import restrict_to_boxes
from .graph import from_grid
from .losses import Window, a2gnn_objective
from .seeds import classes_of  # noqa: F401 (re-exported)
from .types import IGNORE, Box


def image_seed(seed: int, image_id: str) -> int:
    """A per-image random seed: the same image gets the same model whatever its batch."""
    return (seed * 1_000_003 + zlib.crc32(image_id.encode())) % (2**62)


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
        noise = (
            torch.stack([torch.rand(h * w, cfg.hidden, generator=g, device=device) for g in noise_gens])
            if cfg.dropout > 0
            else None
        )
        logits, feats = model(x, graph, edge_weight, noise)
        grid_logits = logits.transpose(1, 2).reshape(m, c, h, w)
        feats_grid = feats.transpose(1, 2).reshape(m, -1, h, w) if cfg.mp else None
        check = (
            (cfg.consistency_threshold, cfg.consistency_similarity == "centred") if phase2 and cfg.consistency else None
        )
        loss, labels = a2gnn_objective(
            from_grid(grid_logits, size, STRIDE),
            grid_logits,
            feats_grid,
            labels,
            [p.boxes for p in problems],
            kernel,
            reg_offsets,
            cfg.reg_weight if phase2 else 0.0,
            check,
            STRIDE,
        )
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits, _ = model(x, graph, edge_weight)
        probs = torch.softmax(from_grid(logits.transpose(1, 2).reshape(m, c, h, w), size, STRIDE), 1).cpu()
    if cfg.box_constraint:
        probs = torch.stack([restrict_to_boxes(pr, p.boxes) for pr, p in zip(probs, problems)])
    if cfg.keep_seeds:
        probs = keep_seeds(probs, labels.cpu(), cfg.seed_weight)
    removed = (known - (labels != IGNORE).sum((1, 2))).cpu()
    facts = [{"check_removed": float(r) / max(int(k), 1)} for r, k in zip(removed, known.cpu())]
    return probs, facts


def keep_seeds(probs: torch.Tensor, labels: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``probs`` (M, C, H, W) with every pixel that still holds a seed in ``labels`` (M, H, W)
    class indices, IGNORE unknown) set to ``weight * onehot + (1 - weight) * probs`` of that
    seed (1: the one-hot): A²GNN only decides the pixels the seeds leave unknown (or the
    consistency check took back); from ``weight`` 0.5 up a seed also wins its pixel's argmax."""
    known = labels != IGNORE
    onehot = torch.nn.functional.one_hot(torch.where(known, labels, 0).long(), probs.shape[1])
    clamped = weight * onehot.permute(0, 3, 1, 2).to(probs.dtype) + (1.0 - weight) * probs
    return torch.where(known[:, None], clamped, probs)


def fuse(
    probs: np.ndarray, class_ids: np.ndarray, rw: np.ndarray, rw_ids: np.ndarray, rw_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(P + rw_weight P_rw) / (1 + rw_weight)`` over the union of both class lists."""
    ids = np.union1d(class_ids, rw_ids)
    out = np.zeros((len(ids),) + probs.shape[1:], np.float32)
    out[np.searchsorted(ids, class_ids)] += probs
    out[np.searchsorted(ids, rw_ids)] += rw_weight * rw.astype(np.float32)
    return out / (1.0 + rw_weight), ids


def class_index(class_ids: np.ndarray) -> np.ndarray:
    """A 256-entry lookup: class id -> its index in ``class_ids`` (IGNORE elsewhere)."""
    index = np.full(256, IGNORE, np.int64)
    index[class_ids] = np.arange(len(class_ids))
    return index


def make_problem(
    image: np.ndarray,
    seeds: np.ndarray,
    class_ids: np.ndarray,
    boxes: list[Box],
    x: torch.Tensor,
    edge_index: torch.Tensor,
    weight: torch.Tensor,
    grid: tuple[int, int],
    cfg,
    seed: int,
) -> Problem:
    """One image's :class:`Problem`: seeds and boxes mapped to class indices (boxes clipped
    to the image, empty ones dropped), the L_reg kernel from the image."""
    index = class_index(class_ids)
    h, w = seeds.shape
    windows = [
        ((max(b.y0, 0), min(b.y1, h), max(b.x0, 0), min(b.x1, w)), int(index[b.cls]))
        for b in boxes
        if min(b.y1, h) > max(b.y0, 0) and min(b.x1, w) > max(b.x0, 0)
    ]
    rgb = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    kernel = image_kernel(rgb, grid, window_offsets(cfg.reg_radius, "square"), cfg.sigma_xy, cfg.sigma_rgb)[0]
    return Problem(
        x=x,
        edge_index=edge_index,
        weight=weight,
        grid=grid,
        seeds=torch.from_numpy(index[seeds]),
        kernel=kernel,
        num_classes=len(class_ids),
        boxes=windows,
        seed=seed,
    )


def batches(keys: list, size: int) -> list[list[int]]:
    """Indices of equal keys together, in chunks of at most ``size`` (keys in first-seen order)."""
    by_key: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    return [ids[i : i + size] for ids in by_key.values() for i in range(0, len(ids), size)]

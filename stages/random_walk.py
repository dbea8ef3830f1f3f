"""``random_walk``: PSA / IRN propagation over each image's graph (thesis Sect. 3.4, Table 3.4 "RW").

Per image: the source scores M (C classes) are averaged onto the stride-8 grid, propagated
``M' = M T^(2^logt)`` with ``T`` the column-normalised ``A^beta`` of the stored graph
(:func:`models.graph.random_walk`, sparse, O(N K) memory), upsampled bilinearly to the
image, and divided by their sum over classes. Stored as a float16 soft map whose argmax is
the label map (a pixel no class reaches gets uniform scores, hence background).

Sources (``random_walk.source``, ``auto`` by supervision):

- ``cam`` (tags, points; PSA): the CAM of each tagged class, background ``(1 - max_c)^alpha``
  with the random walk's own ``alpha`` (16, as PSA), classes ``[0, tags...]``.
- ``seeds`` (boxes, scribbles): the seed map M_g one-hot, unknown pixels contributing
  nothing, so labels flow from the confident seeds into the unknown region; classes
  ``[0] + those present``. With ``keep_seeds`` (default) the known pixels keep their seed
  (one-hot) and only the unknown ones take the walk's scores: the stride-8 walk blurs
  labels across object edges (on the horses it lost 13 points of seed-pixel accuracy), and
  a propagation step must only add to what it was given.
"""
from __future__ import annotations

import numpy as np
import torch

from models.affinity import STRIDE
from models.graph import from_grid, random_walk, to_grid
from models.types import PIPELINE

from .base import IGNORE, STAGES, StageContext, StageResult, StageSpec, run_items
from .routing import source_of

VERSION = "2"


def cam_scores(probs: np.ndarray, class_ids: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """[bg, fg...] with ``bg = (1 - max_c fg_c)^alpha`` from a stored CAM (its own bg dropped)."""
    fg = probs[1:].astype(np.float32)
    bg = (1.0 - (fg.max(0) if len(fg) else np.zeros(probs.shape[1:], np.float32))) ** alpha
    return np.concatenate([bg[None], fg]), np.asarray(class_ids)


def seed_scores(seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-hot of the known seed pixels over ``[0] + present classes``; unknown rows are 0."""
    class_ids = np.array(sorted({0, *np.unique(seeds[seeds != IGNORE]).tolist()}), np.int64)
    return (seeds[None] == class_ids[:, None, None]).astype(np.float32), class_ids


def keep_known(probs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``probs`` with every pixel that has a one-hot seed (``scores`` sums to 1) set to it."""
    known = scores.sum(0, keepdims=True) > 0
    return np.where(known, scores, probs).astype(probs.dtype)


def propagate(graph: dict[str, np.ndarray], scores: np.ndarray, beta: float, logt: int,
              device: str = "cpu") -> np.ndarray:
    """Image-resolution scores (C, H, W) -> random-walk probabilities (C, H, W), float32."""
    size = scores.shape[1:]
    h, w = (int(v) for v in graph["grid"])
    grid = to_grid(torch.from_numpy(scores).to(device), STRIDE)
    if grid.shape[1:] != (h, w):
        raise ValueError(f"graph grid {h}x{w} does not match the image {size[1]}x{size[0]} at stride {STRIDE}")
    edge_index = torch.from_numpy(graph["edge_index"].astype(np.int64)).to(device)
    weight = torch.from_numpy(graph["weight"].astype(np.float32)).to(device)
    walked = random_walk(edge_index, weight, grid.reshape(len(grid), -1), beta, logt).reshape(-1, h, w)
    probs = from_grid(walked, size, STRIDE).clamp_min(0)
    total = probs.sum(0, keepdim=True)
    probs = torch.where(total > 0, probs / total.clamp_min(1e-12), torch.full_like(probs, 1.0 / len(probs)))
    return probs.cpu().numpy()


def _walk_image(ctx: StageContext, image_id: str) -> dict:
    cfg, source = ctx.section, source_of(ctx.config)
    if source == "cam":
        scores, class_ids = cam_scores(*ctx.input("cam").read_soft(image_id), cfg.alpha)
    else:
        scores, class_ids = seed_scores(ctx.input("seeds").read_label(image_id))
    probs = propagate(ctx.input("graph").read_arrays(image_id), scores, cfg.beta, cfg.logt, ctx.device)
    if source == "seeds" and cfg.keep_seeds:
        probs = keep_known(probs, scores)
    ctx.out.write_soft(image_id, probs, class_ids)
    return {}


def run(ctx: StageContext) -> StageResult:
    result = run_items(ctx, _walk_image, desc="random walk")
    result.info["source"] = source_of(ctx.config)
    return result


def inputs(config) -> list[str]:
    return ["graph", source_of(config)]


SPEC = STAGES.register(StageSpec(
    name="random_walk", run=run, inputs=inputs, supervisions=PIPELINE,
    output="soft", version=VERSION, parallel=False, reads=("dataset", "supervision")))

"""``graph``: every training image as a graph on the stride-8 grid (thesis Eq. 3.14-3.15).

Per image, one forward pass of the trained affinity CNN (``affinity_train``'s model.pt) on
the whole image gives F_A and the node features X. Edges link each cell to the cells of
the window the affinity net was trained on (its radius and neighbourhood), weighted
``E_ij = D(i, j)`` where ``D > graph.threshold``, plus self-loops of weight 1
(:func:`models.graph.grid_edges`). Stored per image as an npz of::

    edge_index  int32 (2, E)   source, target (raster node ids, node = y * w + x)
    weight      float16 (E,)
    grid        int32 (2,)     h, w of the grid (h = ceil(H / 8), w = ceil(W / 8))
    features    float16 (N, C) L1-normalised node features (Eq. 3.15), only with
                               ``graph.store_features: true``

Without stored features, :func:`node_features_of` recomputes them from the checkpoint;
inference is deterministic (eval mode, no dropout), so both give the same X.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from models.affinity import STRIDE, AffinityNet
from models.graph import cell_labels, grid_edges, node_features, pair_confusion, to_grid

from .affinity_train import load_affinity
from .base import IGNORE, STAGES, Output, StageContext, StageResult, StageSpec, run_items
from .routing import affinity_map, offsets_of
from .sections import Section
from .training import release


# --------------------------------------------------------------------------- config section
class GraphConfig(Section):
    """Image -> graph (Eq. 3.14-3.15): edges within the affinity radius where D > threshold.
    Node features (~20 MB per VOC image for ResNet-50) are stored only on request;
    otherwise they are recomputed from the affinity checkpoint downstream."""

    threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 1e-3
    store_features: bool = False


VERSION = "1"


@torch.no_grad()
def affinity_outputs(model: AffinityNet, image: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_A (448, h, w), raw node features (C, h, w)) of one HxWx3 uint8 image."""
    x = torch.tensor(image, dtype=torch.float32, device=device).permute(2, 0, 1)[None]
    f_a, feats = model(x)
    return f_a[0], feats[0]


def image_graph(
    model: AffinityNet,
    offsets: list[tuple[int, int]],
    image: np.ndarray,
    threshold: float,
    device: str,
    store_features: bool = False,
) -> dict[str, np.ndarray]:
    """The arrays stored for one image (see the module docstring)."""
    f_a, feats = affinity_outputs(model, image, device)
    edge_index, weight = grid_edges(f_a, offsets, threshold)
    out = {
        "edge_index": edge_index.to(torch.int32).cpu().numpy(),
        "weight": weight.to(torch.float16).cpu().numpy(),
        "grid": np.array(f_a.shape[-2:], np.int32),
    }
    if store_features:
        out["features"] = node_features(feats).to(torch.float16).cpu().numpy()
    return out


def node_features_of(
    graph: dict[str, np.ndarray], model: AffinityNet | None, image: np.ndarray, device: str
) -> torch.Tensor:
    """X (N, C) of Eq. 3.15: the stored features, or recomputed from the affinity net."""
    if "features" in graph:
        return torch.from_numpy(graph["features"].astype(np.float32))
    if model is None:
        raise ValueError("the graph has no stored node features and no affinity model was given")
    return node_features(affinity_outputs(model, image, device)[1]).cpu()


def _graph_of_image(ctx: StageContext, image_id: str, model: AffinityNet, offsets: list[tuple[int, int]]) -> dict:
    image = ctx.dataset.load_image(image_id)
    ctx.out.write_arrays(
        image_id, image_graph(model, offsets, image, ctx.section.threshold, ctx.device, ctx.section.store_features)
    )
    return {}


def run(ctx: StageContext) -> StageResult:
    model, offsets = load_affinity(ctx.input("affinity_train").read_model(), ctx.device)
    result = run_items(ctx, functools.partial(_graph_of_image, model=model, offsets=offsets), desc="graph")
    model = None  # free it before release()
    release(ctx.device)
    return result


def pair_scores(counts: torch.Tensor) -> dict[str, float]:
    """Precision / recall of "same class" (D > 0.5) and "different" (D <= 0.5) from
    :func:`models.graph.pair_confusion` counts."""
    (ss, sd), (ds, dd) = counts.double().tolist()
    ratio = lambda a, b: round(a / b, 4) if b else float("nan")  # noqa: E731
    return {
        "same_precision": ratio(ss, ss + ds),
        "same_recall": ratio(ss, ss + sd),
        "diff_precision": ratio(dd, dd + sd),
        "diff_recall": ratio(dd, dd + ds),
    }


def report(ctx: StageContext) -> dict[str, Any]:
    """Graph size (nodes, edges per node with the self-loop; the manifest has the bytes) and,
    where the dataset has GT, how well D separates the classes on the GT cells (purity 0.75):
    ``pairs`` over every window pair, ``pairs_unseeded`` over the pairs touching a cell the
    affinity net had no label for (mostly unknown in its seed map): what the graph adds."""
    nodes = edges = files = 0
    counts = {"pairs": torch.zeros(2, 2, dtype=torch.long), "pairs_unseeded": torch.zeros(2, 2, dtype=torch.long)}
    offsets = offsets_of(ctx.config)  # what the checkpoint records (same fingerprint)
    n_classes, variant = ctx.dataset.num_classes, affinity_map(ctx.config)
    for image_id in ctx.ids:
        if not ctx.out.has(image_id):
            continue
        g = ctx.out.read_arrays(image_id)
        nodes += int(np.prod(g["grid"]))
        edges += int(g["weight"].size)
        files += 1
        gt = ctx.dataset.load_gt(image_id)
        if gt is None:
            continue
        grid = tuple(int(v) for v in g["grid"])
        cells = cell_labels(torch.from_numpy(gt.astype(np.int64)), n_classes, STRIDE)
        seeds = torch.from_numpy(ctx.input("seeds").read_label(image_id, variant) == IGNORE).float()
        edge_index, weight = torch.from_numpy(g["edge_index"]), torch.from_numpy(g["weight"])
        for key, involved in (
            ("pairs", torch.ones(grid, dtype=torch.bool)),
            ("pairs_unseeded", to_grid(seeds[None], STRIDE)[0] >= 0.5),
        ):
            counts[key] += pair_confusion(edge_index, weight, grid, offsets, cells, involved)
    if not files:
        return {}
    out: dict[str, Any] = {
        "nodes_per_image": round(nodes / files, 1),
        "edges_per_node": round(edges / max(nodes, 1), 2),
    }
    out.update({key: pair_scores(c) for key, c in counts.items() if c.sum() > 0})
    return out


SPEC = STAGES.register(
    StageSpec(
        name="graph",
        section=GraphConfig,
        run=run,
        output=Output.ARRAYS,
        version=VERSION,
        parallel=False,
        report=report,
        inputs=lambda config: ["affinity_train", "seeds"],
    )
)  # seeds: only the report reads them

"""Image -> graph (thesis Eq. 3.14-3.15) and random-walk propagation (PSA / IRN).

Nodes are the cells of the stride-8 feature grid, numbered in raster order
(``node = y * w + x``). Edges are stored as a PyG-style ``edge_index`` (2, E) with
``edge_index[0]`` the source i, ``edge_index[1]`` the target j, and one weight each::

    E_ij = D(i, j)   if D(i, j) > sigma (1e-3) and j - i is a window offset    (Eq. 3.14)
    E_ii = 1                                                       (self-loops)
    x_i  = x_i / sum_d x_id        (node features, L1 per row; ReLU'd, so >= 0)  (Eq. 3.15)

Random walk (Ahn & Kwak's PSA, kept by IRN and SEAM)::

    T = A^beta / (1^T A^beta)      (column-normalised, A = E with its self-loops)
    M' = M T^(2^logt)              (M: C x N class scores)

The reference code forms T as a dense N x N matrix and squares it ``logt`` times, which is
O(N^2) memory and O(N^3 logt) time. :func:`random_walk` applies the same operator as
``2^logt`` sparse products with the E edges instead: O(N K) memory for K neighbours,
O(2^logt E C) time. The two are equal up to float rounding (tested); the dense one is
kept as :func:`random_walk_dense` for tests and the benchmark.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .affinity import STRIDE, pair_affinity, pair_labels, shifted, valid_pairs
from .types import IGNORE

EDGE_THRESHOLD = 1e-3


def grid_edges(
    f_a: torch.Tensor, offsets: Sequence[tuple[int, int]], threshold: float = EDGE_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges of one image's grid graph from its affinity features F_A (C, h, w) (Eq. 3.14).

    Returns ``(edge_index (2, E) int64, weight (E,))``: the N self-loops first (weight 1),
    then, offset by offset, every in-image pair (i, i + o) with D > ``threshold``.
    """
    _, h, w = f_a.shape
    n = h * w
    aff = pair_affinity(f_a[None], offsets)[0]  # (K, h, w), 0 outside the image
    keep = valid_pairs(h, w, offsets, f_a.device) & (aff > threshold)
    k, ys, xs = keep.nonzero(as_tuple=True)
    d = torch.tensor(offsets, dtype=torch.long, device=f_a.device)
    src = ys * w + xs
    dst = (ys + d[k, 0]) * w + (xs + d[k, 1])
    loops = torch.arange(n, device=f_a.device)
    edge_index = torch.stack([torch.cat([loops, src]), torch.cat([loops, dst])])
    weight = torch.cat([torch.ones(n, dtype=aff.dtype, device=aff.device), aff[k, ys, xs]])
    return edge_index, weight


def node_features(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(C, h, w) raw node features -> (N, C), each row divided by its sum (Eq. 3.15)."""
    rows = x.flatten(1).t()
    return rows / rows.abs().sum(1, keepdim=True).clamp_min(eps)


def transition(
    edge_index: torch.Tensor, weight: torch.Tensor, n: int, beta: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """T^T as a sparse CSR (N, N) matrix: row j holds A_ij^beta / sum_i A_ij^beta."""
    a = weight.to(dtype) ** beta
    col_sum = torch.zeros(n, dtype=a.dtype, device=a.device).index_add_(0, edge_index[1], a)
    values = a / col_sum[edge_index[1]].clamp_min(torch.finfo(dtype).tiny)
    t = torch.sparse_coo_tensor(edge_index.flip(0), values, (n, n), check_invariants=False).coalesce()
    with warnings.catch_warnings():  # "CSR support is in beta"; CSR products are ~20x faster than COO here
        warnings.simplefilter("ignore", UserWarning)
        return t.to_sparse_csr()


def random_walk(
    edge_index: torch.Tensor, weight: torch.Tensor, source: torch.Tensor, beta: float = 8.0, logt: int = 8
) -> torch.Tensor:
    """``M T^(2^logt)`` for scores ``source`` (C, N), by 2^logt sparse products; O(E) memory.
    Computed in ``source.dtype``."""
    n = source.shape[1]
    t_transposed = transition(edge_index, weight, n, beta, source.dtype)
    x = source.t().contiguous()  # (N, C): M'^T = (T^T)^(2^logt) M^T
    for _ in range(2**logt):
        x = t_transposed @ x
    return x.t()


def random_walk_dense(
    edge_index: torch.Tensor, weight: torch.Tensor, source: torch.Tensor, beta: float = 8.0, logt: int = 8
) -> torch.Tensor:
    """The reference code's formulation: dense T, squared ``logt`` times; O(N^2) memory.
    Computed in ``source.dtype``."""
    n = source.shape[1]
    a = torch.zeros(n, n, dtype=source.dtype, device=source.device)
    a.index_put_((edge_index[0], edge_index[1]), weight.to(source.dtype) ** beta, accumulate=True)
    return dense_walk(a, source, logt)


def dense_walk(a: torch.Tensor, source: torch.Tensor, logt: int) -> torch.Tensor:
    """``M T^(2^logt)`` with ``T = A / colsum(A)`` for a dense (N, N) affinity ``a`` (already
    raised to beta; consumed) and scores ``source`` (C, N): T squared ``logt`` times."""
    t = a.div_(a.sum(0, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny))
    for _ in range(logt):
        t = t @ t
    return source @ t


def to_grid(maps: torch.Tensor, stride: int = 8) -> torch.Tensor:
    """(C, H, W) -> (C, ceil(H/s), ceil(W/s)): the mean of each s x s cell over the pixels
    inside the image (the last row and column of cells may be partly outside)."""
    c, h, w = maps.shape
    gh, gw = -(-h // stride), -(-w // stride)
    pad = (0, gw * stride - w, 0, gh * stride - h)
    total = F.avg_pool2d(F.pad(maps, pad)[None], stride, divisor_override=1)[0]
    count = F.avg_pool2d(
        F.pad(torch.ones(1, h, w, dtype=maps.dtype, device=maps.device), pad)[None], stride, divisor_override=1
    )[0]
    return total / count


def from_grid(maps: torch.Tensor, size: tuple[int, int], stride: int = 8) -> torch.Tensor:
    """(C, h, w) or (N, C, h, w) grid maps -> (..., H, W): bilinear upsampling by
    ``stride``, cropped to ``size`` (the inverse placement of :func:`to_grid`)."""
    batch = maps if maps.dim() == 4 else maps[None]
    up = F.interpolate(batch, scale_factor=stride, mode="bilinear", align_corners=False)[..., : size[0], : size[1]]
    return up if maps.dim() == 4 else up[0]


def sample_grid(maps: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, stride: int = 8) -> torch.Tensor:
    """``from_grid(maps)[:, ys, xs].T`` (P, C) without upsampling the whole (C, h, w) map:
    bilinear at the source position ``(y + 0.5) / stride - 0.5`` (clamped to the grid),
    as :func:`torch.nn.functional.interpolate` with ``align_corners=False`` places it."""

    def axis(v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = ((v.to(maps.dtype) + 0.5) / stride - 0.5).clamp_min(0)
        lo = src.floor().long().clamp_max(n - 1)
        return lo, (lo + 1).clamp_max(n - 1), src - lo

    y0, y1, ly = axis(ys, maps.shape[-2])
    x0, x1, lx = axis(xs, maps.shape[-1])
    top = maps[:, y0, x0] * (1 - lx) + maps[:, y0, x1] * lx
    bottom = maps[:, y1, x0] * (1 - lx) + maps[:, y1, x1] * lx
    return (top * (1 - ly) + bottom * ly).t()


def cell_labels(labels: torch.Tensor, n_classes: int, stride: int = 8, purity: float = 0.75) -> torch.Tensor:
    """(H, W) label map -> (h, w) grid labels: the class covering at least ``purity`` of a
    cell's pixels, IGNORE for mixed cells (ignored pixels count against purity)."""
    onehot = torch.stack([(labels == c) for c in range(n_classes)]).to(torch.float32)
    frac, cls = to_grid(onehot, stride).max(0)
    return torch.where(frac >= purity, cls, torch.full_like(cls, IGNORE))


def pair_confusion(
    edge_index: torch.Tensor,
    weight: torch.Tensor,
    grid: tuple[int, int],
    offsets: Sequence[tuple[int, int]],
    cells: torch.Tensor,
    involved: torch.Tensor,
    threshold: float = 0.5,
) -> torch.Tensor:
    """How well a graph's affinities separate the classes: counts (2, 2) over window pairs
    (i, i + o) whose two cells have a label in ``cells`` (h, w; IGNORE = skip) and at least one
    of which is ``involved`` (h, w bool)::

        [[same class, D > t   same class, D <= t]
         [different, D > t    different, D <= t]]

    D is the stored edge weight, 0 for window pairs the graph dropped (D <= sigma)."""
    h, w = grid
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    lookup = torch.full((2 * r + 1, 2 * r + 1), -1, dtype=torch.long)  # (dy + r, dx + r) -> offset index
    for k, (dy, dx) in enumerate(offsets):
        lookup[dy + r, dx + r] = k
    d = torch.zeros(len(offsets), h, w)
    src, dst = edge_index.long()
    pairs = src != dst
    sy, sx, ty, tx = src[pairs] // w, src[pairs] % w, dst[pairs] // w, dst[pairs] % w
    dy, dx = ty - sy, tx - sx
    inside = (dy.abs() <= r) & (dx.abs() <= r)
    k = torch.where(inside, lookup[(dy + r).clamp(0, 2 * r), (dx + r).clamp(0, 2 * r)], -1)
    if (k < 0).any():
        raise ValueError("the graph has edges outside the given window offsets")
    d[k, sy, sx] = weight[pairs].float()
    labels = pair_labels(cells[None], offsets)
    inv = involved[None, None].float()
    touch = ((inv + shifted(inv, offsets)[:, :, 0]) > 0)[0] & valid_pairs(h, w, offsets)
    same = (labels["bg_pos"] | labels["fg_pos"])[0] & touch
    diff = labels["neg"][0] & touch
    high = d > threshold
    return torch.tensor([[(same & high).sum(), (same & ~high).sum()], [(diff & high).sum(), (diff & ~high).sum()]])


def seed_scores(seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-hot of the known seed pixels over ``[0] + present classes``; unknown rows are 0."""
    class_ids = np.array(sorted({0, *np.unique(seeds[seeds != IGNORE]).tolist()}), np.int64)
    return (seeds[None] == class_ids[:, None, None]).astype(np.float32), class_ids


def keep_known(probs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``probs`` with every pixel that has a one-hot seed (``scores`` sums to 1) set to it."""
    known = scores.sum(0, keepdims=True) > 0
    return np.where(known, scores, probs).astype(probs.dtype)


def propagate(
    graph: dict[str, np.ndarray], scores: np.ndarray, beta: float, logt: int, device: str = "cpu"
) -> np.ndarray:
    """Image-resolution scores (C, H, W) -> random-walk probabilities (C, H, W), float32:
    the scores pooled to the graph's stride-8 grid, walked (:func:`random_walk`) over
    ``graph`` (``edge_index``, ``weight``, ``grid`` arrays), upsampled and normalised per pixel."""
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

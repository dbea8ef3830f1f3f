"""BLPSeg's numerics (Wang et al., "BLPSeg: Balance the Label Preference in Scribble-Supervised
Semantic Segmentation", TIP 2023): the local aggregation module and the two losses.

::

    WCE  = -1/N sum_n sum_{c=1}^{K+1} w_c y'_{c,n} log p^scrib_{c,n}                  (BLPSeg Eq. 1)
    y'   = y on the K classes; class K+1 ("unlabelled") where y is empty             (BLPSeg Eq. 2)
    X_out = X_in A                                                                  (BLPSeg Eq. 3)
    A_ij = P_low(i,j) P_dis(i,j) / sum_k P_low(k,j) P_dis(k,j)                      (BLPSeg Eq. 4)
    P_low(i,j) = exp(f_i.f_j) / sum_k exp(f_k.f_j),
    P_dis(i,j) = exp(-|s_i - s_j|^2 / 2 sigma^2)                                    (BLPSeg Eq. 5)
    Z = W_FC^T (X_in A) = (W_FC^T X_in) A: LAM after the classifier                 (BLPSeg Eq. 8)
    BL   = -1/N_seg sum_n sum_{c=1}^K y_{c,n} delta_{c,n} log p^seg_{c,n}             (BLPSeg Eq. 9)
    N_seg = sum_n sum_c y_{c,n},  p^seg = softmax(Z)                                 (BLPSeg Eq. 10)
    delta_{c,n} = (1 - p^scrib_{c,n} p^seg_{c,n})^gamma                                (BLPSeg Eq. 11)
    L    = WCE + BL                                                                 (BLPSeg Eq. 12)

Where the released code (YudeWang/BLPSeg) differs from the print: its WCE is PyTorch's
weighted mean (divided by ``sum_n w_{y'_n}``, not by N) and its BL divides by ``sum delta``
over the labelled pixels, not by N_seg; ``normalize="released"`` gives those. It also
treats ``delta`` as a constant (no gradient through the modulating factor), as here.

``P_low``'s denominator depends on j only and cancels in BLPSeg Eq. 4, so column j of A is a
softmax over i of ``f_i.f_j - |s_i - s_j|^2 / 2 sigma^2``. :func:`lam` computes it on a
local window of ``radius``: as masked N x N matrices on small grids, one window row at a time
on large ones (never the N x N matrix the released code builds on its 96 x 96 grid); with a
window that covers the grid it equals :func:`lam_dense`, the printed N x N form.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .types import IGNORE

Normalize = Literal["printed", "released"]


def _row_windows(x: torch.Tensor, radius: int, dy: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, 2r+1, h, w): x at the offsets (dy, -r..r) of every pixel, 0
    outside the image (one row of the window, by ``unfold``)."""
    b, c, h, w = x.shape
    r = radius
    padded = F.pad(x, (r, r, r, r))[:, :, r + dy : r + dy + h]  # (B, C, h, w + 2r): rows moved by dy
    return F.unfold(padded, (1, 2 * r + 1)).view(b, c, 2 * r + 1, h, w)


def _row_logits(f: torch.Tensor, radius: int, sigma: float, dy: int) -> torch.Tensor:
    """(B, 2r+1, h, w): f_i.f_j - |s_i - s_j|^2 / 2 sigma^2 for the neighbours i = j + (dy, dx)."""
    dots = (_row_windows(f, radius, dy) * f[:, :, None]).sum(1)
    dx = torch.arange(-radius, radius + 1, device=f.device, dtype=f.dtype)
    return dots - ((dy * dy + dx * dx) / (2.0 * sigma * sigma))[None, :, None, None]


DENSE_BYTES = 256 * 2**20
"""Largest (B, N, N) float matrix :func:`lam` builds for the masked dense form; above it, the
window one row at a time. On small grids (the CPU configs' 32 x 32 / 40 x 40) one batched
matmul is ~10x faster than the offset loop; VOC's 96 x 96 grid takes the window."""


def lam(z: torch.Tensor, f: torch.Tensor, sigma: float, radius: int, dense_bytes: int = DENSE_BYTES) -> torch.Tensor:
    """Local aggregation (BLPSeg Eq. 3-5 / 8) on a ``radius`` window: ``z`` (B, C, h, w) class
    scores, ``f`` (B, D, h, w) low-level features on the same grid -> (B, C, h, w) with
    ``out[:, :, j] = sum_{i in W(j)} A_ij z[:, :, i]``, ``A_{.j} = softmax_i(f_i.f_j -
    |s_i - s_j|^2 / 2 sigma^2)`` over the neighbours inside the image (Chebyshev distance <=
    ``radius``). Its gradient, ``dL/dX_in = dL/dX_out A^T`` (BLPSeg Eq. 6-7: the labelled
    pixels' loss reaches the unlabelled ones), is autograd's.

    Two forms of the same A: while (B, N, N) fits ``dense_bytes``, the N x N logits with the
    pixels outside each window masked (:func:`_lam_masked`); otherwise one window row at a
    time (:func:`_lam_rows`), never an N x N matrix."""
    b, _, h, w = z.shape
    if b * (h * w) ** 2 * z.element_size() <= dense_bytes:
        return _lam_masked(z, f, sigma, radius)
    return _lam_rows(z, f, sigma, radius)


def _lam_masked(z: torch.Tensor, f: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """:func:`lam` as N x N matrices: logits ``F^T F - D^2 / 2 sigma^2``, -inf outside the window,
    softmax over i (each column j), then ``Z A``."""
    b, c, h, w = z.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=z.device), torch.arange(w, device=z.device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy, dx = ys[:, None] - ys[None], xs[:, None] - xs[None]
    position = ((dy * dy + dx * dx).to(z.dtype) / (-2.0 * sigma * sigma)).masked_fill(
        torch.maximum(dy.abs(), dx.abs()) > radius, float("-inf")
    )
    feats = f.flatten(2)
    a = torch.softmax(torch.baddbmm(position, feats.transpose(1, 2), feats), 1)
    return torch.bmm(z.flatten(2), a).view(b, c, h, w)


def _lam_rows(z: torch.Tensor, f: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """:func:`lam` one window row at a time (``unfold``), each row's feature products recomputed
    in the backward pass (``checkpoint``), so memory holds the (B, (2r+1)^2, h, w) weights and
    one row of (B, D, 2r+1, h, w) products, never all (2r+1)^2 rows of D-wide products."""
    b, _, h, w = z.shape
    rows = range(-radius, radius + 1)
    logits = torch.cat([checkpoint(_row_logits, f, radius, sigma, dy, use_reentrant=False) for dy in rows], 1)
    inside = _row_windows_mask(h, w, radius, z.device)
    a = torch.softmax(logits.masked_fill(~inside, float("-inf")), 1)  # (B, K, h, w): column j of A
    k = 2 * radius + 1
    out = z.new_zeros(z.shape)
    for n, dy in enumerate(rows):
        out = out + (_row_windows(z, radius, dy) * a[:, None, n * k : (n + 1) * k]).sum(2)
    return out


def _row_windows_mask(h: int, w: int, radius: int, device) -> torch.Tensor:
    """(1, (2r+1)^2, h, w) bool: the neighbour at each window offset lies inside the image."""
    ones = torch.ones(1, 1, h, w, device=device)
    return torch.cat([_row_windows(ones, radius, dy)[:, 0] for dy in range(-radius, radius + 1)], 1) > 0


def lam_dense(z: torch.Tensor, f: torch.Tensor, sigma: float) -> torch.Tensor:
    """The printed N x N form of :func:`lam` (BLPSeg Eq. 3-5): P_low, P_dis and A as matrices."""
    b, c, h, w = z.shape
    feats = f.flatten(2)  # (B, D, N)
    p_low = torch.softmax(torch.einsum("bdi,bdj->bij", feats, feats), 1)  # normalised over i, per column j
    ys, xs = torch.meshgrid(torch.arange(h, device=z.device), torch.arange(w, device=z.device), indexing="ij")
    s = torch.stack([ys.flatten(), xs.flatten()], 1).to(z.dtype)
    p_dis = torch.exp(-torch.cdist(s, s).pow(2) / (2.0 * sigma * sigma))
    sim = p_low * p_dis
    a = sim / sim.sum(1, keepdim=True)
    return torch.einsum("bci,bij->bcj", z.flatten(2), a).view(b, c, h, w)


def unlabelled_target(labels: torch.Tensor, real: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y' of BLPSeg Eq. 2 as indices: the scribble class where labelled, ``num_classes`` (the
    extra "unlabelled" class) on the image's other pixels, IGNORE on padding (``real`` False)."""
    target = labels.long().clone()
    target[(labels == IGNORE) & real] = num_classes
    target[~real] = IGNORE
    return target


def weighted_ce(
    scrib_logits: torch.Tensor,
    labels: torch.Tensor,
    real: torch.Tensor,
    unlabelled_weight: float,
    normalize: Normalize = "printed",
) -> torch.Tensor:
    """WCE of the scribble head (BLPSeg Eq. 1-2): ``scrib_logits`` (B, K+1, H, W), ``labels``
    (B, H, W) scribbles with IGNORE where unlabelled, ``real`` (B, H, W) the image's pixels
    (padding is left out). w = 1 for the K classes, ``unlabelled_weight`` (0.02) for class K+1;
    divided by N, the image pixels (``released``: by the sum of their weights)."""
    k = scrib_logits.shape[1] - 1
    target = unlabelled_target(labels, real, k)
    weight = torch.ones(k + 1, device=scrib_logits.device, dtype=scrib_logits.dtype)
    weight[k] = unlabelled_weight
    ce = F.cross_entropy(scrib_logits, target, weight=weight, ignore_index=IGNORE, reduction="none")
    if normalize == "released":
        w = weight[target.clamp_max(k)] * real
        return ce.sum() / w.sum().clamp_min(1e-7)
    return ce.sum() / real.sum().clamp_min(1)


def blp_loss(
    seg_logits: torch.Tensor,
    scrib_probs: torch.Tensor | None,
    labels: torch.Tensor,
    gamma: float,
    normalize: Normalize = "printed",
) -> torch.Tensor:
    """BL (BLPSeg Eq. 9-11): ``seg_logits`` (B, K, H, W) after LAM, ``scrib_probs`` (B, K+1, H, W)
    the scribble head's softmax (its class K+1 unused; None: delta = 1, plain partial CE),
    ``labels`` (B, H, W) with IGNORE where unlabelled. ``delta = (1 - p^scrib p^seg)^gamma`` is
    a weight without gradient; per image the sum over labelled pixels is divided by N_seg
    (``released``: by the sum of delta), then averaged over the batch (an image without labels adds 0)."""
    k = seg_logits.shape[1]
    logp = F.log_softmax(seg_logits, 1)
    known = labels != IGNORE
    target = labels.long().clamp(0, k - 1)[:, None]
    logp_y = logp.gather(1, target)[:, 0]
    with torch.no_grad():
        delta = known.to(logp_y.dtype)
        if scrib_probs is not None:
            delta = delta * (1.0 - scrib_probs[:, :k].gather(1, target)[:, 0] * logp_y.exp()) ** gamma
    per_image = -(delta * logp_y).flatten(1).sum(1)
    norm = delta.flatten(1).sum(1) + 1e-7 if normalize == "released" else known.flatten(1).sum(1).clamp_min(1)
    return (per_image / norm).mean()


@torch.no_grad()
def self_training_labels(
    seg_probs: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, threshold: float = 0.9
) -> torch.Tensor:
    """The segmentation head's own labels after ``itr_SELF`` (BLPSeg Sect. IV-B): argmax over
    the classes the image's scribbles name, IGNORE where that probability is below
    ``threshold`` (0.9) and on padding; scribbled pixels keep their scribble."""
    b, k = seg_probs.shape[:2]
    present = torch.zeros(b, k, dtype=torch.bool, device=seg_probs.device)
    for n in range(b):
        cls = labels[n][labels[n] != IGNORE].long().unique()
        present[n, cls] = True
    masked = seg_probs * present[:, :, None, None]
    conf, pseudo = masked.max(1)
    pseudo[conf < threshold] = IGNORE
    scribbled = labels != IGNORE
    pseudo[scribbled] = labels[scribbled].long()
    pseudo[~real] = IGNORE
    return pseudo

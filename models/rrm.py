"""RRM's numerics (Reliable Region Mining, thesis Ch. 2): the re-weighted attention, the online
reliable labels and the segmentation branch's losses.

::

    A        = F_1 F_2^T                                                         (Eq. 2.8)
    A_w(m|k) = e(m|k) / N_k+                       if A(m|k) > 0                  (Eq. 2.9)
               sqrt(|N_k+ + 1 - e(m|k)| / N_k+)    otherwise
    N_k+     = sum_m [A(m|k) > 0]                                                (Eq. 2.10)
    F_a      = (softmax(A) . A_w) F_3,   F_g = concat(F_a, F_3)                  (Eq. 2.11-2.12)
    P_net    = softmax((P_l + P_g) / 2)                                          (Eq. 2.13)
    L        = L_class + L_ce + lambda_1 L_energy + L_BCD                        (Eq. 2.14-2.15)
    L_energy = sum_i sum_{j != i} S(i) G(i,j) sum_c P^c(i) (1 - P^c(j))          (Eq. 2.17-2.20)
    G(i,j)   = 1/W exp(-|s_i - s_j|^2 / 2 sigma_d^2 - |I_i - I_j|^2 / 2 sigma_r^2)  (Eq. 2.18)
    S(i)     = 1 - max_c P^c(i) on reliable pixels, 1 elsewhere                  (Eq. 2.21)

e(m|k) is m's 1-based rank in row k of A sorted in descending order; softmax runs over each
row (pixel k's relations). The re-weighting is a function of ranks and carries no gradient.

Choices where the thesis is silent, each said where it is made: the reliable labels are
computed from the CAMs of the training crop (as the released code) and the CRF runs on that
crop; the energy loss is computed on a local window at ``scale`` x the crop (the released
code: Tang et al.'s permutohedral filter at scale 0.5) with 1/W the normaliser of each
pixel's Gaussian weights (they sum to 1 over its window) and the sum divided by the number
of pixels, so lambda_1 = 1 of the thesis weighs a per-pixel mean in [0, 1] (the released
code instead scales an unnormalised sum by 1e-7); S(i) is a constant (the released
``DenseEnergyLoss`` passes no gradient through its gate either); L_ce is the background and
foreground CE each averaged over its own pixels (:func:`models.losses.seed_ce`; "computed
for background and foreground individually").

The BCD loss (Eq. 2.22-2.26) pulls each pixel's feature F_m = concat(F_l, F_g) towards its
predicted class centre (foreground: one centre per class over the batch; background: one
per image) and the centres apart; each of its four terms is a mean over its own pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .affinity import gaussian_kernel, window_offsets
from .losses import grid_validity, potts_loss
from .types import IGNORE


def rank_weights(a: torch.Tensor) -> torch.Tensor:
    """A_w of Eq. 2.9-2.10 for attention logits ``a`` (..., N, N), row k = pixel k: small for
    the highest and the least positive values, larger towards the middle. A row with no
    positive value takes N_k+ = 1. No gradient."""
    a = a.detach()
    n = a.shape[-1]
    order = a.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, n + 1, device=a.device).expand_as(order))
    ranks = ranks.to(a.dtype)
    n_pos = (a > 0).sum(-1, keepdim=True).to(a.dtype).clamp_min(1.0)
    return torch.where(a > 0, ranks / n_pos, torch.sqrt((n_pos + 1.0 - ranks).abs() / n_pos))


class RFAM(nn.Module):
    r"""Re-weighting Feature Attention Module (thesis Fig. 2.4, Eq. 2.8-2.12).

    .. math::
        F_g = \mathrm{concat}\big((\mathrm{softmax}(F_1 F_2^T) \odot A_w) F_3,\; F_3\big)

    with :math:`F_1, F_2, F_3` three bias-free 1x1 convolutions of the backbone map to
    ``channels`` (256 as released) and :math:`A_w` from :func:`rank_weights`. ``reweight=False``
    drops :math:`A_w`: plain self-attention, Table 2.5's baseline.
    """

    def __init__(self, in_channels: int, channels: int = 256, reweight: bool = True) -> None:
        super().__init__()
        self.query = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.value = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.reweight = reweight
        self.out_channels = 2 * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> F_g (B, 2 channels, H, W)."""
        b, _, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, C1)
        k = self.key(x).flatten(2)  # (B, C1, N)
        v = self.value(x)
        a = torch.bmm(q, k)  # (B, N, N), row k: pixel k against every pixel
        att = torch.softmax(a, -1)
        if self.reweight:
            att = att * rank_weights(a)
        f_a = torch.bmm(att, v.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
        return torch.cat([f_a, v], 1)


def soft_gate(probs: torch.Tensor, reliable: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """S of Eq. 2.21 (N, H, W), detached: ``1 - max_c P^c(i)`` on reliable pixels (``reliable``
    True), 1 elsewhere, 0 on crop padding (``real`` False)."""
    gate = torch.where(reliable, 1.0 - probs.detach().max(1).values, torch.ones_like(probs[:, 0]))
    return gate * real.to(gate.dtype)


def dense_energy_loss(
    logits: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    real: torch.Tensor,
    sigma_d: float,
    sigma_r: float,
    scale: float,
    radius: int,
) -> torch.Tensor:
    """L_energy (Eq. 2.17-2.21) of segmentation ``logits`` (N, C, h, w) against the crop:
    ``images`` (N, 3, H, W) 0..255, reliable ``labels`` (N, H, W) (IGNORE = unreliable) and
    ``real`` (N, H, W) (False on padding). Everything is resized to ``scale`` x the crop (the
    softmax bilinearly, the images bilinearly, labels and padding nearest); pairs are the
    (2 ``radius`` + 1)^2 - 1 offsets of a square window, G has sigma_d in crop pixels
    (``sigma_d * scale`` cells) and sigma_r on 0..255 RGB, 1/W normalises each pixel's
    weights to sum 1 over its window, and the sum is divided by the number of pixels
    (:func:`models.losses.potts_loss` with the kernel gated by S(i)): a mean in [0, 1]."""
    n, _, h, w = images.shape
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    probs = F.interpolate(torch.softmax(logits, 1), size=size, mode="bilinear", align_corners=False)
    offsets = window_offsets(radius, "square")
    real_grid, real_pairs = grid_validity(real, size, offsets)
    reliable = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0] != IGNORE
    rgb = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
    kernel = gaussian_kernel(rgb, offsets, sigma_d * scale, sigma_r) * real_pairs
    kernel = kernel / kernel.sum(1, keepdim=True).clamp_min(1e-8)  # 1/W_i: each pixel's weights sum to 1
    return potts_loss(probs, kernel * soft_gate(probs, reliable, real_grid)[:, None], offsets)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` (n, d) with every row of ``b`` (m, d): (n, m)."""
    return F.normalize(a, dim=1, eps=1e-7) @ F.normalize(b, dim=1, eps=1e-7).t()


def bcd_loss(logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """L_BCD (Eq. 2.22-2.26) of segmentation ``logits`` (B, C, h, w) (class 0 = background) and
    the features F_m (B, D, h, w) on the same grid. M_p = argmax (Eq. 2.23, no gradient);
    foreground centres c_i over the batch (Eq. 2.24), background centres c_0(b) per image
    (Eq. 2.25). The four terms, each averaged over its own pairs, are left out when they have
    none::

        1/N_ff sum_{i != j} (1 + cos(c_i, c_j)) + 1/N_fb sum_{i, b} (1 + cos(c_i, c_0(b)))
        + 1/N_fg sum_{fg pixels} (1 - cos(F_m, c_{M_p})) + 1/N_bg sum_{bg pixels} (1 - cos(F_m, c_0(b)))
    """
    pred = logits.detach().argmax(1).flatten(1)  # (B, hw)
    f = feats.flatten(2).transpose(1, 2)  # (B, hw, D)
    fg_masks = [pred == c for c in pred.unique().tolist() if c != 0]
    bg_masks = [(i, pred[i] == 0) for i in range(len(f)) if (pred[i] == 0).any()]
    fg = [f[m].mean(0) for m in fg_masks]
    bg = [f[i][m].mean(0) for i, m in bg_masks]
    loss = feats.new_zeros(())
    if len(fg) > 1:
        cos = _cos_rows(torch.stack(fg), torch.stack(fg))
        loss = loss + (1.0 + cos[~torch.eye(len(fg), dtype=torch.bool, device=cos.device)]).mean()
    if fg and bg:
        loss = loss + (1.0 + _cos_rows(torch.stack(fg), torch.stack(bg))).mean()
    if fg:
        pull = sum((1.0 - _cos_rows(f[m], c[None])).sum() for m, c in zip(fg_masks, fg))
        loss = loss + pull / sum(int(m.sum()) for m in fg_masks)
    if bg:
        pull = sum((1.0 - _cos_rows(f[i][m], c[None])).sum() for (i, m), c in zip(bg_masks, bg))
        loss = loss + pull / sum(int(m.sum()) for _, m in bg_masks)
    return loss


def online_reliable_labels(
    image: np.ndarray, p_fg: np.ndarray, class_ids: Sequence[int], gamma: float, ratio: float, crf_params
) -> np.ndarray:
    """I_final of Eq. 2.1-2.7 for one training crop: ``p_fg`` (K, H, W) the max-normalised
    multi-scale CAMs (Eq. 2.1-2.3) of the image's tagged classes ``class_ids`` (ids >= 1) at
    crop size, P_bg = (1 - max P_fg)^gamma (Eq. 2.4), the dense CRF (Eq. 2.5) and the top ``ratio`` of each class
    where the CRF agrees (Eq. 2.6-2.7): :func:`models.seeds.reliable_from_probs`, the same
    function that gives the ``seeds`` stage its M'_I. uint8 (H, W), IGNORE = unreliable. A crop
    of an image without tags is background everywhere, all of it reliable."""
    from .cam import with_background
    from .seeds import reliable_from_probs

    if len(class_ids) == 0:
        return np.zeros(image.shape[:2], np.uint8)
    ids = np.asarray([0, *class_ids], np.uint8)
    return reliable_from_probs(image, with_background(p_fg, gamma), ids, ratio, crf_params)


def cam_crf_labels(
    image: np.ndarray, p_fg: np.ndarray, class_ids: Sequence[int], gamma: float, crf_params
) -> np.ndarray:
    """I_crf of Eq. 2.5 (the plain CAM + CRF labels, RRM's baseline): argmax of the CRF of
    [P_bg, P_fg] (``p_fg`` max-normalised, e.g. :func:`models.cam.multiscale_cam`) as class ids
    (H, W) uint8; all background without tags."""
    from .cam import with_background
    from .crf import crf_from_probs
    from .seeds import labels_from_soft

    if len(class_ids) == 0:
        return np.zeros(image.shape[:2], np.uint8)
    ids = np.asarray([0, *class_ids], np.uint8)
    return labels_from_soft(crf_from_probs(image, with_background(p_fg, gamma), crf_params), ids)


def energy_window_mass(sigma_d: float, scale: float, radius: int) -> float:
    """The share of the position Gaussian's mass (1-D) inside the window: how much of
    sigma_d the local window keeps (printed in the manifest so a run shows the truncation)."""
    sigma = sigma_d * scale
    return float(math.erf((radius + 0.5) / (sigma * math.sqrt(2.0))))

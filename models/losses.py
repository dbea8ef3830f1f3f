"""Losses shared by the A²GNN, final-training and DFR stages.

Pairwise terms live on (N, K, H, W) offset tensors (see :mod:`models.affinity`): a local
window of K offsets, never an N x N matrix.

::

    L_ce    = CE over background seeds + CE over foreground seeds, each averaged over its
              own pixels (thesis Eq. 3.21 as the released code computes it)
    L_reg   = 1/(N H W) sum_i sum_{j in W(i)} K_ij (1 - sum_c P_c(i) P_c(j))       (Eq. 3.22)
    K_ij    = exp(-|p_i - p_j|^2 / 2 s_xy^2 - |c_i - c_j|^2 / 2 s_rgb^2)

The printed Eq. 3.22 lacks the disagreement factor ([c_i != c_j], relaxed to
1 - P(i).P(j)) and would be constant in the prediction; the relaxed Potts form is what the
released gated-CRF code computes and what is implemented.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .affinity import IGNORE, shifted


def seed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(background seeds) + CE(foreground seeds), each a mean over its own pixels; a set
    with no pixels contributes 0. ``logits`` (N, C, H, W), ``labels`` (N, H, W) class
    indices into C with IGNORE for unknown."""
    total = logits.new_zeros(())
    for part in (labels == 0, (labels != 0) & (labels != IGNORE)):
        if part.any():
            target = torch.where(part, labels, torch.full_like(labels, IGNORE)).long()
            total = total + F.cross_entropy(logits, target, ignore_index=IGNORE)
    return total


def potts_loss(probs: torch.Tensor, kernel: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Relaxed Potts / dense-CRF loss on a local window (Eq. 3.22, intended form):
    ``sum_i sum_k K_ik (1 - P(i) . P(i + o_k)) / (N H W)``.

    ``probs`` (N, C, H, W) softmax; ``kernel`` (N, K, H, W) pair weights over ``offsets``,
    0 for pairs leaving the image (e.g. :func:`models.affinity.gaussian_kernel`).
    """
    n, _, h, w = probs.shape
    agree = (probs[:, None] * shifted(probs, offsets)).sum(2)  # (N, K, H, W)
    return (kernel * (1.0 - agree)).sum() / (n * h * w)

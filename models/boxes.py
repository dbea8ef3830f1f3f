"""The box constraint on a class-probability map (box supervision).

Box supervision assumes every object is inside a box of its class; the thesis uses it for
the seeds (Eq. 3.3: pixels outside every box are background) and for the MP loss. The
same assumption holds for the output of any propagation step: a class can only be where
one of its boxes is. With the support

.. math::

    S_0(p) = 1, \\qquad S_c(p) = [p \\in \\textstyle\\bigcup_{k: L_{B_k} = c} B_k] \\quad (c > 0)

the constrained probabilities are

.. math::

    P'_c(p) = \\frac{P_c(p)\\, S_c(p)}{\\sum_k P_k(p)\\, S_k(p)}

(a pixel whose mass is all on excluded classes becomes background). A class that has no box
in the image (a tag-only class) is not restricted.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .losses import Window


def box_support(shape: tuple[int, int], boxes: Sequence[tuple[Window, int]], num_classes: int) -> torch.Tensor:
    """S (C, H, W) bool: background everywhere, each boxed class inside its boxes, classes
    without a box everywhere. ``boxes``: ``((y0, y1, x0, x1), class index)``."""
    support = torch.ones((num_classes, *shape), dtype=torch.bool)
    boxed = sorted({c for _, c in boxes if c != 0})
    support[boxed] = False
    for (y0, y1, x0, x1), c in boxes:
        if c != 0:
            support[c, max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return support


def restrict_to_boxes(probs: torch.Tensor, boxes: Sequence[tuple[Window, int]]) -> torch.Tensor:
    """P' of the module docstring for ``probs`` (C, H, W), class 0 = background."""
    support = box_support(tuple(probs.shape[1:]), boxes, probs.shape[0]).to(probs.device)
    kept = probs * support
    total = kept.sum(0, keepdim=True)
    background = torch.zeros_like(probs)
    background[0] = 1.0
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(probs.dtype).tiny), background)

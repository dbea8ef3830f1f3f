"""Box-supervision numerics: the box constraint on a class-probability map, and the
box-to-instance assignment of thesis Sect. 3.4 (:func:`instance_map`).

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

from collections.abc import Sequence

import numpy as np
import torch

from .losses import Window
from .types import Box


def largest_first(boxes: Sequence[Box]) -> list[int]:
    """Box indices, largest area first: painting in this order lets a smaller box's pixels
    overwrite a larger one's (the more specific claim wins, as in Eq. 3.3)."""
    return sorted(range(len(boxes)), key=lambda k: -boxes[k].area)


def box_support(shape: tuple[int, int], boxes: Sequence[tuple[Window, int]], num_classes: int) -> torch.Tensor:
    """S (C, H, W) bool: background everywhere, each boxed class inside its boxes, classes
    without a box everywhere. ``boxes``: ``((y0, y1, x0, x1), class index)``."""
    support = torch.ones((num_classes, *shape), dtype=torch.bool)
    boxed = sorted({c for _, c in boxes if c != 0})
    support[boxed] = False
    for (y0, y1, x0, x1), c in boxes:
        if c != 0:
            support[c, max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return support


def restrict_to_boxes(probs: torch.Tensor, boxes: Sequence[tuple[Window, int]]) -> torch.Tensor:
    """P' of the module docstring for ``probs`` (C, H, W), class 0 = background."""
    support = box_support(tuple(probs.shape[1:]), boxes, probs.shape[0]).to(probs.device)
    kept = probs * support
    total = kept.sum(0, keepdim=True)
    background = torch.zeros_like(probs)
    background[0] = 1.0
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(probs.dtype).tiny), background)


def instance_map(labels: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """Thesis Sect. 3.4, uint8 instance ids: pixel -> 1 + index of the smallest box around it
    whose class it has."""
    if len(boxes) > 254:
        raise ValueError(f"{len(boxes)} boxes: instance PNGs hold at most 254 instances")
    out = np.zeros(labels.shape, np.uint8)
    for k in largest_first(boxes):  # a smaller box overwrites a larger one
        b = boxes[k]
        window = (slice(b.y0, b.y1), slice(b.x0, b.x1))
        out[window][labels[window] == b.cls] = k + 1
    return out


def instance_score(mask: np.ndarray, box: Box) -> float:
    """IoU of the mask's tight box with the given box."""
    ys, xs = np.nonzero(mask)
    tight = Box(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, box.cls)
    iw = min(tight.x1, box.x1) - max(tight.x0, box.x0)
    ih = min(tight.y1, box.y1) - max(tight.y0, box.y0)
    inter = max(0, iw) * max(0, ih)
    return inter / (tight.area + box.area - inter)

"""GrabCut on object boxes: the box seeds (thesis Sect. 3.2, Eq. 3.2-3.3) and the box refinement.

For box B_k with class L_k (Eq. 3.2)::

    M_Bk(i) = L_k   if i in B_k and GrabCut_k(i) is foreground
              255   otherwise (GrabCut background inside a box is *unknown*)

and over all boxes (Eq. 3.3)::

    M_B(i) = c_0 (background)  if i lies in no box
             M_Bk(i)           if i in B_k

Overlapping boxes: where several boxes claim a pixel as foreground, the *smaller* box wins
(it is the more specific claim: a rider inside a horse's box). A pixel that is GrabCut
background in one box and foreground in another takes the claiming box's class.

GrabCut runs on a crop around each box (``crop_margin`` x the box size on every side,
``None`` = the whole image): the colour models only need nearby background, and the crop
makes small boxes in big images cheap. OpenCV's RNG is seeded per box, so results are
deterministic. A box thinner than ``min_box_side`` cannot give GrabCut a foreground model.

:func:`grabcut_refine` is GrabCut started from a label map instead of the bare box
(``cv2.GC_INIT_WITH_MASK`` with the map's class-L_k pixels as probable foreground and the
rest of the box as probable background, outside the box definite background): the colour
models are fitted to the propagated labels, and the graph cut snaps their stride-8 outline to
the image edges. Re-running GrabCut on a better mask is Khoreva et al.'s "Simple Does It"
(CVPR 2017) recursion; it is not in the thesis.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .boxes import largest_first
from .types import IGNORE, Box


def grabcut_box(
    image: np.ndarray, box: Box, iterations: int, crop_margin: float | None, seed: int, init: np.ndarray | None = None
) -> np.ndarray:
    """Foreground mask (bool, image-sized, False outside the box) of GrabCut on one box.

    ``init`` (bool, image-sized): probable foreground inside the box (the rest of the box
    probable background); ``None``: the whole box is probable foreground.
    """
    h, w = image.shape[:2]
    if crop_margin is None:
        cx0, cy0, cx1, cy1 = 0, 0, w, h
    else:
        mx = int(round(crop_margin * (box.x1 - box.x0))) + 2
        my = int(round(crop_margin * (box.y1 - box.y0))) + 2
        cx0, cy0 = max(0, box.x0 - mx), max(0, box.y0 - my)
        cx1, cy1 = min(w, box.x1 + mx), min(h, box.y1 + my)
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])  # OpenCV wants BGR
    mask = np.full(crop.shape[:2], cv2.GC_BGD, np.uint8)
    bx0, by0, bx1, by1 = box.x0 - cx0, box.y0 - cy0, box.x1 - cx0, box.y1 - cy0
    if init is None:
        mask[by0:by1, bx0:bx1] = cv2.GC_PR_FGD
    else:
        inner = init[box.y0 : box.y1, box.x0 : box.x1]
        mask[by0:by1, bx0:bx1] = np.where(inner, cv2.GC_PR_FGD, cv2.GC_PR_BGD)
    if (mask == cv2.GC_BGD).sum() == 0:
        # The box covers the whole crop: GrabCut needs background samples, so its 1-pixel
        # border becomes *probable* background (it may still flip to foreground).
        mask[[0, -1], :] = cv2.GC_PR_BGD
        mask[:, [0, -1]] = cv2.GC_PR_BGD
    fg = np.zeros((h, w), bool)
    if (mask == cv2.GC_PR_FGD).sum() == 0:
        return fg
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    cv2.grabCut(crop, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    fg[cy0:cy1, cx0:cx1] = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    box_only = np.zeros((h, w), bool)
    box_only[box.y0 : box.y1, box.x0 : box.x1] = True
    return fg & box_only


def _usable(box: Box, min_box_side: int) -> bool:
    return min(box.x1 - box.x0, box.y1 - box.y0) >= min_box_side


def grabcut_seeds(
    image: np.ndarray,
    boxes: Sequence[Box],
    iterations: int = 5,
    crop_margin: float | None = 0.5,
    min_box_side: int = 4,
    seed: int = 0,
) -> np.ndarray:
    """M_B of Eq. 3.3 for an RGB uint8 image and its boxes; uint8 labels, 255 = unknown
    (a box thinner than ``min_box_side`` stays unknown)."""
    h, w = image.shape[:2]
    labels = np.zeros((h, w), np.uint8)
    for box in boxes:
        labels[box.y0 : box.y1, box.x0 : box.x1] = IGNORE
    for k in largest_first(boxes):
        box = boxes[k]
        if _usable(box, min_box_side):
            labels[grabcut_box(image, box, iterations, crop_margin, seed + k)] = box.cls
    return labels


def grabcut_filled(labels: np.ndarray) -> np.ndarray:
    """M_B with its unknown pixels (GrabCut background inside boxes, too-thin boxes) as background."""
    return np.where(labels == IGNORE, 0, labels).astype(np.uint8)


def grabcut_refine(
    image: np.ndarray,
    labels: np.ndarray,
    boxes: Sequence[Box],
    iterations: int = 5,
    crop_margin: float | None = 0.5,
    min_box_side: int = 4,
    seed: int = 0,
    min_iou: float = 0.0,
) -> np.ndarray:
    """GrabCut per box started from ``labels`` (a full label map, no 255).

    Inside the boxes every pixel of a boxed class is decided again: background unless some
    box's GrabCut (initialised with that box's class pixels of ``labels``) calls it
    foreground, smaller boxes winning as in Eq. 3.3. Pixels outside every box, pixels of
    classes without a box, and boxes too thin for GrabCut keep their label. A box whose
    GrabCut foreground overlaps its initial class pixels with IoU below ``min_iou`` keeps
    those pixels instead (GrabCut's colour models failed there: small, low-contrast objects).
    """
    out = labels.copy()
    inside = np.zeros(labels.shape, bool)
    usable = [k for k in largest_first(boxes) if _usable(boxes[k], min_box_side)]
    for k in usable:
        b = boxes[k]
        inside[b.y0 : b.y1, b.x0 : b.x1] = True
    boxed = np.isin(labels, [boxes[k].cls for k in usable])
    out[inside & boxed] = 0
    for k in usable:
        box = boxes[k]
        init = np.zeros(labels.shape, bool)
        init[box.y0 : box.y1, box.x0 : box.x1] = labels[box.y0 : box.y1, box.x0 : box.x1] == box.cls
        fg = grabcut_box(image, box, iterations, crop_margin, seed + k, init=init)
        union = (fg | init).sum()
        if union and (fg & init).sum() < min_iou * union:
            fg = init
        out[fg] = box.cls
    return out

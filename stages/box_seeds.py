"""``box_seeds``: GrabCut seed labels from object boxes (thesis Sect. 3.2, Eq. 3.2-3.3).

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
``null`` = the whole image): the colour models only need nearby background, and the crop
makes small boxes in big images cheap. OpenCV's RNG is seeded per box, so results are
deterministic. A box thinner than ``min_box_side`` cannot give GrabCut a foreground model;
it stays unknown (255).

``inside_background: background`` writes the filled map below as M_B itself: GrabCut's
background inside a box becomes background seeds instead of unknown (not the thesis; for
from-scratch features, which cannot tell the background inside a box from the object).

Extra map ``grabcut_filled``: the same GrabCut with every unknown pixel taken as background,
i.e. what one call of OpenCV's GrabCut per box gives a user with no pipeline at all. It is
the reference row of every box run's ladder: a later stage earns its place by beating it.
"""
from __future__ import annotations

import cv2
import numpy as np

from .base import IGNORE, STAGES, Box, StageContext, StageResult, StageSpec, run_items

VERSION = "2"  # 2: the grabcut_filled reference map
FILLED = "grabcut_filled"


def _grabcut_box(image: np.ndarray, box: Box, iterations: int, crop_margin: float | None,
                 seed: int) -> np.ndarray:
    """Foreground mask (bool, image-sized, False outside the box) of GrabCut on one box."""
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
    mask[by0:by1, bx0:bx1] = cv2.GC_PR_FGD
    if (mask == cv2.GC_BGD).sum() == 0:
        # The box covers the whole crop: GrabCut needs background samples, so its 1-pixel
        # border becomes *probable* background (it may still flip to foreground).
        mask[[0, -1], :] = cv2.GC_PR_BGD
        mask[:, [0, -1]] = cv2.GC_PR_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    cv2.grabCut(crop, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    fg = np.zeros((h, w), bool)
    inner = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    fg[cy0:cy1, cx0:cx1] = inner
    box_only = np.zeros((h, w), bool)
    box_only[box.y0:box.y1, box.x0:box.x1] = True
    return fg & box_only


def grabcut_seeds(image: np.ndarray, boxes: list[Box], iterations: int = 5,
                  crop_margin: float | None = 0.5, min_box_side: int = 4, seed: int = 0) -> np.ndarray:
    """M_B of Eq. 3.3 for an RGB uint8 image and its boxes; uint8 labels, 255 = unknown."""
    h, w = image.shape[:2]
    labels = np.zeros((h, w), np.uint8)
    for box in boxes:
        labels[box.y0:box.y1, box.x0:box.x1] = IGNORE
    # Largest first, so a smaller box's foreground overwrites a larger one's.
    order = sorted(range(len(boxes)), key=lambda k: -boxes[k].area)
    for k in order:
        box = boxes[k]
        if min(box.x1 - box.x0, box.y1 - box.y0) < min_box_side:
            continue
        fg = _grabcut_box(image, box, iterations, crop_margin, seed + k)
        labels[fg] = box.cls
    return labels


def grabcut_filled(labels: np.ndarray) -> np.ndarray:
    """M_B with its unknown pixels (GrabCut background inside boxes, too-thin boxes) as background."""
    return np.where(labels == IGNORE, 0, labels).astype(np.uint8)


def _one(ctx: StageContext, image_id: str) -> dict:
    image = ctx.dataset.load_image(image_id)
    weak = ctx.dataset.load_weak(image_id)
    cfg = ctx.cfg
    labels = grabcut_seeds(image, weak.boxes, cfg.iterations, cfg.crop_margin, cfg.min_box_side,
                           seed=ctx.config.seed)
    filled = grabcut_filled(labels)
    ctx.out.write_label(image_id, filled, FILLED)
    ctx.out.write_label(image_id, filled if cfg.inside_background == "background" else labels)
    return {"boxes": len(weak.boxes)}


def run(ctx: StageContext) -> StageResult:
    return run_items(ctx, _one, desc="GrabCut seeds")


SPEC = STAGES.register("box_seeds", StageSpec(
    name="box_seeds", run=run, inputs=lambda config: [], supervisions=("box",),
    output="label", version=VERSION, variants=lambda config: [FILLED], reads=("dataset", "weak", "seed")))

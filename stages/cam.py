"""``cam``: class activation maps of every training image's present classes (Eq. 2.1-2.4).

Per image: ReLU'd CAMs of the tagged classes at every scale in ``cam.scales`` and their
horizontal flips, upsampled to the image, summed, each class divided by its max; then
``P_bg = (1 - max_c P_c)^alpha`` in front. Stored as a float16 soft map with class ids
``[0, c_1, ..., c_k]``, so its argmax is the CAM label map M_I (Eq. 3.1).

Quality report (when GT exists): the mIoU of ``argmax([t, P_1..P_k])`` for a constant
background score t over 0.05..0.60 (IRN's ``eval_cam``), the best t and its mIoU, next
to the mIoU of the stored (alpha) labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import PositiveFloat

from models.cam import multiscale_cam, with_background
from models.metrics import confusion_matrix, scores
from models.seeds import labels_from_soft

from .base import STAGES, Output, StageContext, StageResult, StageSpec
from .cam_train import load_trained
from .routing import cam_enabled
from .sections import Section
from .training import infer_items


# --------------------------------------------------------------------------- config section
class CamConfig(Section):
    """CAM inference (multi-scale + flip) and its background score (1 - max_c CAM)^alpha."""

    enabled: bool = True
    scales: list[PositiveFloat] = [0.5, 1.0, 1.5, 2.0]
    flip: bool = True
    alpha: PositiveFloat = 4.0


VERSION = "1"
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 13))


def cam_probs(model, image: np.ndarray, tags: list[int], cfg, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(probs (k+1, H, W), class ids [0, tags...]) for one image."""
    classes = sorted({int(c) for c in tags if c >= 1})
    cams = multiscale_cam(model, image, [c - 1 for c in classes], cfg.scales, cfg.flip, device)
    return with_background(cams, cfg.alpha), np.array([0, *classes], np.int16)


def _cam_of_image(ctx: StageContext, image_id: str, model) -> dict:
    image = ctx.dataset.load_image(image_id)
    probs, class_ids = cam_probs(model, image, ctx.dataset.load_weak(image_id).tags, ctx.section, ctx.device)
    ctx.out.write_soft(image_id, probs, class_ids)
    return {}


def run(ctx: StageContext) -> StageResult:
    return infer_items(ctx, load_trained(ctx.input("cam_train").read_model(), ctx.device), _cam_of_image, "CAM")


def threshold_sweep(ctx: StageContext) -> dict[str, Any]:
    """mIoU of the CAM labels for each constant background threshold (needs GT)."""
    c = ctx.dataset.num_classes
    conf = np.zeros((len(THRESHOLDS), c, c + 1), np.int64)
    seen = 0
    for image_id in ctx.ids:
        gt = ctx.dataset.load_gt(image_id)
        if gt is None or not ctx.out.has(image_id):
            continue
        probs, class_ids = ctx.out.read_soft(image_id)
        fg = probs[1:].astype(np.float32)
        for k, t in enumerate(THRESHOLDS):
            stack = np.concatenate([np.full((1, *fg.shape[1:]), t, np.float32), fg])
            conf[k] += confusion_matrix(labels_from_soft(stack, class_ids), gt, c)
        seen += 1
    if not seen:
        return {}
    curve = {str(t): round(scores(m)["miou"], 4) for t, m in zip(THRESHOLDS, conf)}
    best = max(curve, key=curve.get)
    return {"threshold_sweep": curve, "best_threshold": float(best), "best_threshold_miou": curve[best]}


SPEC = STAGES.register(
    StageSpec(
        name="cam",
        tiny={"scales": [1.0]},
        section=CamConfig,
        run=run,
        inputs=lambda config: ["cam_train"],
        output=Output.SOFT,
        version=VERSION,
        parallel=False,
        enabled=cam_enabled,
        report=threshold_sweep,
        reads=("dataset", "weak"),
    )
)

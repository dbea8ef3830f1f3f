"""``dfr_eval``: the DFR network on the val split (DFR Sect. 4.2): the semantic head only
(no feature consistency head), softmax averaged over ``scales`` (0.5-1.75) and flips at
image size, argmax as a label PNG; per-class IoU and mIoU against GT like every label
stage, and shown by ``wsss inspect``.
"""
from __future__ import annotations

from models.seeds import labels_from_soft
from models.segmentation import predict_probs
from models.types import Supervision

from .base import STAGES, StageContext, StageResult, StageSpec
from .dfr_train import load_trained
from .training import infer_items

VERSION = "1"


def _predict_image(ctx: StageContext, image_id: str, model) -> dict:
    probs = predict_probs(model, ctx.dataset.load_image(image_id), ctx.section.scales, ctx.section.flip, ctx.device)
    ctx.out.write_label(image_id, labels_from_soft(probs))
    return {}


def run(ctx: StageContext) -> StageResult:
    return infer_items(ctx, load_trained(ctx.input("dfr_train").read_model(), ctx.device), _predict_image, "DFR inference")


SPEC = STAGES.register(StageSpec(
    name="dfr_eval", run=run, inputs=lambda config: ["dfr_train"], supervisions=(Supervision.DFR,), output="label",
    version=VERSION, split="val", parallel=False))

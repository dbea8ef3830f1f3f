"""``blpseg_eval``: the BLPSeg network on the val split: the LAM output of the segmentation
head (the scribble head is dropped, BLPSeg Sect. IV-B), softmax averaged over ``scales`` and
flips at image size, argmax as a label PNG; scored against GT like every label stage."""
from __future__ import annotations

from models.seeds import labels_from_soft
from models.segmentation import predict_probs
from models.types import Supervision

from .base import STAGES, StageContext, StageResult, StageSpec
from .blpseg_train import load_trained
from .training import infer_items

VERSION = "1"


def _predict_image(ctx: StageContext, image_id: str, model) -> dict:
    probs = predict_probs(model, ctx.dataset.load_image(image_id), ctx.section.scales, ctx.section.flip, ctx.device)
    ctx.out.write_label(image_id, labels_from_soft(probs))
    return {}


def run(ctx: StageContext) -> StageResult:
    return infer_items(ctx, load_trained(ctx.input("blpseg_train").read_model(), ctx.device), _predict_image,
                       "BLPSeg inference")


SPEC = STAGES.register(StageSpec(
    name="blpseg_eval", run=run, inputs=lambda config: ["blpseg_train"], supervisions=(Supervision.BLPSEG,),
    output="label", version=VERSION, split="val", parallel=False))

"""``blpseg_eval``: the BLPSeg network on the val split: the LAM output of the segmentation
head (the scribble head is dropped, BLPSeg Sect. IV-B), softmax averaged over ``scales`` and
flips at image size, argmax as a label PNG; scored against GT like every label stage."""

from __future__ import annotations


from .base import STAGES, StageContext, StageResult, StageSpec
from .blpseg_train import load_trained
from .training import infer_items, predict_val_label

VERSION = "1"


def run(ctx: StageContext) -> StageResult:
    return infer_items(
        ctx, load_trained(ctx.input("blpseg_train").read_model(), ctx.device), predict_val_label, "BLPSeg inference"
    )


SPEC = STAGES.register(
    StageSpec(
        name="blpseg_eval",
        run=run,
        inputs=lambda config: ["blpseg_train"],
        methods=("blpseg",),
        output="label",
        version=VERSION,
        split="val",
        parallel=False,
    )
)

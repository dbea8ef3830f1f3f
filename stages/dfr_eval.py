"""``dfr_eval``: the DFR network on the val split (DFR Sect. 4.2): the semantic head only
(no feature consistency head), softmax averaged over ``scales`` (0.5-1.75) and flips at
image size, argmax as a label PNG; per-class IoU and mIoU against GT like every label
stage, and shown by ``wsss inspect``.
"""

from __future__ import annotations


from .base import STAGES, StageContext, StageResult, StageSpec
from .dfr_train import load_trained
from .training import infer_items, predict_val_label

VERSION = "1"


def run(ctx: StageContext) -> StageResult:
    return infer_items(
        ctx, load_trained(ctx.input("dfr_train").read_model(), ctx.device), predict_val_label, "DFR inference"
    )


SPEC = STAGES.register(
    StageSpec(
        name="dfr_eval",
        run=run,
        inputs=lambda config: ["dfr_train"],
        methods=("dfr",),
        output="label",
        version=VERSION,
        split="val",
        parallel=False,
    )
)

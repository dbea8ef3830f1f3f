"""``blpseg_eval``: the BLPSeg network on the val split: the LAM output of the segmentation
head (the scribble head is dropped, BLPSeg Sect. IV-B), softmax averaged over ``scales`` and
flips at image size, argmax as a label PNG; scored against GT like every label stage."""

from __future__ import annotations

from pydantic import PositiveFloat

from .base import STAGES, Output, StageContext, StageResult, StageSpec
from .blpseg_train import load_trained
from .sections import Section
from .training import infer_items, predict_val_label


# --------------------------------------------------------------------------- config section
class BlpsegEvalConfig(Section):
    """Val-split inference of the BLPSeg network (the LAM output; the scribble head is
    dropped): single scale as the paper's ablations; its state-of-the-art tables use scales
    0.5-1.25 (released) with flips."""

    scales: list[PositiveFloat] = [1.0]
    flip: bool = False


VERSION = "1"


def run(ctx: StageContext) -> StageResult:
    return infer_items(
        ctx, load_trained(ctx.input("blpseg_train").read_model(), ctx.device), predict_val_label, "BLPSeg inference"
    )


SPEC = STAGES.register(
    StageSpec(
        name="blpseg_eval",
        section=BlpsegEvalConfig,
        run=run,
        inputs=lambda config: ["blpseg_train"],
        output=Output.LABEL,
        version=VERSION,
        split="val",
        parallel=False,
    )
)

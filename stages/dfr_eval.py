"""``dfr_eval``: the DFR network on the val split (DFR Sect. 4.2): the semantic head only
(no feature consistency head), softmax averaged over ``scales`` (0.5-1.75) and flips at
image size, argmax as a label PNG; per-class IoU and mIoU against GT like every label
stage, and shown by ``wsss inspect``.
"""

from __future__ import annotations

from pydantic import PositiveFloat

from .base import STAGES, Output, StageContext, StageResult, StageSpec
from .dfr_train import load_trained
from .sections import Section
from .training import infer_items, predict_val_label


# --------------------------------------------------------------------------- config section
class DfrEvalConfig(Section):
    """Val-split inference of the DFR network (no feature head): ``scales`` (the paper's
    multi-scale set is 0.5-1.75) and ``flip``, softmax averaged at image size."""

    scales: list[PositiveFloat] = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    flip: bool = True


VERSION = "1"


def run(ctx: StageContext) -> StageResult:
    return infer_items(
        ctx, load_trained(ctx.input("dfr_train").read_model(), ctx.device), predict_val_label, "DFR inference"
    )


SPEC = STAGES.register(
    StageSpec(
        name="dfr_eval",
        tiny={"scales": [1.0], "flip": False},
        section=DfrEvalConfig,
        run=run,
        inputs=lambda config: ["dfr_train"],
        output=Output.LABEL,
        version=VERSION,
        split="val",
        parallel=False,
    )
)

"""``rrm_labels``: the RRM network as a pseudo-label maker on the train split (the thesis'
two-step use, Sect. 2.3: "we firstly used our network to produce the pseudo masks for the
training dataset"). Main map ``tags``: the segmentation branch's softmax restricted to
background and the image's tags, renormalised, then the dense CRF (pseudo-labels may use the
image's tags, as every pseudo-label stage here does). Beside it: ``cam_crf``, the plain CAM +
CRF labels of the same network's classification branch (Eq. 2.5; from a network trained with
``rrm_train.cls_only_fraction: 1`` it is RRM's baseline, the plain CAM network), ``seg`` (the
branch + CRF without tags, what ``rrm_eval`` scores on val) and ``no_crf``. Scored on the
train split's GT, so settings are chosen here, never on val."""

from __future__ import annotations

from .base import STAGES, Output, StageContext, StageResult, StageSpec
from .rrm_eval import run_maps
from .sections import RrmEvalConfig


# --------------------------------------------------------------------------- config section
class RrmLabelsConfig(RrmEvalConfig):
    """Train-split inference of the RRM network (``rrm_labels``: its pseudo-labels, the
    thesis' two-step use): the same keys as ``rrm_eval``, the segmentation branch given the
    image's tags as the main map."""


VERSION = "1"
VARIANTS = ["cam_crf", "seg", "no_crf"]


def run(ctx: StageContext) -> StageResult:
    return run_maps(ctx, "tags", "RRM pseudo-labels")


SPEC = STAGES.register(
    StageSpec(
        name="rrm_labels",
        section=RrmLabelsConfig,
        run=run,
        inputs=lambda config: ["rrm_train"],
        output=Output.LABEL,
        version=VERSION,
        split="train",
        parallel=False,
        variants=lambda config: VARIANTS,
        reads=("dataset", "weak"),
    )
)

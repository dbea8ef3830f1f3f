"""``final_eval``: the final model on the val split (thesis Table 3.1).

Per image: the softmax of :class:`models.deeplab.DeepLab`, single scale or averaged
over ``scales`` (and flips); its argmax is the main map, and with ``use_crf`` the dense-CRF
post-processing of those probabilities (:func:`models.crf.crf_from_probs`, the released
A²GNN inference parameters by default) is the ``crf`` map. Both are label PNGs, scored
against GT like every label stage (per-class IoU and mIoU: ``metrics`` is the "w/o CRF"
column, ``metrics.maps.crf`` the "w/ CRF" column), and shown by ``wsss inspect``.
"""

from __future__ import annotations

from pydantic import Field, PositiveFloat

from models.crf import crf_from_probs
from models.seeds import labels_from_soft
from models.segmentation import predict_probs

from .base import STAGES, Output, StageContext, StageResult, StageSpec
from .final_train import load_trained
from .sections import InferenceCrfParams, Section
from .training import infer_items


# --------------------------------------------------------------------------- config section
class FinalEvalConfig(Section):
    """Val-split inference of the final model: ``scales`` (1.0 = single scale; the thesis'
    multi-scale set is 0.5-1.75) with optional ``flip``, softmax averaged at image size;
    the ``crf`` map (dense CRF post-processing, Table 3.1's "w/ CRF" column) when
    ``use_crf``."""

    scales: list[PositiveFloat] = [1.0]
    flip: bool = False
    use_crf: bool = True
    crf: InferenceCrfParams = Field(default_factory=InferenceCrfParams)


VERSION = "1"


def _predict_image(ctx: StageContext, image_id: str, model) -> dict:
    cfg = ctx.section
    image = ctx.dataset.load_image(image_id)
    probs = predict_probs(model, image, cfg.scales, cfg.flip, ctx.device)
    if cfg.use_crf:
        ctx.out.write_label(image_id, labels_from_soft(crf_from_probs(image, probs, cfg.crf)), "crf")
    ctx.out.write_label(image_id, labels_from_soft(probs))
    return {}


def run(ctx: StageContext) -> StageResult:
    return infer_items(
        ctx, load_trained(ctx.input("final_train").read_model(), ctx.device), _predict_image, "final model inference"
    )


SPEC = STAGES.register(
    StageSpec(
        name="final_eval",
        section=FinalEvalConfig,
        run=run,
        inputs=lambda config: ["final_train"],
        output=Output.LABEL,
        version=VERSION,
        split="val",
        parallel=False,
        variants=lambda config: ["crf"] if config.final_eval.use_crf else [],
    )
)

"""``rrm_eval``: the RRM network on the val split. Main map: the segmentation branch (softmax
averaged over ``scales`` and flips at image size) refined by the dense CRF, as the thesis
evaluates (``crf_post``); beside it ``no_crf`` (the argmax before the CRF) and ``cam_crf``:
the plain CAM + CRF labels of the same network's classification branch (Eq. 2.5 with the
image's tags, ``rrm_train``'s CAM scales, gamma and CRF), the baseline RRM's segmentation
branch must beat."""
from __future__ import annotations

import torch

from models.cam import multiscale_cam
from models.crf import crf_from_probs
from models.rrm import cam_crf_labels
from models.seeds import labels_from_soft
from models.segmentation import predict_probs
from models.types import Supervision

from .base import STAGES, StageContext, StageResult, StageSpec
from .rrm_train import load_trained
from .training import infer_items

VERSION = "1"
VARIANTS = ["no_crf", "cam_crf"]


def _rrm_label(ctx: StageContext, image_id: str, model: torch.nn.Module) -> dict:
    cfg, train = ctx.section, ctx.config.rrm_train
    image = ctx.dataset.load_image(image_id)
    probs = predict_probs(model, image, cfg.scales, cfg.flip, ctx.device)
    plain = labels_from_soft(probs)
    ctx.out.write_label(image_id, plain, "no_crf")
    final = labels_from_soft(crf_from_probs(image, probs, cfg.crf)) if cfg.crf_post else plain
    tags = sorted(c for c in set(ctx.dataset.load_weak(image_id).tags) if 1 <= c < ctx.dataset.num_classes)
    cams = multiscale_cam(model, image, [c - 1 for c in tags], train.cam_scales, flip=False, device=ctx.device)
    ctx.out.write_label(image_id, cam_crf_labels(image, cams, tags, train.gamma, train.crf), "cam_crf")
    ctx.out.write_label(image_id, final)
    return {}


def run(ctx: StageContext) -> StageResult:
    return infer_items(ctx, load_trained(ctx.input("rrm_train").read_model(), ctx.device), _rrm_label,
                       "RRM inference")


SPEC = STAGES.register(StageSpec(
    name="rrm_eval", run=run, inputs=lambda config: ["rrm_train"], supervisions=(Supervision.RRM,),
    output="label", version=VERSION, split="val", parallel=False, variants=lambda config: VARIANTS,
    reads=("dataset", "weak")))

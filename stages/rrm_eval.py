"""``rrm_eval``: the RRM network on the val split. Main map: the segmentation branch (softmax
averaged over ``scales`` and flips at image size) refined by the dense CRF, as the thesis
evaluates (``crf_post``); beside it ``no_crf`` (the argmax before the CRF), ``cam_crf``: the
plain CAM + CRF labels of the same network's classification branch (Eq. 2.5 with the image's
tags, ``rrm_train``'s CAM scales, gamma and CRF), the baseline RRM's segmentation branch must
beat, and ``tags``: the segmentation branch as a pseudo-label maker (the thesis' two-step
use, Table 2.6), its softmax restricted to background and the image's tags, renormalised,
then the same CRF. ``cam_crf`` and ``tags`` read the image's tags, the main map does not; a
comparison with ``cam_crf`` is fair against ``tags``."""

from __future__ import annotations

import functools

import numpy as np
import torch

from models.cam import multiscale_cam
from models.crf import crf_from_probs
from models.rrm import cam_crf_labels
from models.seeds import labels_from_soft
from models.segmentation import predict_probs

from .base import STAGES, Output, StageContext, StageResult, StageSpec
from .rrm_train import load_trained
from .sections import RrmEvalConfig
from .training import infer_items

VERSION = "2"  # 2: the ``tags`` map
VARIANTS = ["no_crf", "cam_crf", "tags"]


def rrm_maps(ctx: StageContext, image_id: str, model: torch.nn.Module, cfg) -> dict[str, np.ndarray]:
    """Every label map of the RRM network for one image, with ``cfg`` the inference section
    (``rrm_eval`` or ``rrm_labels``: scales, flip, CRF): ``seg`` the segmentation branch (+ the
    CRF when ``crf_post``), ``no_crf`` its argmax, ``tags`` the branch given the image's tags
    (:func:`tag_restricted_labels`) and ``cam_crf`` the classification branch's CAM + CRF labels
    (Eq. 2.5 with ``rrm_train``'s CAM scales, gamma and CRF)."""
    train = ctx.config.rrm_train
    image = ctx.dataset.load_image(image_id)
    probs = predict_probs(model, image, cfg.scales, cfg.flip, ctx.device)
    plain = labels_from_soft(probs)
    tags = sorted(c for c in set(ctx.dataset.load_weak(image_id).tags) if 1 <= c < ctx.dataset.num_classes)
    cams = multiscale_cam(model, image, [c - 1 for c in tags], train.cam_scales, flip=False, device=ctx.device)
    return {
        "seg": labels_from_soft(crf_from_probs(image, probs, cfg.crf)) if cfg.crf_post else plain,
        "no_crf": plain,
        "tags": tag_restricted_labels(image, probs, tags, cfg.crf if cfg.crf_post else None),
        "cam_crf": cam_crf_labels(image, cams, tags, train.gamma, train.crf),
    }


def write_maps(ctx: StageContext, image_id: str, model: torch.nn.Module, main: str) -> dict:
    """:func:`rrm_maps` of the stage's section written out: ``main`` as the stage's label,
    the others as its variants."""
    maps = rrm_maps(ctx, image_id, model, ctx.section)
    for name, labels in maps.items():
        if name != main:
            ctx.out.write_label(image_id, labels, name)
    ctx.out.write_label(image_id, maps[main])
    return {}


def tag_restricted_labels(image: np.ndarray, probs: np.ndarray, tags: list[int], crf) -> np.ndarray:
    """The segmentation branch's labels given the image's tags: softmax ``probs`` (C, H, W) over
    background and ``tags`` (ids >= 1), renormalised per pixel, then the dense CRF ``crf``
    (None: none); uint8 class ids (H, W)."""
    ids = np.asarray([0, *tags], np.uint8)
    kept = probs[ids]
    kept = kept / np.maximum(kept.sum(0, keepdims=True), 1e-8)
    if crf is not None:
        kept = crf_from_probs(image, kept, crf)
    return labels_from_soft(kept, ids)


def run_maps(ctx: StageContext, main: str, desc: str) -> StageResult:
    """An RRM inference stage: the trained network over the stage's images, :func:`write_maps`
    with ``main`` as the stage's label (``rrm_eval``: ``seg``, ``rrm_labels``: ``tags``)."""
    return infer_items(
        ctx,
        load_trained(ctx.input("rrm_train").read_model(), ctx.device),
        functools.partial(write_maps, main=main),
        desc,
    )


def run(ctx: StageContext) -> StageResult:
    return run_maps(ctx, "seg", "RRM inference")


SPEC = STAGES.register(
    StageSpec(
        name="rrm_eval",
        section=RrmEvalConfig,
        run=run,
        inputs=lambda config: ["rrm_train"],
        output=Output.LABEL,
        version=VERSION,
        split="val",
        parallel=False,
        variants=lambda config: VARIANTS,
        reads=("dataset", "weak"),
    )
)

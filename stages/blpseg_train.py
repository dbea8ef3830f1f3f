"""``blpseg_train``: the single-stage BLPSeg network trained straight on scribbles (BLPSeg
Sect. III-IV). No pseudo-labels: the supervision is the sparse label map (scribbles, or points
with ``labels: point``; 255 = unlabelled).

:class:`models.segmentation.BlpNet` (backbone + UperNet fusion, segmentation head through the
local aggregation module, scribble head with the extra "unlabelled" class) trained with::

    L = WCE(p^scrib, y') + BL(p^seg, p^scrib, y)                                (BLPSeg Eq. 12)

(:mod:`models.blpseg`), both on logits bilinearly upsampled to the crop as released; from step
``self_training_from`` BL's y is the segmentation head's own confident labels
(:func:`models.blpseg.self_training_labels`). Each term switchable for Table I (``lam``,
``blp``; ``self_training_from: null``). AdamW with poly decay; random rescale, flip,
photometric distortion and crop (padding is 255 in the labels and left out of both losses).
Checkpoints hold model, optimiser, loss history and RNG states; every crop is a function of
(seed, step), so a killed run resumes exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from models.blpseg import blp_loss, self_training_labels, weighted_ce
from models.segmentation import BlpNet

from .base import STAGES, StageContext, StageResult, StageSpec
from .training import train_sparse, trained_model

VERSION = "1"


def build_model(arch: dict[str, Any]) -> BlpNet:
    return BlpNet(
        arch["backbone"],
        arch["num_classes"],
        arch.get("weights", "none"),
        arch["channels"],
        arch["low_dim"],
        arch["sigma"],
        arch["radius"],
        arch["lam"],
    )


def load_trained(state: dict[str, Any], device: str) -> BlpNet:
    """The trained network from a ``model.pt`` state, in eval mode on ``device``."""
    return trained_model(state, build_model, device)


def blpseg_objective(
    seg_grid: torch.Tensor, scrib_grid: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, cfg, self_training: bool
) -> dict[str, torch.Tensor]:
    """BLPSeg Eq. 12 on a batch: grid logits upsampled to the crop, WCE of the scribble head
    (only with ``blp``: without BL nothing reads p^scrib), BL (delta = 1 without ``blp``: partial
    CE) of the segmentation head on the scribbles or, with ``self_training``, its own labels."""
    size = labels.shape[-2:]
    seg = F.interpolate(seg_grid, size=size, mode="bilinear", align_corners=False)
    target = labels
    if self_training:
        target = self_training_labels(torch.softmax(seg.detach(), 1), labels, real, cfg.self_training_threshold)
    out: dict[str, torch.Tensor] = {}
    if cfg.blp:
        scrib = F.interpolate(scrib_grid, size=size, mode="bilinear", align_corners=False)
        out["wce"] = weighted_ce(scrib, labels, real, cfg.unlabelled_weight, cfg.normalize)
        out["bl"] = blp_loss(seg, torch.softmax(scrib.detach(), 1), target, cfg.gamma, cfg.normalize)
    else:
        out["bl"] = blp_loss(seg, None, target, cfg.gamma, cfg.normalize)
    out["loss"] = sum(out.values())
    return out


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.section
    arch = {
        "backbone": cfg.backbone,
        "num_classes": ctx.dataset.num_classes,
        "weights": cfg.weights,
        "channels": cfg.channels,
        "low_dim": cfg.low_dim,
        "sigma": cfg.sigma,
        "radius": cfg.radius,
        "lam": cfg.lam,
    }

    def objective(outputs, x, y, real, step: int) -> dict[str, torch.Tensor]:
        seg, scrib = outputs
        self_training = cfg.self_training_from is not None and step >= cfg.self_training_from
        return blpseg_objective(seg.float(), scrib.float(), y, real, cfg, self_training)

    return train_sparse(ctx, build_model, arch, objective, ("wce", "bl"))


def preflight(config) -> None:
    """Backbone weights must be on disk before anything runs (nothing is downloaded)."""
    from models.backbones import swin_weights_path, weights_path

    cfg = config.blpseg_train
    if cfg.backbone.startswith("resnet"):
        weights_path(cfg.weights, cfg.backbone)
    else:
        swin_weights_path(cfg.backbone, cfg.weights)


SPEC = STAGES.register(
    StageSpec(
        name="blpseg_train",
        run=run,
        inputs=lambda config: [],
        methods=("blpseg",),
        output="model",
        version=VERSION,
        per_image=False,
        parallel=False,
        preflight=preflight,
        reads=("dataset", "weak", "seed", "labels"),
    )
)

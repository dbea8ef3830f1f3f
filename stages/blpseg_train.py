"""``blpseg_train``: the single-stage BLPSeg network trained straight on scribbles (BLPSeg
Sect. III-IV). No pseudo-labels: the supervision is the sparse label map (scribbles, or points
with ``labels: point``; 255 = unlabelled).

:class:`models.blp_net.BlpNet` (backbone + UperNet fusion, segmentation head through the
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

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from models.blpseg import blp_loss, self_training_labels, weighted_ce
from models.segmentation import BlpNet

from .base import STAGES, StageContext, StageResult
from .sections import Section, SwinArch
from .training import TINY_STEPS, train_sparse, trained_model, training_spec


# --------------------------------------------------------------------------- config section
class BlpsegTrainConfig(Section):
    """The single-stage BLPSeg network trained on scribbles (BLPSeg Sect. III-IV; defaults are
    the paper's VOC settings). ``backbone`` ``resnet101`` (ImageNet weights in the paper;
    ``resnet18/34/50`` or a Swin name too) + UperNet fusion into ``channels`` (256, released),
    segmentation and scribble heads. ``lam``: the local aggregation module with ``sigma`` (6)
    on a window of ``radius`` stride-4 cells (18 = 3 sigma: the Gaussian is below 1.1% beyond)
    over a ``low_dim`` low-level embedding. ``blp``: the BL loss with ``gamma`` (2); off, the
    segmentation head gets plain partial CE (gamma 0: the ablation's baseline). WCE of the
    scribble head with ``unlabelled_weight`` (0.02) for the extra class. ``normalize``:
    ``printed`` (WCE / N, BL / N_seg, BLPSeg Eq. 1, 9) or ``released`` (the authors' code).
    Self-training from step ``self_training_from`` (10k; null: off): the segmentation head's
    own argmax over the image's scribbled classes where it is above ``self_training_threshold``
    (0.9, the released value; the paper says "sharpened into one-hot form"), scribbles kept.
    AdamW lr 3e-4 (the paper; the released config has 3e-5), weight decay 0.01, poly 0.9;
    40 epochs of batch 10 (``iterations`` overrides), random rescale 0.75-1.25, flip, crop
    384; mixed precision on CUDA."""

    backbone: str = "resnet101"
    weights: str = "none"  # none | imagenet | path (the backbone's torchvision state dict)
    channels: PositiveInt = 256
    low_dim: PositiveInt = 256
    lam: bool = True
    sigma: PositiveFloat = 6.0
    radius: PositiveInt = 18
    blp: bool = True
    gamma: Annotated[float, Field(ge=0.0)] = 2.0
    unlabelled_weight: Annotated[float, Field(ge=0.0)] = 0.02
    normalize: Literal["printed", "released"] = "printed"
    self_training_from: Annotated[int, Field(ge=0)] | None = 10000
    self_training_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    batch_size: PositiveInt = 10
    epochs: PositiveInt = 40
    iterations: PositiveInt | None = None
    lr: PositiveFloat = 3e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    poly_power: PositiveFloat = 0.9
    crop: Annotated[int, Field(ge=32)] = 384
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.75, 1.25)
    photometric: bool = True
    checkpoint_every: PositiveInt = 1000
    amp: bool = True

    @field_validator("backbone")
    @classmethod
    def _check_backbone(cls, value: str) -> str:
        known = ("resnet18", "resnet34", "resnet50", "resnet101", *SwinArch.__args__)
        if value not in known:
            raise ValueError(f"unknown backbone {value!r} (known: {', '.join(known)})")
        return value


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
    training_spec(
        name="blpseg_train",
        tiny={
            **TINY_STEPS,
            "backbone": "resnet18",
            "channels": 16,
            "low_dim": 8,
            "radius": 3,
            "self_training_from": 1,
        },
        section=BlpsegTrainConfig,
        run=run,
        version=VERSION,
        preflight=preflight,
        reads=("dataset", "weak", "seed", "labels"),
    )
)

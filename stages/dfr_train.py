"""``dfr_train``: the single-stage DFR network trained straight on scribbles (DFR paper
Eq. 1-13, Sect. 4.2; thesis Ch. 4). No pseudo-labels: the only supervision is the sparse
label map (scribbles, or points with ``labels: point``; 255 = unlabelled).

:class:`models.dfr_net.DfrNet` (Swin + UperNet fusion, semantic head P, feature
consistency head F) trained with :func:`models.losses.dfr_objective`::

    L = L_pce + lambda_dfr L_dfr + lambda_feat (L_fd + L_fr)                     (Eq. 1)

each term switchable (Table 4-5; pCE only and pCE + Potts are the baselines). AdamW with
linear warm-up and poly decay; random rescale, flip, photometric distortion and crop
(padding is 255 in the labels and left out of every pairwise term); mixed precision on
CUDA. Checkpoints hold model, optimiser, loss history, RNG states and AMP scaler, and
every crop is a function of (seed, step), so a killed run resumes exactly.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from models.backbones import swin_weights_path
from models.losses import dfr_objective
from models.params import DfrTerms
from models.segmentation import DfrNet

from .base import STAGES, StageContext, StageResult
from .sections import Section, SwinArch
from .training import TINY_STEPS, train_sparse, trained_model, training_spec


# --------------------------------------------------------------------------- config section
class DfrTrainConfig(DfrTerms, Section):
    """The single-stage DFR network trained on scribbles (DFR Sect. 3, 4.2; thesis Ch. 4).

    Swin ``backbone`` (``swin_t`` default, ``swin_b`` as the paper, ``swin_mini`` CPU-sized
    for the demo) + UperNet fusion of ``fusion_stages`` (Table 6) into ``channels``; semantic
    head and feature consistency head (``feature_dim`` = d = 128). Eq. 1:
    ``L = L_pce + lambda_dfr L_dfr + lambda_feat (L_fd + L_fr)``; the switches give Table 4
    and 5 and the baselines: pCE only (``dfr: false, fd: false, fr: false``) and pCE + Potts
    of Tang et al. (``kernel_feature: false, fd: false, fr: false``). Pairs: a square
    window of ``radius`` on the stride-4 grid; kernel sigmas ``sigma_xy`` (grid cells),
    ``sigma_rgb`` (ImageNet-normalised RGB), ``sigma_feat``; confident labels at ``gamma``.

    AdamW (lr 3e-5, weight decay 0.01 of Sect. 4.2; none on norms, biases and position
    tables), linear warm-up of ``warmup_iterations`` from ``warmup_ratio`` x lr, then poly
    decay (power 1, mmseg); random rescale in ``scale_range``, flip, photometric distortion,
    ``crop``; mixed precision on CUDA. It trains on the run's ``labels`` (scribble or point).
    """

    backbone: SwinArch = "swin_t"
    weights: str = "none"  # none | imagenet | /path/to/torchvision_swin_state_dict.pth
    fusion_stages: list[Annotated[int, Field(ge=1, le=4)]] = [1, 2, 3, 4]
    channels: PositiveInt = 512
    feature_dim: PositiveInt = 128
    batch_size: PositiveInt = 16
    iterations: PositiveInt = 40000
    lr: PositiveFloat = 3e-5
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    poly_power: PositiveFloat = 1.0
    warmup_iterations: Annotated[int, Field(ge=0)] = 1500
    warmup_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-6
    crop: Annotated[int, Field(ge=32)] = 512
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)
    photometric: bool = True
    checkpoint_every: PositiveInt = 1000
    amp: bool = True


VERSION = "1"
TERMS = ("pce", "dfr", "fd", "fr")
DIAGNOSTICS = ("k_feature", "confident")  # see models.losses.dfr_objective


def build_model(arch: dict[str, Any]) -> DfrNet:
    return DfrNet(
        arch["backbone"],
        arch["num_classes"],
        arch.get("weights", "none"),
        arch["fusion_stages"],
        arch["channels"],
        arch["feature_dim"],
        arch["feature_head"],
    )


def load_trained(state: dict[str, Any], device: str) -> DfrNet:
    """The trained network from a ``model.pt`` state, in eval mode on ``device``."""
    return trained_model(state, build_model, device)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.section
    arch = {
        "backbone": cfg.backbone,
        "num_classes": ctx.dataset.num_classes,
        "weights": cfg.weights,
        "fusion_stages": list(cfg.fusion_stages),
        "channels": cfg.channels,
        "feature_dim": cfg.feature_dim,
        "feature_head": cfg.uses_features,
    }  # the section is a DfrTerms (models.params)

    def objective(outputs, x, y, real, step: int) -> dict[str, torch.Tensor]:
        logits, feats = outputs
        return dfr_objective(logits.float(), None if feats is None else feats.float(), x.float(), y, real, cfg)

    return train_sparse(ctx, build_model, arch, objective, TERMS, DIAGNOSTICS)


def preflight(config) -> None:
    """Backbone weights must be on disk before anything runs (nothing is downloaded)."""
    swin_weights_path(config.dfr_train.backbone, config.dfr_train.weights)


SPEC = STAGES.register(
    training_spec(
        name="dfr_train",
        tiny={
            **TINY_STEPS,
            "backbone": "swin_mini",
            "channels": 16,
            "feature_dim": 8,
            "warmup_iterations": 0,
            "lr": 0.001,
        },
        section=DfrTrainConfig,
        run=run,
        version=VERSION,
        preflight=preflight,
        reads=("dataset", "weak", "seed", "labels"),
    )
)

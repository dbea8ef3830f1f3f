"""``dfr_train``: the single-stage DFR network trained straight on scribbles (DFR paper
Eq. 1-13, Sect. 4.2; thesis Ch. 4). No pseudo-labels: the only supervision is the sparse
label map (scribbles, or points with ``labels: point``; 255 = unlabelled).

:class:`models.segmentation.DfrNet` (Swin + UperNet fusion, semantic head P, feature
consistency head F) trained with :func:`models.losses.dfr_objective`::

    L = L_pce + lambda_dfr L_dfr + lambda_feat (L_fd + L_fr)                     (Eq. 1)

each term switchable (Table 4-5; pCE only and pCE + Potts are the baselines). AdamW with
linear warm-up and poly decay; random rescale, flip, photometric distortion and crop
(padding is 255 in the labels and left out of every pairwise term); mixed precision on
CUDA. Checkpoints hold model, optimiser, loss history, RNG states and AMP scaler, and
every crop is a function of (seed, step), so a killed run resumes exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from models.backbones import swin_weights_path
from models.losses import dfr_objective
from models.segmentation import DfrNet

from .base import STAGES, StageContext, StageResult, StageSpec
from .training import train_sparse, trained_model

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
    StageSpec(
        name="dfr_train",
        run=run,
        inputs=lambda config: [],
        methods=("dfr",),
        output="model",
        version=VERSION,
        per_image=False,
        parallel=False,
        preflight=preflight,
        reads=("dataset", "weak", "seed", "labels"),
    )
)

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

import functools
from typing import Any

import numpy as np
import torch

from models.backbones import swin_weights_path
from models.losses import dfr_objective
from models.segmentation import DfrNet
from models.types import Supervision

from .base import STAGES, DataError, StageContext, StageResult, StageSpec
from .sparse import sparse_labels
from .training import adamw, amp_setup, crop_batch, save_trained, train_loop, trained_model, trained_result

VERSION = "1"
TERMS = ("pce", "dfr", "fd", "fr")
DIAGNOSTICS = ("k_feature", "confident")  # see models.losses.dfr_objective


def build_model(arch: dict[str, Any]) -> DfrNet:
    return DfrNet(arch["backbone"], arch["num_classes"], arch.get("weights", "none"), arch["fusion_stages"],
                  arch["channels"], arch["feature_dim"], arch["feature_head"])


def load_trained(state: dict[str, Any], device: str) -> DfrNet:
    """The trained network from a ``model.pt`` state, in eval mode on ``device``."""
    return trained_model(state, build_model, device)


def training_labels(ctx: StageContext, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The image's scribble (or point, ``dfr_train.labels``) map, IGNORE where unlabelled."""
    weak = ctx.dataset.load_weak(image_id)  # a bad file raises its own DataError
    try:
        return sparse_labels(weak, ctx.section.labels, shape)
    except ValueError as err:
        raise DataError(ctx.dataset.image_path(image_id), f"{err} (dfr_train.labels is '{ctx.section.labels}')") from None


def run(ctx: StageContext) -> StageResult:
    cfg, seed = ctx.section, ctx.config.seed
    ids = sorted(ctx.ids)
    arch = {"backbone": cfg.backbone, "num_classes": ctx.dataset.num_classes, "weights": cfg.weights,
            "fusion_stages": list(cfg.fusion_stages), "channels": cfg.channels, "feature_dim": cfg.feature_dim,
            "feature_head": cfg.uses_features}  # the section is a DfrTerms (models.params)
    torch.manual_seed(seed)
    model = build_model(arch).to(ctx.device)
    opt, base_lrs = adamw(model, cfg)
    amp, scaler, device_type = amp_setup(cfg.amp, ctx.device)
    curves: dict[str, list[float]] = {t: [] for t in TERMS + DIAGNOSTICS}

    @functools.lru_cache(maxsize=4096)  # synthesized scribbles cost ~0.1 s an image; keep them
    def scribbles_of(i: int, shape: tuple[int, int]) -> np.ndarray:
        return training_labels(ctx, ids[i], shape)

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        x, y, real = crop_batch(ctx, ids, picks, step, lambda i, image: scribbles_of(i, image.shape[:2]),
                                cfg.photometric)
        with torch.autocast(device_type, enabled=amp):
            logits, feats = model.forward_train(x)
        out = dfr_objective(logits.float(), None if feats is None else feats.float(), x.float(), y, real, cfg)
        for t in curves:
            if t in out:
                curves[t].append(float(out[t].detach()))
        return out["loss"]

    info = train_loop(ctx, model, opt, base_lrs, len(ids), step_fn, scaler)
    save_trained(ctx, model, info, arch=arch)
    del model, opt
    return trained_result(ctx, info, images=len(ids), labels=cfg.labels, amp=amp, terms=[t for t in TERMS if curves[t]],
                          **{f"{t}_last": round(float(np.mean(v[-10:])), 5) for t, v in curves.items() if v})


def preflight(config) -> None:
    """Backbone weights must be on disk before anything runs (nothing is downloaded)."""
    swin_weights_path(config.dfr_train.backbone, config.dfr_train.weights)


SPEC = STAGES.register(StageSpec(
    name="dfr_train", run=run, inputs=lambda config: [], supervisions=(Supervision.DFR,), output="model", version=VERSION,
    per_image=False, parallel=False, preflight=preflight, reads=("dataset", "weak", "seed")))

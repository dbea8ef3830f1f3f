"""``cam_train``: the multi-label classifier behind the CAMs (thesis Sect. 3.2, Ch. 2).

Image tags (for box supervision: the classes of the boxes) -> multi-hot targets over the
foreground classes; :class:`models.cam.CamNet` trained with the multi-label soft-margin
loss. Optimiser as IRN: SGD with momentum, the new 1x1 head at ``head_lr_mult`` x the
backbone rate, poly decay ``lr_t = lr_0 (1 - t/T)^power`` per step. (PSA's
``PolyOptimizer`` passes ``weight_decay`` positionally into SGD's ``momentum`` slot; here
both are passed by name.) A pretrained backbone keeps its BatchNorm statistics frozen.

Augmentation: random rescale in ``scale_range``, flip, ``crop`` x ``crop`` random crop.
The sample order of an epoch and the augmentation of each sample are functions of
(seed, epoch/step) only, so a run resumed from ``ckpt-<step>.pt`` continues exactly
where it stopped. Output: ``model.pt`` with the architecture and the state dict.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from models.cam import CamNet, classification_loss

from .augment import scale_flip_crop, step_rng
from .base import STAGES, StageContext, StageResult
from .routing import cam_enabled
from .sections import SgdTrainConfig
from .training import (
    resnet_weights_on_disk,
    save_trained,
    sgd,
    train_loop,
    trained_model,
    trained_result,
    training_spec,
)


# --------------------------------------------------------------------------- config section
class CamTrainConfig(SgdTrainConfig):
    """Multi-label classifier for CAMs (dilated ResNet + GAP + bias-free 1x1 classifier);
    defaults as IRN's classifier."""

    output_stride: Literal[8, 16] = 16


VERSION = "1"


def tag_targets(ctx: StageContext, ids: list[str]) -> np.ndarray:
    """(N, C-1) multi-hot foreground targets from the image tags."""
    num_fg = ctx.dataset.num_classes - 1
    targets = np.zeros((len(ids), num_fg), np.float32)
    for n, image_id in enumerate(ids):
        for c in ctx.dataset.load_weak(image_id).tags:
            if 1 <= c <= num_fg:
                targets[n, c - 1] = 1.0
    return targets


def build_model(arch: dict[str, Any]) -> CamNet:
    return CamNet(arch["num_fg"], arch["depth"], arch["output_stride"], arch.get("weights", "none"))


def load_trained(state: dict[str, Any], device: str) -> CamNet:
    """The trained classifier from a ``model.pt`` state, in eval mode on ``device``."""
    return trained_model(state, build_model, device)


def run(ctx: StageContext) -> StageResult:
    cfg, seed = ctx.section, ctx.config.seed
    ids = sorted(ctx.ids)
    if not ids:
        raise ValueError("cam_train: the train split is empty")
    targets = tag_targets(ctx, ids)
    if ctx.dataset.num_classes < 3 and targets.all():
        ctx.log.warning(
            "cam_train: every image has the same single tag; a classifier cannot localise "
            "anything from that (set cam.enabled: false)"
        )
    arch = {
        "num_fg": ctx.dataset.num_classes - 1,
        "depth": cfg.depth,
        "output_stride": cfg.output_stride,
        "weights": cfg.weights,
    }
    torch.manual_seed(seed)
    model = build_model(arch).to(ctx.device)
    opt, base_lrs = sgd(model, cfg)

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        crops = [
            scale_flip_crop(ctx.dataset.load_image(ids[i]), step_rng(seed, step, j), cfg.scale_range, cfg.crop)[0]
            for j, i in enumerate(picks)
        ]
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).to(ctx.device)
        return classification_loss(model(x), torch.from_numpy(targets[picks]).to(ctx.device))

    info = train_loop(ctx, model, opt, base_lrs, len(ids), step_fn)
    save_trained(ctx, model, info, arch=arch)
    model = opt = None  # free them before release()
    return trained_result(ctx, info)


SPEC = STAGES.register(
    training_spec(
        name="cam_train",
        tiny={"depth": 18, "crop": 48, "batch_size": 3, "epochs": 1, "checkpoint_every": 1000},
        section=CamTrainConfig,
        run=run,
        version=VERSION,
        enabled=cam_enabled,
        preflight=resnet_weights_on_disk("cam_train"),
        reads=("dataset", "weak", "seed"),
    )
)

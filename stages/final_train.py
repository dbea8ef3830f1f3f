"""``final_train``: the segmentation model trained on the pseudo-labels (thesis Sect. 3.5).

torchvision DeepLabV3 (:class:`models.deeplab.DeepLab`) on the labels of the
``input`` stage (``crf`` by default; 255 is ignored), or on the GT masks with
``labels: gt`` (the fully supervised upper bound of Table 3.1, same settings). SGD with
momentum, the head at ``head_lr_mult`` x the backbone's rate, poly decay per step::

    L = CE(logits, Y; 255 ignored) [+ reg_weight * R_CRF(softmax(logits), image)]

``R_CRF`` is Tang et al.'s relaxed dense-CRF loss on a local window
(:func:`models.losses.dense_crf_loss`), the ``rloss`` option for training on pseudo-labels
or scribbles. Augmentation: random rescale in ``scale_range``, flip, ``crop`` x ``crop``
crop padded with 255 (and left out of the CRF loss). Mixed precision on CUDA (``amp``).

The sample order and every crop are functions of (seed, step), and checkpoints hold the
model, optimiser, loss history, RNG states (dropout) and AMP scaler, so a run killed after
step k resumes at k and ends with the model an uninterrupted run gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt

from models.backbones import weights_path
from models.losses import dense_crf_loss
from models.segmentation import ARCHS, DeepLab

from .base import IGNORE, STAGES, DataError, StageContext, StageResult
from .sections import SgdConfig
from .training import (
    TINY_STEPS,
    amp_setup,
    crop_batch,
    save_trained,
    sgd,
    train_loop,
    trained_model,
    trained_result,
    training_spec,
)

# --------------------------------------------------------------------------- config section
SegArch = Literal["deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"]


class FinalTrainConfig(SgdConfig):
    """The segmentation model trained on the pseudo-labels (thesis Sect. 3.5): torchvision
    DeepLabV3, SGD (momentum 0.9) with poly decay, the head at 10x the backbone's rate,
    random scale / flip / crop, 255 ignored; mixed precision on CUDA (``amp``).

    ``labels``: ``pseudo`` (the ``input`` stage's labels) or ``gt`` (the fully supervised
    upper bound of Table 3.1, same settings). ``iterations`` (steps) overrides ``epochs``.
    ``reg_weight`` > 0 adds the relaxed dense-CRF (Potts) loss of Tang et al. on a local
    window of ``reg_radius`` at ``reg_scale`` x the crop, kernel on position (``reg_sigma_xy``
    pixels at that scale) and ImageNet-normalised RGB (``reg_sigma_rgb``).
    """

    arch: SegArch = "deeplabv3_resnet50"
    labels: Literal["pseudo", "gt"] = "pseudo"
    input: Literal["crf", "a2gnn", "random_walk", "seeds"] = "crf"
    batch_size: PositiveInt = 10
    iterations: PositiveInt | None = 20000
    lr: PositiveFloat = 0.007
    crop: Annotated[int, Field(ge=32)] = 321
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 1.5)
    checkpoint_every: PositiveInt = 500
    amp: bool = True
    reg_weight: Annotated[float, Field(ge=0.0)] = 0.0
    reg_radius: PositiveInt = 5
    reg_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    reg_sigma_xy: PositiveFloat = 6.0
    reg_sigma_rgb: PositiveFloat = 0.1


VERSION = "1"


def build_model(arch: dict[str, Any]) -> DeepLab:
    return DeepLab(arch["arch"], arch["num_classes"], arch.get("weights", "none"))


def load_trained(state: dict[str, Any], device: str) -> DeepLab:
    """The trained model from a ``model.pt`` state, in eval mode on ``device``."""
    return trained_model(state, build_model, device)


def label_source(ctx: StageContext) -> tuple[list[str], Callable[[str], np.ndarray]]:
    """The training ids and ``id -> label map``: the input stage's labels (images it
    failed on are left out), or the GT masks for ``labels: gt``."""
    ids = sorted(ctx.ids)
    if ctx.section.labels == "gt":

        def gt(image_id: str) -> np.ndarray:
            labels = ctx.dataset.load_gt(image_id)
            if labels is None:
                raise DataError(
                    ctx.dataset.image_path(image_id), "final_train.labels is 'gt' but the image has no GT mask"
                )
            return labels

        return ids, gt
    source = ctx.input(ctx.section.input)
    return [i for i in ids if source.has(i)], source.labels_of


def run(ctx: StageContext) -> StageResult:
    cfg, seed = ctx.section, ctx.config.seed
    ids, read_labels = label_source(ctx)
    if not ids:
        raise ValueError(f"final_train: no training image has labels from '{cfg.input}'")
    arch = {"arch": cfg.arch, "num_classes": ctx.dataset.num_classes, "weights": cfg.weights}
    torch.manual_seed(seed)
    model = build_model(arch).to(ctx.device)
    opt, base_lrs = sgd(model, cfg)
    amp, scaler, device_type = amp_setup(cfg.amp, ctx.device)
    reg_curve: list[float] = []

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        x, y, real = crop_batch(ctx, ids, picks, step, lambda i, image: read_labels(ids[i]))
        with torch.autocast(device_type, enabled=amp):
            logits = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE) if (y != IGNORE).any() else logits.sum() * 0.0
        if cfg.reg_weight > 0:
            reg = dense_crf_loss(logits, x, real, cfg.reg_radius, cfg.reg_scale, cfg.reg_sigma_xy, cfg.reg_sigma_rgb)
            reg_curve.append(float(reg.detach()))
            loss = loss + cfg.reg_weight * reg
        return loss

    info = train_loop(ctx, model, opt, base_lrs, len(ids), step_fn, scaler)
    save_trained(ctx, model, info, arch=arch)
    model = opt = None  # free them before release()
    if reg_curve:
        info["reg_loss_last"] = round(float(np.mean(reg_curve[-10:])), 5)
    return trained_result(ctx, info, images=len(ids), labels=cfg.labels if cfg.labels == "gt" else cfg.input, amp=amp)


def inputs(config) -> list[str]:
    return [] if config.final_train.labels == "gt" else [config.final_train.input]


def preflight(config) -> None:
    """The backbone weights must be on disk before anything runs (nothing is downloaded)."""
    weights_path(config.final_train.weights, ARCHS[config.final_train.arch][1])


SPEC = STAGES.register(
    training_spec(
        name="final_train",
        tiny={
            **TINY_STEPS,
            "arch": "deeplabv3_mobilenet_v3_large",
        },
        section=FinalTrainConfig,
        run=run,
        inputs=inputs,
        version=VERSION,
        preflight=preflight,
        reads=("dataset", "seed"),
    )
)

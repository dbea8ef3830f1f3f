"""``rrm_train``: the single-stage RRM network trained end to end from image tags (thesis
Ch. 2, Algorithm 1). No pseudo-label stages: each step mines its own labels.

Per step, on a batch of augmented crops (rescale, flip, crop; :func:`stages.training.crop_batch`):

1. one forward pass of :class:`models.rrm_net.RrmNet`: class logits, CAMs, segmentation
   logits (P_l + P_g) / 2 and the BCD features;
2. the reliable labels I_final (Eq. 2.1-2.7, :func:`models.rrm.online_reliable_labels`, which
   shares :func:`models.seeds.reliable_from_probs` with the ``seeds`` stage): the CAMs of the
   crop averaged over ``cam_scales`` (the other scales are extra forward passes without
   gradient, as released), the image's tags only, upsampled to the crop; the batch's dense
   CRFs run side by side in a process pool (``crf_workers``), and the step waits for them
   (its loss needs them: Algorithm 1 labels a batch from its own forward pass);
3. L = L_class + L_ce + lambda_1 L_energy + L_BCD (Eq. 2.14-2.15, :mod:`models.rrm`).

For the first ``cls_only_fraction`` of the steps only L_class trains (the released schedule:
labels from an untrained classifier are noise). SGD with the classifier at ``head_lr_mult``
x the rate (the released code's one "from-scratch" layer), poly decay. Checkpoints hold
model, optimiser, loss history and RNG states; every crop is a function of (seed, step), so
a killed run resumes exactly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt

from models.cam import classification_loss
from models.losses import partial_ce, seed_ce
from models.rrm import bcd_loss, dense_energy_loss, energy_window_mass, online_reliable_labels
from models.segmentation import RrmNet
from models.types import IGNORE

from .base import STAGES, StageContext, StageResult
from .cam_train import tag_targets
from .sections import DenseCrfParams, SgdTrainConfig
from .training import (
    TINY_STEPS,
    crop_batch,
    resnet_weights_on_disk,
    save_trained,
    sgd,
    total_steps,
    train_loop,
    trained_model,
    trained_result,
    training_spec,
)


# --------------------------------------------------------------------------- config section
class RrmTrainConfig(SgdTrainConfig):
    """The single-stage RRM network trained from image tags (thesis Ch. 2; defaults are the
    thesis' VOC settings): a dilated ResNet of ``depth`` at stride 8 (the thesis: ResNet-38)
    shared by the classification branch and the segmentation branch (local sub-branch of
    ``local_channels``, two 3x3 convolutions of dilation ``local_dilation`` (12), R-FAM of
    ``attention_channels``; ``reweight: false`` = plain attention,
    Table 2.5). Loss Eq. 2.14-2.15: L_class + L_ce + ``lambda_energy`` L_energy + L_BCD, each
    switchable (``energy``, ``bcd``); ``ce``: L_ce as printed (Eq. 2.16, one CE over the reliable
    pixels) or as released (background and foreground CE averaged apart). Reliable labels online
    every step (Eq. 2.1-2.7): CAMs of the crop at ``cam_scales`` averaged, background
    ``(1 - max)^gamma`` (4), dense CRF with ``crf`` (PSA's values, "[18]"), the top ``reliable_ratio`` (40%) of
    each class where the CRF agrees; the CRFs of a batch run in ``crf_workers`` processes (0: one per core).
    The
    energy loss: sigma_d 100, sigma_r 15 (printed) on a square window of ``energy_radius`` at
    ``energy_scale`` x the crop (the released code's 0.5). ``cls_only_fraction``: the first
    share of the steps trains the classification branch alone (the released code: 0.3; the
    thesis is silent; labels from an untrained classifier are noise; 1: classification only, the plain
    CAM network, RRM's baseline). SGD lr 1e-3, weight
    decay 5e-4, the classifier at ``head_lr_mult`` x (as released), poly 0.9; rescale 0.7-1.3, flip, crop 321,
    batch 8, 40k iterations."""

    depth: Literal[18, 34, 50, 101] = 50
    local_channels: PositiveInt = 512
    local_dilation: PositiveInt = 12
    attention_channels: PositiveInt = 256
    reweight: bool = True
    lambda_energy: Annotated[float, Field(ge=0.0)] = 1.0
    ce: Literal["printed", "released"] = "released"
    energy: bool = True
    bcd: bool = True
    sigma_d: PositiveFloat = 100.0
    sigma_r: PositiveFloat = 15.0
    energy_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    energy_radius: PositiveInt = 5
    cam_scales: list[PositiveFloat] = [0.5, 1.0, 1.5, 2.0]
    gamma: PositiveFloat = 4.0
    reliable_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4
    crf: DenseCrfParams = Field(default_factory=DenseCrfParams)
    crf_workers: Annotated[int, Field(ge=0)] = 0
    cls_only_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    batch_size: PositiveInt = 8
    iterations: PositiveInt | None = 40000
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    crop: Annotated[int, Field(ge=32)] = 321
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.3)
    checkpoint_every: PositiveInt = 1000


VERSION = "2"  # 2: only the classifier at head_lr_mult (as released)
TERMS = ("cls", "ce", "energy", "bcd")


def build_model(arch: dict[str, Any]) -> RrmNet:
    return RrmNet(
        arch["depth"],
        arch["num_classes"],
        arch.get("weights", "none"),
        arch["local_channels"],
        arch["attention_channels"],
        arch["reweight"],
        arch.get("local_dilation", 12),
    )


def load_trained(state: dict[str, Any], device: str) -> RrmNet:
    """The trained network from a ``model.pt`` state, in eval mode on ``device``."""
    return trained_model(state, build_model, device)


@torch.no_grad()
def crop_cams(model: RrmNet, x: torch.Tensor, cam: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """Eq. 2.2-2.3 on a batch of crops: the mean over ``scales`` of the CAMs at the grid of the
    scale-1 pass ``cam`` (computed already, reused; each other scale is one more forward pass
    of the resized crops, resized bilinearly to that grid), upsampled bilinearly to the crop
    and each map divided by its maximum (1e-5 floor): P_fg (N, K-1, H, W)."""
    grid = cam.shape[-2:]
    total = torch.zeros_like(cam, dtype=torch.float32)
    for s in scales:
        if s == 1.0:
            total += cam.detach().float()
            continue
        size = (max(8, round(x.shape[-2] * s)), max(8, round(x.shape[-1] * s)))
        scaled = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
        total += F.interpolate(model.cam(scaled).float(), size=grid, mode="bilinear", align_corners=False)
    up = F.interpolate(total / len(scales), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return up / up.flatten(2).amax(2).clamp_min(1e-5)[..., None, None]


def reliable_batch(
    x: torch.Tensor,
    p_fg: torch.Tensor,
    tags: np.ndarray,
    real: torch.Tensor,
    cfg,
    parallel_map: Callable[[Callable, list, int], list],
) -> torch.Tensor:
    """I_final (N, H, W) long of a batch: P_fg of each crop's tagged classes (:func:`crop_cams`)
    through :func:`models.rrm.online_reliable_labels` with ``parallel_map(fn, jobs, workers)``
    (the stage's process pool of ``cfg.crf_workers``); padding IGNORE."""
    up = p_fg.cpu().numpy()
    crops = x.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
    jobs = []
    for i in range(len(x)):
        present = np.flatnonzero(tags[i])
        jobs.append((crops[i], up[i][present], (present + 1).tolist()))
    fn = functools.partial(_reliable_job, gamma=cfg.gamma, ratio=cfg.reliable_ratio, crf=cfg.crf)
    labels = np.stack(parallel_map(fn, jobs, cfg.crf_workers or os.cpu_count() or 1))
    out = torch.from_numpy(labels).long().to(x.device)
    return torch.where(real, out, torch.full_like(out, IGNORE))


def _reliable_job(job: tuple[np.ndarray, np.ndarray, list[int]], gamma: float, ratio: float, crf) -> np.ndarray:
    image, cams, class_ids = job
    return online_reliable_labels(image, cams, class_ids, gamma, ratio, crf)


def rrm_objective(
    out: dict[str, torch.Tensor], x: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, targets: torch.Tensor, cfg
) -> dict[str, torch.Tensor]:
    """Eq. 2.14-2.15 on a batch: ``out`` of :meth:`RrmNet.heads`, crops ``x`` 0..255, reliable
    ``labels`` (N, H, W), ``real`` (padding False), multi-hot ``targets``. L_ce (Eq. 2.16) is
    computed on the logits upsampled to the crop: ``cfg.ce: printed`` one CE over every reliable
    pixel of the batch (Eq. 2.16 as a mean, the released criterion's reduction: the same form as
    DFR's :func:`models.losses.partial_ce`), ``released``
    the authors' code, background and foreground CE each averaged over its own pixels
    (:func:`models.losses.seed_ce`, per image, then the mean). The switched-off terms are left
    out."""
    seg = out["seg"].float()
    terms = {"cls": classification_loss(out["logits"].float(), targets)}
    up = F.interpolate(seg, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    terms["ce"] = seed_ce(up, labels).mean() if cfg.ce == "released" else partial_ce(seg, labels)
    loss = terms["cls"] + terms["ce"]
    if cfg.energy:
        terms["energy"] = dense_energy_loss(
            seg, x, labels, real, cfg.sigma_d, cfg.sigma_r, cfg.energy_scale, cfg.energy_radius
        )
        loss = loss + cfg.lambda_energy * terms["energy"]
    if cfg.bcd:
        terms["bcd"] = bcd_loss(seg, out["feats"].float())
        loss = loss + terms["bcd"]
    terms["loss"] = loss
    return terms


def run(ctx: StageContext) -> StageResult:
    cfg, ids = ctx.section, sorted(ctx.ids)
    if not ids:
        raise ValueError("rrm_train: the train split is empty")
    targets = tag_targets(ctx, ids)
    arch = {
        "depth": cfg.depth,
        "num_classes": ctx.dataset.num_classes,
        "weights": cfg.weights,
        "local_channels": cfg.local_channels,
        "local_dilation": cfg.local_dilation,
        "attention_channels": cfg.attention_channels,
        "reweight": cfg.reweight,
    }
    torch.manual_seed(ctx.config.seed)
    model = build_model(arch).to(ctx.device)
    opt, base_lrs = sgd(model, cfg)
    joint_from = int(cfg.cls_only_fraction * total_steps(cfg, len(ids)))
    curves: dict[str, list[float]] = {t: [] for t in (*TERMS, "reliable")}

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        x, _, real = crop_batch(ctx, ids, picks, step, lambda i, image: np.zeros(image.shape[:2], np.uint8))
        tags = targets[picks]
        y = torch.from_numpy(tags).to(ctx.device)
        f = model.features(x)
        if step < joint_from:
            loss = classification_loss(model.classifier(f).mean((2, 3)), y)
            curves["cls"].append(float(loss.detach()))
            return loss
        out = model.heads(f)
        labels = reliable_batch(x, crop_cams(model, x, out["cam"], cfg.cam_scales), tags, real, cfg, ctx.parallel_map)
        terms = rrm_objective(out, x, labels, real, y, cfg)
        for t in TERMS:
            if t in terms:
                curves[t].append(float(terms[t].detach()))
        curves["reliable"].append(float((labels != IGNORE).sum() / real.sum().clamp(min=1)))
        return terms["loss"]

    info = train_loop(ctx, model, opt, base_lrs, len(ids), step_fn)
    save_trained(ctx, model, info, arch=arch)
    model = opt = None  # free them before release()
    return trained_result(
        ctx,
        info,
        images=len(ids),
        joint_from=joint_from,
        terms=[t for t in TERMS if curves[t]],
        energy_window_mass=round(energy_window_mass(cfg.sigma_d, cfg.energy_scale, cfg.energy_radius), 4),
        **{f"{t}_last": round(float(np.mean(v[-10:])), 5) for t, v in curves.items() if v},
    )


SPEC = STAGES.register(
    training_spec(
        name="rrm_train",
        tiny={
            **TINY_STEPS,
            "depth": 18,
            "local_channels": 16,
            "attention_channels": 8,
            "cls_only_fraction": 0.0,
            "cam_scales": [1.0],
            "crf_workers": 1,
        },
        section=RrmTrainConfig,
        run=run,
        version=VERSION,
        preflight=resnet_weights_on_disk("rrm_train"),
        reads=("dataset", "weak", "seed"),
    )
)

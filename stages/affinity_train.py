"""``affinity_train``: the affinity CNN (thesis Sect. 3.3.3, Eq. 3.6-3.13).

Trains :class:`models.affinity.AffinityNet` on the seeds' affinity map
(:func:`stages.routing.affinity_map`: M_g for boxes, M_S over M'_I for scribbles, M'_I for
points and tags). Per crop: the seed map is downsampled (nearest) to the stride-8 grid,
pairs within ``radius`` give L_Ac (Eq. 3.6-3.10), and every pair gives L_Ar weighted by the
Gaussian kernel on position and the ImageNet-normalised colour (Eq. 3.11-3.13): L_Aff of
Eq. 3.9, :func:`models.affinity.affinity_objective` (``reg_weight`` 3, as the released code).

Pairs that touch the crop's padding are left out of both terms. Radius: 4 for boxes, 5
otherwise, as the released code (``affinity_train.radius`` overrides). Optimiser: SGD with
momentum, poly decay, 10x rate on the new layers; checkpoints and exact resume through
:func:`stages.training.train_loop`. Output: ``model.pt``.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from models.affinity import AffinityNet, affinity_objective, window_offsets
from models.backbones import DEPTHS, weights_path
from models.types import PIPELINE

from .augment import scale_flip_crop, step_rng
from .base import IGNORE, STAGES, StageContext, StageResult, StageSpec
from .routing import affinity_map, offsets_of
from .training import release, sgd, train_loop

VERSION = "2"


def load_affinity(state: dict[str, Any], device: str) -> tuple[AffinityNet, list[tuple[int, int]]]:
    """The trained affinity net (eval mode) and the offsets it was trained with."""
    model = AffinityNet(state["arch"]["depth"], "none")
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), window_offsets(state["radius"], state["neighbourhood"])


def run(ctx: StageContext) -> StageResult:
    cfg, seed, config = ctx.section, ctx.config.seed, ctx.config
    if cfg.crop % 8:
        raise ValueError(f"affinity_train.crop must be a multiple of 8 (the feature stride), got {cfg.crop}")
    ids = sorted(ctx.ids)
    seeds_in, variant = ctx.input("seeds"), affinity_map(config)
    offsets = offsets_of(config)
    torch.manual_seed(seed)
    model = AffinityNet(cfg.depth, cfg.weights).to(ctx.device)
    opt, base_lrs = sgd(model, cfg)
    grid = cfg.crop // 8

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        images, labels, valids = [], [], []
        for j, i in enumerate(picks):
            image = ctx.dataset.load_image(ids[i])
            seeds = seeds_in.read_label(ids[i], variant)
            inside = np.ones(seeds.shape, np.uint8)
            crop, (lab, val) = scale_flip_crop(image, step_rng(seed, step, j), cfg.scale_range, cfg.crop,
                                               (seeds, inside))
            images.append(crop)
            labels.append(cv2.resize(lab, (grid, grid), interpolation=cv2.INTER_NEAREST))
            valids.append(cv2.resize(val, (grid, grid), interpolation=cv2.INTER_NEAREST) == 1)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(ctx.device)
        lab = torch.from_numpy(np.stack(labels)).to(ctx.device)
        val = torch.from_numpy(np.stack(valids)).to(ctx.device)
        lab = torch.where(val, lab, torch.full_like(lab, IGNORE))
        return affinity_objective(model, x, lab, val, offsets, cfg.sigma_xy, cfg.sigma_rgb, cfg.reg_weight)["loss"]

    info = train_loop(ctx, model, opt, base_lrs, len(ids), step_fn)
    ctx.out.write_model({"arch": {"depth": cfg.depth}, "state_dict": model.state_dict(),
                         "radius": config.affinity_train.radius, "neighbourhood": cfg.neighbourhood})
    del model, opt
    release(ctx.device)
    return StageResult(info={**info, "radius": config.affinity_train.radius, "seed_map": variant or "M_g"},
                       metrics={"final_loss": info["loss_curve"][-1] if info["loss_curve"] else float("nan")})


def preflight(config) -> None:
    weights_path(config.affinity_train.weights, DEPTHS[config.affinity_train.depth])


SPEC = STAGES.register(StageSpec(
    name="affinity_train", run=run, inputs=lambda config: ["seeds"], supervisions=PIPELINE,
    output="model", version=VERSION, per_image=False, parallel=False, preflight=preflight,
    reads=("dataset", "seed", "supervision")))

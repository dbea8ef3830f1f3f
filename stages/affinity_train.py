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

from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt

from models.affinity import STRIDE, AffinityNet, affinity_objective, window_offsets

from .base import IGNORE, STAGES, StageContext, StageResult
from .routing import affinity_map, offsets_of
from .sections import SgdTrainConfig
from .training import (
    crop_batch,
    resnet_weights_on_disk,
    save_trained,
    sgd,
    train_loop,
    trained_model,
    trained_result,
    training_spec,
)


# --------------------------------------------------------------------------- config section
class AffinityTrainConfig(SgdTrainConfig):
    """Affinity CNN (thesis Sect. 3.3.3): dilated ResNet (stride 8) -> F_A, trained with
    L_Aff = L_Ac + reg_weight * L_Ar on the seeds' affinity map; defaults as the released code."""

    radius: Annotated[int, Field(ge=1, le=12)] | None = None  # None: 4 for boxes, 5 otherwise (released code)
    neighbourhood: Literal["disk", "square"] = "disk"
    batch_size: PositiveInt = 4
    epochs: PositiveInt = 8
    lr: PositiveFloat = 0.01
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    crop: Annotated[int, Field(ge=32)] = 448
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.3)
    sigma_xy: PositiveFloat = 6.0
    sigma_rgb: PositiveFloat = 0.1
    reg_weight: Annotated[float, Field(ge=0.0)] = 3.0


VERSION = "2"


def load_affinity(state: dict[str, Any], device: str) -> tuple[AffinityNet, list[tuple[int, int]]]:
    """The trained affinity net (eval mode) and the offsets it was trained with."""
    model = trained_model(state, lambda arch: AffinityNet(arch["depth"], "none"), device)
    return model, window_offsets(state["radius"], state["neighbourhood"])


def run(ctx: StageContext) -> StageResult:
    cfg, seed, config = ctx.section, ctx.config.seed, ctx.config
    if cfg.crop % STRIDE:
        raise ValueError(f"affinity_train.crop must be a multiple of {STRIDE} (the feature stride), got {cfg.crop}")
    ids = sorted(ctx.ids)
    seeds_in, variant = ctx.input("seeds"), affinity_map(config)
    offsets = offsets_of(config)
    torch.manual_seed(seed)
    model = AffinityNet(cfg.depth, cfg.weights).to(ctx.device)
    opt, base_lrs = sgd(model, cfg)

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        x, labels, real = crop_batch(ctx, ids, picks, step, lambda i, image: seeds_in.read_label(ids[i], variant))
        # nearest to the stride-8 grid: the crop is a multiple of 8, so every 8th pixel
        labels, real = labels[:, ::STRIDE, ::STRIDE], real[:, ::STRIDE, ::STRIDE]
        labels = torch.where(real, labels, torch.full_like(labels, IGNORE))
        return affinity_objective(model, x, labels, real, offsets, cfg.sigma_xy, cfg.sigma_rgb, cfg.reg_weight)["loss"]

    info = train_loop(ctx, model, opt, base_lrs, len(ids), step_fn)
    save_trained(ctx, model, info, arch={"depth": cfg.depth}, radius=cfg.radius, neighbourhood=cfg.neighbourhood)
    model = opt = None  # free them before release()
    return trained_result(ctx, info, radius=cfg.radius, seed_map=variant or "M_g")


def resolve(config) -> None:
    """The released radius where left out: 4 for boxes, 5 otherwise."""
    if config.affinity_train.radius is None:
        config.affinity_train.radius = 4 if config.labels == "box" else 5


SPEC = STAGES.register(
    training_spec(
        name="affinity_train",
        tiny={"depth": 18, "crop": 48, "batch_size": 3, "epochs": 1, "checkpoint_every": 1000},
        resolve=resolve,
        section=AffinityTrainConfig,
        run=run,
        inputs=lambda config: ["seeds"],
        version=VERSION,
        preflight=resnet_weights_on_disk("affinity_train"),
        reads=("dataset", "seed", "labels"),
    )
)

"""``instance_train``: Mask R-CNN on the box-supervised instance masks (thesis Sect. 3.4-3.5).

torchvision's ``maskrcnn_resnet50_fpn`` (the thesis uses ResNet-101) trained on the
``instances`` stage's masks with their boxes and classes: the sum of torchvision's RPN,
box and mask losses; SGD with momentum and poly decay per step; horizontal flip from
(seed, step), so a resumed run is the same run (see :func:`stages.training.train_loop`).

Mask R-CNN needs torchvision's compiled RoIAlign and NMS. Where they did not load (this
project's CPU-only torch with the CUDA torchvision 0.28.0 wheel) the run stops before any
work with :data:`models.tvcompat.NEEDS_COMPILED_OPS`; it is off by default
(``instance_train.enabled``).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt

from models.backbones import freeze_batchnorm, load_state, weights_path
from models.tvcompat import require_compiled_ops

from .augment import step_rng
from .base import STAGES, StageContext, StageResult
from .instances import objects_of
from .sections import Section
from .training import save_trained, train_loop, trained_result, training_spec


# --------------------------------------------------------------------------- config section
class InstanceTrainConfig(Section):
    """Mask R-CNN (torchvision ``maskrcnn_resnet50_fpn``) trained on the ``instances`` masks,
    the thesis' box-supervised instance model (Sect. 3.4). Off by default: it needs
    torchvision's compiled RoIAlign / NMS (a CUDA or complete torchvision). SGD with poly
    decay, horizontal flip; torchvision's own resize to ``min_size``."""

    enabled: bool = False
    weights: str = "none"  # ResNet-50 backbone: none | imagenet | path
    batch_size: PositiveInt = 4
    epochs: PositiveInt = 12
    iterations: PositiveInt | None = None
    lr: PositiveFloat = 0.02
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    poly_power: PositiveFloat = 0.9
    min_size: PositiveInt = 800
    checkpoint_every: PositiveInt = 500


VERSION = "1"


def build_model(num_classes: int, weights: str, min_size: int) -> torch.nn.Module:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, min_size=min_size)
    state = load_state(weights, "resnet50")
    if state is not None:
        model.backbone.body.load_state_dict(state, strict=False)
        freeze_batchnorm(model.backbone.body)
    return model


def run(ctx: StageContext) -> StageResult:
    require_compiled_ops("instance_train (Mask R-CNN)")
    cfg, seed = ctx.section, ctx.config.seed
    source = ctx.input("instances")
    samples = []
    for image_id in sorted(ctx.ids):
        if not source.has(image_id):
            continue
        found = objects_of(source.read_label(image_id), ctx.dataset.load_weak(image_id).boxes)
        if found:
            samples.append((image_id, found))
    if not samples:
        raise ValueError("instance_train: no image has an instance mask")
    torch.manual_seed(seed)
    model = build_model(ctx.dataset.num_classes, cfg.weights, cfg.min_size).to(ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        images, targets = [], []
        for j, i in enumerate(picks):
            image_id, found = samples[i]
            image = ctx.dataset.load_image(image_id)
            masks = np.stack([m for _, m, _ in found])
            boxes = np.array([[b.x0, b.y0, b.x1, b.y1] for b, _, _ in found], np.float32)
            if step_rng(seed, step, j).random() < 0.5:
                image, masks = image[:, ::-1], masks[:, :, ::-1]
                boxes[:, [0, 2]] = image.shape[1] - boxes[:, [2, 0]]
            images.append(
                torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255).to(ctx.device)
            )
            targets.append(
                {
                    "boxes": torch.from_numpy(boxes).to(ctx.device),
                    "labels": torch.tensor([b.cls for b, _, _ in found], device=ctx.device),
                    "masks": torch.from_numpy(np.ascontiguousarray(masks)).to(torch.uint8).to(ctx.device),
                }
            )
        return sum(model(images, targets).values())

    info = train_loop(ctx, model, opt, [cfg.lr], len(samples), step_fn)
    save_trained(ctx, model, info, arch={"num_classes": ctx.dataset.num_classes, "min_size": cfg.min_size})
    model = opt = None  # free them before release()
    return trained_result(ctx, info, images=len(samples))


def preflight(config) -> None:
    """Stop before any work when the compiled ops or the backbone weights are missing."""
    try:
        require_compiled_ops("instance_train (Mask R-CNN)")
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    weights_path(config.instance_train.weights, "resnet50")


SPEC = STAGES.register(
    training_spec(
        name="instance_train",
        section=InstanceTrainConfig,
        run=run,
        inputs=lambda config: ["instances"],
        labels=("box",),
        version=VERSION,
        enabled=lambda config: config.instance_train.enabled,
        preflight=preflight,
        reads=("dataset", "weak", "seed"),
    )
)

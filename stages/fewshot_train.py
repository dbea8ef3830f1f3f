"""``fewshot_train``: SCL (thesis Ch. 5) trained on 1-shot episodes of the training classes.

Episodes come from any masks dataset: the classes (``classes``, default every class but 0) are
shuffled by ``fold_seed`` and dealt into ``folds``; fold ``fold`` is held out for
``fewshot_eval``. Each step draws, per batch row and from ``step_rng(seed, step, row)``, a
training class and two distinct train images that hold at least ``min_pixels`` of it (support
and query); its mask is 1 on the class, 0 elsewhere (other classes included), 255 where the GT
is ignored. Both images go through rescale, flip and crop. Loss Eq. 5.14
(:func:`models.fewshot.scl_loss`); SGD with poly decay; checkpoints as every training stage,
and every episode is a function of (seed, step), so a killed run resumes exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from models.fewshot import SclNet, scl_loss
from models.types import IGNORE

from .augment import scale_flip_crop, step_rng
from .base import STAGES, StageContext, StageResult
from .sections import SgdTrainConfig
from .training import (
    TINY_STEPS,
    resnet_weights_on_disk,
    save_trained,
    sgd,
    train_loop,
    trained_model,
    trained_result,
    training_spec,
)


# --------------------------------------------------------------------------- config section
class FewshotTrainConfig(SgdTrainConfig):
    """The few-shot method (``method: scl``; thesis Ch. 5, SCL): 1-shot episodes of the
    training classes on the train split. Classes: ``classes`` (null: every class but 0) shuffled
    by ``fold_seed`` and dealt into ``folds``; fold ``fold``'s classes are held out for the
    ``fewshot_eval`` episodes (val split), the rest train, with ``train_classes`` (never held
    out: e.g. the stuff classes when the folds are the thing classes). An image serves a class
    when it holds at least ``min_pixels`` of it. SclNet (:mod:`models.fewshot`): ResNet-``depth`` at stride 8
    (CANet: ResNet-50 from ImageNet), stage-2 + stage-3 features reduced to ``channels`` (channel dropout
    ``dropout``: CANet's 0.5 on ImageNet features; it drops support and query channels
    independently, which from scratch hides what the two share); ``sgm``:
    the self-guided module (off: the CANet-style base). ``prior``: PFENet's prior mask in the query
    FPM (the thesis' SCL (PFENet) base; off: CANet's). ``held_out_pixels``: what the training
    masks make of the held-out classes' pixels, ``background`` (OSLSM / CANet: they are not the
    episode's class) or ``ignore`` (255: the network is never taught that a novel class is
    background). ``loss``: each CE term as the thesis (``ce``: a mean over pixels) or
    ``balanced`` (the mean of the background's and the foreground's mean CE: from scratch the
    plain mean can settle on all-background when objects are small). SGD lr 2.5e-3, momentum
    0.9, weight decay 5e-4, poly 0.9, batch 4 episodes, rescale, flip and crop 321 of support
    and query each."""

    classes: list[int] | None = None
    train_classes: list[int] = []
    folds: Annotated[int, Field(ge=2)] = 4
    fold: Annotated[int, Field(ge=0)] = 0
    fold_seed: int = 0
    min_pixels: Annotated[int, Field(ge=1)] = 2 * 32 * 32
    channels: PositiveInt = 256
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    sgm: bool = True
    prior: bool = False
    held_out_pixels: Literal["background", "ignore"] = "background"
    loss: Literal["ce", "balanced"] = "ce"
    batch_size: PositiveInt = 4
    iterations: PositiveInt | None = 20000
    lr: PositiveFloat = 2.5e-3
    head_lr_mult: PositiveFloat = 1.0
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    crop: Annotated[int, Field(ge=32)] = 321
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.3)
    checkpoint_every: PositiveInt = 1000

    @model_validator(mode="after")
    def _check_fold(self) -> FewshotTrainConfig:
        if self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} is not one of the {self.folds} folds (0..{self.folds - 1})")
        return self


VERSION = "2"  # 2: He-initialised head, prior mask, held-out pixels option


def build_model(arch: dict[str, Any]) -> SclNet:
    return SclNet(
        arch["depth"],
        arch["channels"],
        arch.get("weights", "none"),
        arch["sgm"],
        arch.get("prior", False),  # models stored before the prior have no "prior" key
        arch.get("dropout", 0.5),
    )


def load_trained(state: dict[str, Any], device: str) -> SclNet:
    """The trained network from a ``model.pt`` state, in eval mode on ``device``."""
    return trained_model(state, build_model, device)


def fold_classes(cfg, num_classes: int) -> tuple[list[int], list[int]]:
    """(training classes, held-out classes of fold ``cfg.fold``): ``cfg.classes`` (default
    1..K-1) permuted by ``cfg.fold_seed``, fold f = every ``folds``-th from position f; the
    ``cfg.train_classes`` always train."""
    classes = list(cfg.classes) if cfg.classes is not None else list(range(1, num_classes))
    extra = list(cfg.train_classes)
    both = sorted(set(classes) & set(extra))
    if both:
        raise ValueError(f"fewshot classes {both} are both in the folds and in train_classes (never held out)")
    bad = [c for c in classes + extra if not 1 <= c < num_classes]
    if bad:
        raise ValueError(
            f"fewshot classes / train_classes {bad} are not foreground class ids of this dataset (1..{num_classes - 1})"
        )
    if len(classes) < cfg.folds:
        raise ValueError(f"{len(classes)} classes cannot make {cfg.folds} folds")
    perm = [classes[i] for i in np.random.default_rng(cfg.fold_seed).permutation(len(classes))]
    held = sorted(perm[cfg.fold :: cfg.folds])
    return sorted([c for c in perm if c not in held] + extra), held


def images_of(ctx: StageContext, ids: list[str], classes: list[int], min_pixels: int) -> dict[int, list[str]]:
    """Class -> the images among ``ids`` whose GT holds at least ``min_pixels`` of it."""
    out: dict[int, list[str]] = {c: [] for c in classes}
    for image_id in ids:
        gt = ctx.dataset.load_gt(image_id)
        if gt is None:
            continue
        counts = np.bincount(gt.ravel(), minlength=256)
        for c in classes:
            if counts[c] >= min_pixels:
                out[c].append(image_id)
    return out


def class_mask(gt: np.ndarray, c: int, ignored: Sequence[int] = ()) -> np.ndarray:
    """The episode mask of class ``c``: 1 on it, 255 where the GT is ignored or holds one of the
    ``ignored`` classes, else 0."""
    out = (gt == c).astype(np.uint8)
    out[(gt == IGNORE) | np.isin(gt, list(ignored))] = IGNORE
    return out


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.section
    train, held = fold_classes(cfg, ctx.dataset.num_classes)
    pool = {c: v for c, v in images_of(ctx, sorted(ctx.ids), train, cfg.min_pixels).items() if len(v) >= 2}
    if not pool:
        raise ValueError(
            f"fewshot_train: no training class of {train} has two train images with {cfg.min_pixels}+ pixels of it"
        )
    classes = sorted(pool)
    arch = {
        "depth": cfg.depth,
        "channels": cfg.channels,
        "weights": cfg.weights,
        "sgm": cfg.sgm,
        "prior": cfg.prior,
        "dropout": cfg.dropout,
    }
    ignored = held if cfg.held_out_pixels == "ignore" else ()
    torch.manual_seed(ctx.config.seed)
    model = build_model(arch).to(ctx.device)
    opt, base_lrs = sgd(model, cfg)
    curves: dict[str, list[float]] = {"s1": [], "s2": [], "q": []}

    @functools.lru_cache(maxsize=4096)
    def gt_of(image_id: str) -> np.ndarray:
        return ctx.dataset.load_gt(image_id)

    def crop(image_id: str, c: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, (mask,) = scale_flip_crop(
            ctx.dataset.load_image(image_id), rng, cfg.scale_range, cfg.crop, (class_mask(gt_of(image_id), c, ignored),)
        )
        return image, mask

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        rows = []
        for j in range(len(picks)):
            rng = step_rng(ctx.config.seed, step, j)
            c = classes[int(rng.integers(len(classes)))]
            s_id, q_id = (pool[c][int(k)] for k in rng.choice(len(pool[c]), 2, replace=False))
            rows.append((*crop(s_id, c, rng), *crop(q_id, c, rng)))
        s, ms, q, mq = (np.stack(v) for v in zip(*rows))
        images = [torch.from_numpy(a).permute(0, 3, 1, 2).float().to(ctx.device) for a in (s, q)]
        masks = [torch.from_numpy(a).long().to(ctx.device) for a in (ms, mq)]
        terms = scl_loss(model(images[0], masks[0], images[1]), masks[0], masks[1], cfg.loss == "balanced")
        for t in curves:
            if t in terms:
                curves[t].append(float(terms[t].detach()))
        return terms["loss"]

    info = train_loop(ctx, model, opt, base_lrs, len(ctx.ids), step_fn)
    save_trained(ctx, model, info, arch=arch)
    model = opt = None  # free them before release()
    return trained_result(
        ctx,
        info,
        train_classes=classes,
        held_out=held,
        episode_images={str(c): len(v) for c, v in pool.items()},
        **{f"{t}_last": round(float(np.mean(v[-10:])), 5) for t, v in curves.items() if v},
    )


SPEC = STAGES.register(
    training_spec(
        name="fewshot_train",
        tiny={
            **TINY_STEPS,
            "depth": 18,
            "channels": 16,
            "folds": 3,
            "min_pixels": 16,
        },
        section=FewshotTrainConfig,
        run=run,
        version=VERSION,
        preflight=resnet_weights_on_disk("fewshot_train"),
        reads=("dataset", "seed"),
    )
)

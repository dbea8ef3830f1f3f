"""The training loop the training stages share: epochs over a fixed sample order, poly
learning-rate decay per step, atomic checkpoints every N steps, exact resume (RNG included).

The order of epoch e is ``epoch_order(seed, e)`` and a step's augmentation comes from
``step_rng(seed, step, j)``, so a run resumed at step t sees exactly the batches it would
have seen; the checkpoint holds the model, the optimiser and the loss history.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rich.progress import TextColumn

from .augment import epoch_order, photometric, scale_flip_crop, step_rng
from .base import IGNORE, DataError, Output, StageContext, StageResult, StageSpec, progress_bar, run_items


TINY_STEPS = {"crop": 48, "batch_size": 2, "iterations": 2, "checkpoint_every": 1000}
"""Two steps of batch 2 at crop 48: what most training stages' ``tiny`` settings start from."""


def training_spec(**fields: Any) -> StageSpec:
    """The :class:`StageSpec` of a training stage: one model (``Output.MODEL``) trained once
    over all its images in this process (never sharded), no upstream stage unless ``inputs``
    names one; ``fields`` as :class:`StageSpec`'s."""
    fields.setdefault("inputs", lambda config: [])
    return StageSpec(output=Output.MODEL, per_image=False, parallel=False, **fields)


def resnet_weights_on_disk(stage: str) -> Callable[[Any], None]:
    """A ``preflight``: the ResNet-``depth`` backbone weights ``config.<stage>.weights`` names
    are on disk before anything runs (nothing is downloaded)."""

    def preflight(config) -> None:
        from models.backbones import DEPTHS, weights_path

        cfg = getattr(config, stage)
        weights_path(cfg.weights, DEPTHS[cfg.depth])

    return preflight


def poly_lr(base: float, step: int, total: int, power: float, warmup: int = 0, warmup_ratio: float = 1.0) -> float:
    """lr_t = lr_0 (1 - t/T)^power, times mmseg's linear warm-up
    ``1 - (1 - warmup_ratio)(1 - t/warmup)`` for the first ``warmup`` steps."""
    lr = base * (1.0 - step / total) ** power
    if step < warmup:
        lr *= 1.0 - (1.0 - warmup_ratio) * (1.0 - step / warmup)
    return lr


def total_steps(cfg, n_samples: int) -> int:
    """The steps of a schedule: ``cfg.iterations`` where set, else ``cfg.epochs`` epochs of
    ``n_samples // batch_size`` full batches (the last partial batch dropped, as IRN/PSA)."""
    return getattr(cfg, "iterations", None) or cfg.epochs * max(1, n_samples // min(cfg.batch_size, n_samples))


def train_loop(
    ctx: StageContext,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    base_lrs: list[float],
    n_samples: int,
    step_fn: Callable[[np.ndarray, int], torch.Tensor],
    scaler: torch.amp.GradScaler | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Run ``step_fn(sample indices, step) -> loss`` for ``cfg.iterations`` steps (where the
    stage has it) or ``cfg.epochs`` epochs; returns info (steps, loss curve per epoch and for
    a last partial epoch, seconds, the step it resumed from). ``extra``: state the steps keep
    between them (SPML's memory bank), checkpointed with the rest and restored in place.

    Uses ``ctx.section``: ``batch_size``, ``epochs`` / ``iterations``, ``poly_power``,
    ``checkpoint_every``. A checkpoint holds the model, the optimiser, the loss history, the
    torch RNG states (dropout) and the AMP ``scaler``, so a resumed run is the same run.
    """
    cfg, seed = ctx.section, ctx.config.seed
    batch = min(cfg.batch_size, n_samples)
    steps_per_epoch = max(1, n_samples // batch)  # drop the last partial batch, as IRN/PSA
    total = total_steps(cfg, n_samples)
    n_epochs = -(-total // steps_per_epoch)
    start, history, running = 0, [], []
    found = ctx.out.latest_checkpoint()
    if found is not None:
        start, state = found
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, running = state["history"], state.get("running", [])
        if "rng" in state:
            _set_rng(state["rng"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if extra is not None:
            extra.clear()
            extra.update(state.get("extra", {}))
        ctx.log.info("%s: resuming from step %d of %d", ctx.stage, start, total)
    model.train()
    t0 = time.time()
    bar = progress_bar(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"))
    with bar:
        task = bar.add_task(f"{ctx.stage} (steps)", total=total, completed=start, loss="-", rate="")
        for step in range(start, total):
            epoch, k = divmod(step, steps_per_epoch)
            picks = epoch_order(seed, epoch, n_samples)[k * batch : (k + 1) * batch]
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = poly_lr(
                    base,
                    step,
                    total,
                    cfg.poly_power,
                    getattr(cfg, "warmup_iterations", 0),
                    getattr(cfg, "warmup_ratio", 1.0),
                )
            loss = step_fn(picks, step)
            optimizer_step(loss, opt, scaler)
            running.append(float(loss.detach()))
            rate = (step + 1 - start) / max(time.time() - t0, 1e-9)
            bar.update(
                task,
                advance=1,
                loss=f"{np.mean(running[-20:]):.4f}",
                rate=f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step",
            )
            if k == steps_per_epoch - 1 or step + 1 == total:
                history.append(round(float(np.mean(running)), 5))
                running = []
                if (epoch + 1) % max(1, n_epochs // 10) == 0 or step + 1 == total:
                    ctx.log.info(
                        "%s: epoch %d/%d loss %.4f (%.1f s)",
                        ctx.stage,
                        epoch + 1,
                        n_epochs,
                        history[-1],
                        time.time() - t0,
                    )
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                state = {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "history": history,
                    "running": running,
                    "rng": _get_rng(),
                }
                if scaler is not None:
                    state["scaler"] = scaler.state_dict()
                if extra is not None:
                    state["extra"] = dict(extra)
                ctx.out.save_checkpoint(step + 1, state)
    ctx.out.write_file(LOSS_CURVE, loss_curve_png(history, f"{ctx.stage}: mean loss per epoch"))
    return {
        "steps": total,
        "epochs": n_epochs,
        "loss_curve": history,
        "train_seconds": round(time.time() - t0, 2),
        "resumed_from": start,
    }


LOSS_CURVE = "loss_curve.png"


def loss_curve_png(history: list[float], title: str, size: tuple[int, int] = (480, 300)) -> bytes:
    """A line plot of ``history`` (one value per epoch) as PNG bytes: axes, the first and
    last epoch, the lowest and highest loss."""
    import io

    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 56, 12, 24, 30
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((left, 6), title, fill=(0, 0, 0))
    draw.rectangle((left, top, w - right, h - bottom), outline=(0, 0, 0))
    values = [v for v in history if np.isfinite(v)]
    if values:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        n = len(history)
        xs = [left + (w - right - left) * (k / max(n - 1, 1)) for k in range(n)]
        ys = [h - bottom - (h - bottom - top) * ((v - lo) / span) for v in history]
        if n > 1:
            draw.line(list(zip(xs, ys)), fill=(31, 119, 180), width=2)
        for x, y in zip(xs, ys):
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(31, 119, 180))
        draw.text((4, top - 4), f"{hi:.4g}", fill=(0, 0, 0))
        draw.text((4, h - bottom - 8), f"{lo:.4g}", fill=(0, 0, 0))
        draw.text((left, h - bottom + 6), "epoch 1", fill=(0, 0, 0))
        draw.text((w - right - 60, h - bottom + 6), f"epoch {n}", fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_trained(ctx: StageContext, model: torch.nn.Module, info: dict[str, Any], **state: Any) -> None:
    """``model.pt``: ``state`` (``arch``, ...) with the weights and the loss history."""
    ctx.out.write_model({**state, "state_dict": model.state_dict(), "history": info["loss_curve"]})


def trained_result(ctx: StageContext, info: dict[str, Any], **extra: Any) -> StageResult:
    """A training stage's result, once its model is saved and dropped: the device cache
    released, ``info`` with ``extra``, the last logged loss as the metric."""
    release(ctx.device)
    history = info["loss_curve"]
    return StageResult(info={**info, **extra}, metrics={"final_loss": history[-1] if history else math.nan})


def sgd(model: torch.nn.Module, cfg) -> tuple[torch.optim.SGD, list[float]]:
    """SGD (momentum and weight decay passed by name) over ``model.param_groups()`` =
    (backbone, new layers), at ``cfg.lr`` and ``cfg.lr * cfg.head_lr_mult``; returns the
    optimiser and the two base rates for the poly schedule."""
    backbone, head = model.param_groups()
    base_lrs = [cfg.lr, cfg.lr * cfg.head_lr_mult]
    opt = torch.optim.SGD(
        [{"params": backbone, "lr": base_lrs[0]}, {"params": head, "lr": base_lrs[1]}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    return opt, base_lrs


def crop_batch(
    ctx: StageContext,
    ids: list[str],
    picks: np.ndarray,
    step: int,
    labels_for: Callable[[int, np.ndarray], np.ndarray],
    distort: bool = False,
    extra_for: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> tuple[torch.Tensor, ...]:
    """One training batch: for sample ``picks[j]`` the image and ``labels_for(index, image)``
    go through :func:`stages.augment.scale_flip_crop` (and :func:`stages.augment.photometric`
    with ``distort``) with ``step_rng(seed, step, j)``. Returns images (N, 3, c, c) 0..255,
    labels (N, c, c) long with 255 on padding, and the real-pixel mask (padding False); with
    ``extra_for`` a fourth (N, c, c) long map that went through the same geometry (padding
    undefined: read it where the mask is True)."""
    images, targets, real, extras = [], [], [], []
    for j, i in enumerate(picks):
        image = ctx.dataset.load_image(ids[i])
        maps = [labels_for(int(i), image)]
        if extra_for is not None:
            maps.append(extra_for(int(i), image))
        for m in maps:
            if m.shape != image.shape[:2]:
                raise DataError(
                    ctx.dataset.image_path(ids[i]),
                    f"image is {image.shape[1]}x{image.shape[0]} but its labels are {m.shape[1]}x{m.shape[0]}",
                )
        rng = step_rng(ctx.config.seed, step, j)
        crop, (target, inside, *more) = scale_flip_crop(
            image, rng, ctx.section.scale_range, ctx.section.crop, (maps[0], np.zeros_like(maps[0]), *maps[1:])
        )
        images.append(photometric(crop, rng) if distort else crop)
        targets.append(target)
        real.append(inside != IGNORE)
        extras.extend(more)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(ctx.device)
    out = (
        x,
        torch.from_numpy(np.stack(targets)).long().to(ctx.device),
        torch.from_numpy(np.stack(real)).to(ctx.device),
    )
    if extra_for is not None:
        out += (torch.from_numpy(np.stack(extras).astype(np.int64)).to(ctx.device),)
    return out


def sparse_batches(
    ctx: StageContext, ids: list[str], distort: bool
) -> Callable[[np.ndarray, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``batch(picks, step)``: :func:`crop_batch` of the images with their sparse training
    labels (:func:`stages.sparse.training_labels`), each image's labels made once."""
    from .sparse import training_labels

    @functools.lru_cache(maxsize=4096)  # synthesized scribbles cost ~0.1 s an image; keep them
    def labels_of(i: int, shape: tuple[int, int]) -> np.ndarray:
        return training_labels(ctx, ids[i], shape)

    return lambda picks, step: crop_batch(
        ctx, ids, picks, step, lambda i, image: labels_of(i, image.shape[:2]), distort
    )


def train_sparse(
    ctx: StageContext,
    build: Callable[[dict], torch.nn.Module],
    arch: dict[str, Any],
    objective: Callable[..., dict[str, torch.Tensor]],
    terms: tuple[str, ...],
    diagnostics: tuple[str, ...] = (),
) -> StageResult:
    """A single-stage branch's training (``dfr_train``, ``blpseg_train``): the network
    ``build(arch)`` seeded by the run's seed, AdamW, AMP on CUDA, batches of sparse labels
    (:func:`sparse_batches`); each step ``objective(forward_train(x), x, y, real, step)``
    returns the loss terms and ``loss``. The manifest gets the terms that ran and the last
    values of every term and diagnostic."""
    cfg, ids = ctx.section, sorted(ctx.ids)
    torch.manual_seed(ctx.config.seed)
    model = build(arch).to(ctx.device)
    opt, base_lrs = adamw(model, cfg)
    amp, scaler, device_type = amp_setup(cfg.amp, ctx.device)
    curves: dict[str, list[float]] = {t: [] for t in terms + diagnostics}
    batch = sparse_batches(ctx, ids, cfg.photometric)

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        x, y, real = batch(picks, step)
        with torch.autocast(device_type, enabled=amp):
            outputs = model.forward_train(x)
        out = objective(outputs, x, y, real, step)
        for t in curves:
            if t in out:
                curves[t].append(float(out[t].detach()))
        return out["loss"]

    info = train_loop(ctx, model, opt, base_lrs, len(ids), step_fn, scaler)
    save_trained(ctx, model, info, arch=arch)
    model = opt = None  # free them before release()
    return trained_result(
        ctx,
        info,
        images=len(ids),
        labels=ctx.config.labels,
        amp=amp,
        terms=[t for t in terms if curves[t]],
        **{f"{t}_last": round(float(np.mean(v[-10:])), 5) for t, v in curves.items() if v},
    )


def amp_setup(amp: bool, device: str) -> tuple[bool, torch.amp.GradScaler | None, str]:
    """(AMP on?, its grad scaler, autocast device type): mixed precision only when asked
    for (``amp``) on a CUDA device."""
    amp = amp and str(device).startswith("cuda")
    return amp, (torch.amp.GradScaler("cuda") if amp else None), ("cuda" if amp else "cpu")


def trained_model(state: dict, build: Callable[[dict], torch.nn.Module], device: str) -> torch.nn.Module:
    """The network of a ``model.pt`` state (``arch`` + ``state_dict``), rebuilt by ``build``
    without pretrained weights (the state has them all), in eval mode on ``device``. It is
    built on the meta device and takes the state's tensors, so no random init is computed
    only to be overwritten."""
    arch = {**state["arch"], "weights": "none"}
    try:
        with torch.device("meta"):
            model = build(arch)
        model.load_state_dict(state["state_dict"], assign=True)
        complete = not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    except (NotImplementedError, RuntimeError):  # a constructor that needs real values; a real error recurs below
        complete = False
    if not complete:  # or a tensor the state does not hold
        model = build(arch)
        model.load_state_dict(state["state_dict"])
    return model.to(device).eval()


def adamw(model: torch.nn.Module, cfg) -> tuple[torch.optim.AdamW, list[float]]:
    """AdamW at ``cfg.lr`` over ``model.param_groups()`` = (decayed, not decayed): the second
    group gets no weight decay; returns the optimiser and the base rates for the schedule."""
    decay, no_decay = model.param_groups()
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.999),
    )
    return opt, [cfg.lr, cfg.lr]


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    """zero_grad, backward, step; through the AMP ``scaler`` when there is one."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def predict_val_label(ctx: StageContext, image_id: str, model: torch.nn.Module) -> dict:
    """A single-stage network's val label: softmax averaged over the section's ``scales`` and
    ``flip`` at image size (:func:`models.segmentation.predict_probs`), its argmax as a label PNG."""
    from models.seeds import labels_from_soft
    from models.segmentation import predict_probs

    probs = predict_probs(model, ctx.dataset.load_image(image_id), ctx.section.scales, ctx.section.flip, ctx.device)
    ctx.out.write_label(image_id, labels_from_soft(probs))
    return {}


def infer_items(ctx: StageContext, model: torch.nn.Module, fn: Callable[..., dict], desc: str) -> StageResult:
    """Run ``fn(ctx, image_id, model=model)`` over the images still to do with a trained
    model, then free it (and cached GPU memory) for the next stage."""
    result = run_items(ctx, functools.partial(fn, model=model), desc=desc)
    model = None  # free it before release()
    release(ctx.device)
    return result


def _get_rng() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def release(device: str) -> None:
    """Give cached GPU memory back after a torch stage (the next stage reads from disk)."""
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()

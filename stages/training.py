"""The training loop the training stages share: epochs over a fixed sample order, poly
learning-rate decay per step, atomic checkpoints every N steps, exact resume (RNG included).

The order of epoch e is ``epoch_order(seed, e)`` and a step's augmentation comes from
``step_rng(seed, step, j)``, so a run resumed at step t sees exactly the batches it would
have seen; the checkpoint holds the model, the optimiser and the loss history.
"""
from __future__ import annotations

import functools
import time
from typing import Callable

import numpy as np
import torch

from .augment import epoch_order
from .base import StageContext, StageResult, run_items


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """lr_t = lr_0 (1 - t/T)^power."""
    return base * (1.0 - step / total) ** power


def train_loop(ctx: StageContext, model: torch.nn.Module, opt: torch.optim.Optimizer, base_lrs: list[float],
               n_samples: int, step_fn: Callable[[np.ndarray, int], torch.Tensor],
               scaler: torch.amp.GradScaler | None = None) -> dict:
    """Run ``step_fn(sample indices, step) -> loss`` for ``cfg.iterations`` steps (where the
    stage has it) or ``cfg.epochs`` epochs; returns info (steps, loss curve per epoch and for
    a last partial epoch, seconds, the step it resumed from).

    Uses ``ctx.cfg``: ``batch_size``, ``epochs`` / ``iterations``, ``poly_power``,
    ``checkpoint_every``. A checkpoint holds the model, the optimiser, the loss history, the
    torch RNG states (dropout) and the AMP ``scaler``, so a resumed run is the same run.
    """
    cfg, seed = ctx.cfg, ctx.config.seed
    batch = min(cfg.batch_size, n_samples)
    steps_per_epoch = max(1, n_samples // batch)  # drop the last partial batch, as IRN/PSA
    total = getattr(cfg, "iterations", None) or cfg.epochs * steps_per_epoch
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
        ctx.log.info("%s: resuming from step %d of %d", ctx.stage, start, total)
    model.train()
    t0 = time.time()
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        picks = epoch_order(seed, epoch, n_samples)[k * batch:(k + 1) * batch]
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = poly_lr(base, step, total, cfg.poly_power)
        loss = step_fn(picks, step)
        optimizer_step(loss, opt, scaler)
        running.append(float(loss.detach()))
        if k == steps_per_epoch - 1 or step + 1 == total:
            history.append(round(float(np.mean(running)), 5))
            running = []
            if (epoch + 1) % max(1, n_epochs // 10) == 0 or step + 1 == total:
                ctx.log.info("%s: epoch %d/%d loss %.4f (%.1f s)", ctx.stage, epoch + 1, n_epochs, history[-1],
                             time.time() - t0)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "history": history,
                     "running": running, "rng": _get_rng()}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            ctx.out.save_checkpoint(step + 1, state)
    return {"steps": total, "epochs": n_epochs, "loss_curve": history,
            "train_seconds": round(time.time() - t0, 2), "resumed_from": start}


def sgd(model: torch.nn.Module, cfg) -> tuple[torch.optim.SGD, list[float]]:
    """SGD (momentum and weight decay passed by name) over ``model.param_groups()`` =
    (backbone, new layers), at ``cfg.lr`` and ``cfg.lr * cfg.head_lr_mult``; returns the
    optimiser and the two base rates for the poly schedule."""
    backbone, head = model.param_groups()
    base_lrs = [cfg.lr, cfg.lr * cfg.head_lr_mult]
    opt = torch.optim.SGD([{"params": backbone, "lr": base_lrs[0]}, {"params": head, "lr": base_lrs[1]}],
                          lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return opt, base_lrs


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


def infer_items(ctx: StageContext, model: torch.nn.Module, fn: Callable[..., dict], desc: str) -> StageResult:
    """Run ``fn(ctx, image_id, model=model)`` over the images still to do with a trained
    model, then free it (and cached GPU memory) for the next stage."""
    result = run_items(ctx, functools.partial(fn, model=model), desc=desc)
    del model
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

"""The training loop the training stages share: epochs over a fixed sample order, poly
learning-rate decay per step, atomic checkpoints every N steps, exact resume.

The order of epoch e is ``epoch_order(seed, e)`` and a step's augmentation comes from
``step_rng(seed, step, j)``, so a run resumed at step t sees exactly the batches it would
have seen; the checkpoint holds the model, the optimiser and the loss history.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .augment import epoch_order
from .base import StageContext


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """lr_t = lr_0 (1 - t/T)^power."""
    return base * (1.0 - step / total) ** power


def train_loop(ctx: StageContext, model: torch.nn.Module, opt: torch.optim.Optimizer, base_lrs: list[float],
               n_samples: int, step_fn: Callable[[np.ndarray, int], torch.Tensor]) -> dict:
    """Run ``cfg.epochs`` epochs of ``step_fn(sample indices, step) -> loss``; returns info
    (steps, loss curve per epoch, seconds, the step it resumed from).

    Uses ``ctx.cfg``: ``batch_size``, ``epochs``, ``poly_power``, ``checkpoint_every``.
    """
    cfg, seed = ctx.cfg, ctx.config.seed
    batch = min(cfg.batch_size, n_samples)
    steps_per_epoch = max(1, n_samples // batch)  # drop the last partial batch, as IRN/PSA
    total = cfg.epochs * steps_per_epoch
    start, history, running = 0, [], []
    found = ctx.out.latest_checkpoint()
    if found is not None:
        start, state = found
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, running = state["history"], state.get("running", [])
        ctx.log.info("%s: resuming from step %d of %d", ctx.stage, start, total)
    model.train()
    t0 = time.time()
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        picks = epoch_order(seed, epoch, n_samples)[k * batch:(k + 1) * batch]
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = poly_lr(base, step, total, cfg.poly_power)
        loss = step_fn(picks, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        if k == steps_per_epoch - 1:
            history.append(round(float(np.mean(running)), 5))
            running = []
            if (epoch + 1) % max(1, cfg.epochs // 10) == 0 or epoch + 1 == cfg.epochs:
                ctx.log.info("%s: epoch %d/%d loss %.4f (%.1f s)", ctx.stage, epoch + 1, cfg.epochs, history[-1],
                             time.time() - t0)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            ctx.out.save_checkpoint(step + 1, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                               "history": history, "running": running})
    return {"steps": total, "epochs": cfg.epochs, "loss_curve": history,
            "train_seconds": round(time.time() - t0, 2), "resumed_from": start}


def release(device: str) -> None:
    """Give cached GPU memory back after a torch stage (the next stage reads from disk)."""
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()

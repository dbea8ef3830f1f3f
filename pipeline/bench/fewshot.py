"""Benchmark of SCL few-shot: a training step of 1-shot episodes and a K-shot test episode."""

from __future__ import annotations

from typing import Any

from .core import Case, bench, in_child, measured, measured_steps


def _episode_batch(batch: int, crop: int, device: str, seed: int = 0):
    """Random support / query images and 0/1 masks of ``batch`` episodes at ``crop``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    s, q = (torch.randint(0, 255, (batch, 3, crop, crop), generator=gen).float().to(device) for _ in range(2))
    ms, mq = ((torch.rand(batch, crop, crop, generator=gen) > 0.8).long().to(device) for _ in range(2))
    return s, ms, q, mq


def _train_step(case: Case, depth: int, channels: int, batch: int, crop: int, sgm: bool, prior: bool, loss: str):
    """SGD steps of SCL on ``batch`` random 1-shot episodes (Eq. 5.14)."""
    import torch

    from models.fewshot import SclNet, scl_loss

    model = SclNet(depth, channels, sgm=sgm, prior=prior).to(case.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    s, ms, q, mq = _episode_batch(batch, crop, case.device)
    steps = max(1, case.images // batch)
    return measured_steps(
        lambda: scl_loss(model(s, ms, q), ms, mq, loss == "balanced")["loss"], opt, steps, batch, case.device
    )


def _eval_episode(case: Case, depth: int, channels: int, shots: int, size: int, prior: bool):
    """``case.images`` K-shot test episodes: K supports and the query encoded, the cross-guided fusion of the
    K 1-shot predictions at the image's size (Eq. 5.15-5.17) and the prototype baseline."""
    import torch
    import torch.nn.functional as F

    from models.fewshot import SclNet, cross_guided, prototype_logits

    model = SclNet(depth, channels, prior=prior).to(case.device).eval()
    s, ms, q, _ = _episode_batch(shots, size, case.device)

    def one() -> None:
        with torch.no_grad():
            images = [*s, q[0]]
            enc = {id(x): model.encode(x[None]) for x in images}  # each image encoded once, as the stage caches them
            vec = [model.support_vectors(enc[id(images[k])][0], ms[k : k + 1]) for k in range(shots)]

            def logits_of(j: int, image: torch.Tensor) -> torch.Tensor:
                f, h = enc[id(image)]
                prior_mask = model.prior_of(h, enc[id(images[j])][1], ms[j : j + 1])
                logits = model.query_logits(f, vec[j]["a"], vec[j]["b"], prior_mask)
                return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]

            if shots > 1:
                cross_guided(logits_of, images[:shots], list(ms), images[shots])
            else:
                logits_of(0, images[shots])
            prototype_logits(
                [enc[id(x)][0] for x in images[:shots]],
                [ms[k : k + 1] for k in range(shots)],
                enc[id(images[shots])][0],
            )

    def work() -> int:
        for _ in range(case.images):
            one()
        return case.images

    return measured(work, case.device, warmup=one)


@bench("fewshot_train")
def bench_fewshot_train(
    case: Case,
    depth: int = 18,
    channels: int = 64,
    batch: int = 8,
    crop: int = 64,
    sgm: bool = True,
    prior: bool = False,
    loss: str = "balanced",
    shots: int = 5,
    **_: Any,
) -> list[dict[str, Any]]:
    """SCL training throughput (episodes a second: one support and one query each, the
    support's two passes and the query's through FPM and decoder, SGD) at the demo's sizes, and
    one K-shot test episode (encoder, the K x K cross-guided predictions, the prototype baseline)."""
    sgm, prior = bool(sgm), bool(prior)
    opts = {"depth": int(depth), "channels": int(channels)}
    r = in_child(_train_step, case, **opts, batch=int(batch), crop=int(crop), sgm=sgm, prior=prior, loss=str(loss))
    base = "SCL" if sgm else "base (no SGM)"
    rows = [
        {
            "case": f"fewshot_train step {base} resnet{depth} channels {channels} batch {batch} crop {crop}"
            f"{' prior' if prior else ''} loss {loss} (images = episodes)",
            **r,
        }
    ]
    r = in_child(_eval_episode, case, **opts, shots=int(shots), size=int(crop), prior=prior)
    rows.append({"case": f"fewshot_eval {shots}-shot episode at {crop} px (images = episodes)", **r})
    return rows

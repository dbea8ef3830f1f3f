"""Benchmark of the RRM network's training steps (classification-only and joint)."""

from __future__ import annotations


from typing import Any

import numpy as np

from .core import Case, bench, in_child, measured_repeat
from .segmentation import _seg_infer, _seg_model


def _rrm_train_step(
    case: Case, depth: int, batch: int, crop: int, scales: list[float], crf_workers: int, joint: bool
) -> dict[str, Any]:
    """One RRM step per batch of the synthetic images' crops (tags from their GT, 21 classes):
    ``joint`` = Algorithm 1's step (forward, CAMs at ``scales``, the batch's online labels with
    their CRFs on ``crf_workers`` processes, Eq. 2.15, SGD); else the classification-only step
    of the warm-up."""
    import functools

    import torch

    from models.cam import classification_loss
    from stages.augment import scale_flip_crop, step_rng
    from stages.rrm_train import crop_cams, reliable_batch, rrm_objective
    from stages.training import optimizer_step

    from stages.rrm_train import RrmTrainConfig
    from ..runner import pool_map

    cfg = RrmTrainConfig(depth=depth, crop=crop, batch_size=batch, cam_scales=scales, crf_workers=crf_workers)
    device, steps = case.device, max(1, case.images // batch)
    model = _seg_model("rrm", str(depth)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    samples = case.samples()[:batch]
    picked = (samples * (batch // len(samples) + 1))[:batch]  # a batch of the images, repeated
    crops = [
        scale_flip_crop(image, step_rng(0, 0, j), cfg.scale_range, crop)[0] for j, (image, _, _) in enumerate(picked)
    ]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().to(device)
    tags = np.zeros((batch, 20), np.float32)
    for j, (_, gt, _) in enumerate(picked):
        present = [c for c in np.unique(gt) if 1 <= c <= 20]
        tags[j, np.asarray(present, int) - 1] = 1.0
    y = torch.from_numpy(tags).to(device)
    real = torch.ones(batch, crop, crop, dtype=torch.bool, device=device)
    mapper = functools.partial(pool_map, threads=1)

    def step() -> None:
        f = model.features(x)
        if not joint:
            optimizer_step(classification_loss(model.classifier(f).mean((2, 3)), y), opt)
            return
        out = model.heads(f)
        labels = reliable_batch(x, crop_cams(model, x, out["cam"], cfg.cam_scales), tags, real, cfg, mapper)
        optimizer_step(rrm_objective(out, x, labels, real, y, cfg)["loss"], opt)

    return measured_repeat(step, steps, batch, device)


@bench("rrm_train")
def bench_rrm_train(
    case: Case,
    depth: int = 50,
    batch: int = 8,
    crop: int = 321,
    crf_workers: int = 0,
    scales: str = "0.5,1,1.5,2",
    multiscale: bool = False,
    **_: Any,
) -> list[dict[str, Any]]:
    """RRM training throughput: Algorithm 1's joint step (CAMs at ``scales``, the batch's
    online labels with their dense CRFs on ``crf_workers`` processes, 0 = one per core, Eq. 2.15,
    SGD), the classification-only warm-up step, and single-scale inference per image (the
    segmentation branch; ``multiscale``: + scales 0.5-1.75 and flips)."""
    cam_scales = [float(s) for s in str(scales).split(",")]
    rows = []
    for joint in (True, False):
        r = in_child(
            _rrm_train_step,
            case,
            depth=int(depth),
            batch=int(batch),
            crop=int(crop),
            scales=cam_scales,
            crf_workers=int(crf_workers),
            joint=joint,
        )
        what = (
            f"joint step, CAM scales {scales}, CRF workers {crf_workers or 'all cores'}"
            if joint
            else "classification-only step"
        )
        rows.append({"case": f"rrm_train {what}: resnet{depth} batch {batch} crop {crop}", **r})
    cases = [([1.0], False)] + ([([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], True)] if multiscale else [])
    for sc, flip in cases:
        r = in_child(_seg_infer, case, kind="rrm", arch=str(depth), scales=sc, flip=flip)
        rows.append(
            {
                "case": f"rrm_eval resnet{depth} {'single scale' if len(sc) == 1 else 'scales 0.5-1.75 + flip'}"
                " (before the CRF)",
                **r,
            }
        )
    return rows

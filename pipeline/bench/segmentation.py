"""Benchmarks of the segmentation networks: the final model, DFR and BLPSeg (a training step and
inference each).
"""

from __future__ import annotations


from typing import Any


from .core import Case, bench, in_child, measured, measured_repeat


def _seg_model(kind: str, arch: str, classes: int = 21):
    """The DeepLab (``kind`` final), DFR (dfr), BLPSeg (blpseg, the paper's LAM and widths) or
    RRM (rrm, ``arch`` = ResNet depth, the thesis' widths) network of ``arch``, from scratch."""
    from models.segmentation import BlpNet, DeepLab, DfrNet, RrmNet

    return {"final": DeepLab, "dfr": DfrNet, "blpseg": BlpNet, "rrm": lambda depth, k: RrmNet(int(depth), k)}[kind](
        arch, classes
    )


def _seg_train_step(case: Case, kind: str, arch: str, batch: int, crop: int, amp: bool, loss: str) -> dict[str, Any]:
    """One optimiser step per batch on random crops: DeepLab with CE (``loss`` ce / crf: +
    the dense-CRF loss), the DFR network with Eq. 1 (``loss`` pce / potts / dfr) or the
    BLPSeg network with BLPSeg Eq. 12 (``loss`` blp; pce: partial CE) on scribble-like sparse
    labels."""
    import torch
    import torch.nn.functional as F

    from models.losses import dense_crf_loss, dfr_objective, dfr_preset
    from stages.blpseg_train import blpseg_objective
    from stages.training import amp_setup, optimizer_step

    from stages.blpseg_train import BlpsegTrainConfig

    device, steps = case.device, max(1, case.images // batch)
    model = _seg_model(kind, arch).to(device).train()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        if kind == "final"
        else torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01)
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (batch, 3, crop, crop), generator=gen).float().to(device)
    y = torch.randint(0, 21, (batch, crop, crop), generator=gen).to(device)
    if kind != "final":
        y[torch.rand(batch, crop, crop, generator=gen).to(device) > 0.03] = 255  # ~3% labelled, as VOC scribbles
    real = torch.ones(batch, crop, crop, dtype=torch.bool, device=device)
    terms = dfr_preset(loss) if kind == "dfr" else None
    blp = BlpsegTrainConfig(blp=loss == "blp") if kind == "blpseg" else None
    use_amp, scaler, device_type = amp_setup(amp, device)

    def step() -> None:
        with torch.autocast(device_type, enabled=use_amp):
            out = model(x) if kind == "final" else model.forward_train(x)
        if kind == "final":
            value = F.cross_entropy(out.float(), y)
            if loss == "crf":
                value = value + 0.5 * dense_crf_loss(out.float(), x, real, 5, 0.5, 6.0, 0.1)
        elif kind == "blpseg":
            value = blpseg_objective(out[0].float(), out[1].float(), y, real, blp, self_training=False)["loss"]
        else:
            logits, feats = out
            value = dfr_objective(logits.float(), feats.float(), x, y, real, terms)["loss"]
        optimizer_step(value, opt, scaler)

    return measured_repeat(step, steps, batch, device)


def _seg_infer(case: Case, kind: str, arch: str, scales: list[float], flip: bool) -> dict[str, Any]:
    from models.segmentation import predict_probs

    device, samples = case.device, case.samples()
    model = _seg_model(kind, arch).to(device).eval()

    def work() -> int:
        for image, _, _ in samples:
            predict_probs(model, image, scales, flip, device)
        return len(samples)

    return measured(work, device, warmup=lambda: predict_probs(model, samples[0][0], [1.0], False, device))


def _seg_rows(
    case: Case, kind: str, arch: str, batch: int, crop: int, amp: bool, loss: str, multiscale: bool
) -> list[dict[str, Any]]:
    rows = []
    r = in_child(_seg_train_step, case, kind=kind, arch=arch, batch=batch, crop=crop, amp=amp, loss=loss)
    tags = (" amp" if amp and case.device.startswith("cuda") else "") + f" loss {loss}"
    rows.append({"case": f"{kind}_train step {arch} batch {batch} crop {crop}{tags}", **r})
    cases = [([1.0], False)] + ([([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], True)] if multiscale else [])
    for scales, flip in cases:
        r = in_child(_seg_infer, case, kind=kind, arch=arch, scales=scales, flip=flip)
        what = "single scale" if len(scales) == 1 else "scales 0.5-1.75 + flip"
        rows.append({"case": f"{kind}_eval {arch} {what}", **r})
    return rows


@bench("final_train")
def bench_final_train(
    case: Case,
    arch: str = "deeplabv3_resnet50",
    batch: int = 10,
    crop: int = 321,
    amp: bool = True,
    reg: bool = False,
    multiscale: bool = True,
    **_: Any,
) -> list[dict[str, Any]]:
    """Final-model training throughput (one SGD step per batch; ``amp`` on CUDA, ``reg`` adds
    the dense-CRF loss) and inference per image: single scale, and 6 scales + flip."""
    return _seg_rows(case, "final", arch, batch, crop, amp, "crf" if reg else "ce", multiscale)


@bench("dfr_train")
def bench_dfr_train(
    case: Case,
    arch: str = "swin_t",
    batch: int = 2,
    crop: int = 512,
    amp: bool = True,
    loss: str = "dfr",
    multiscale: bool = True,
    **_: Any,
) -> list[dict[str, Any]]:
    """DFR training throughput (one AdamW step per batch of ``crop`` x ``crop``, Eq. 1 with
    ``loss`` dfr / potts / pce; the paper's batch is 2 per GPU) and inference per image:
    single scale, and 6 scales + flip (no feature head)."""
    from models.losses import dfr_preset

    dfr_preset(loss)  # an unknown name fails here, before any child process starts
    return _seg_rows(case, "dfr", arch, batch, crop, amp, loss, multiscale)


@bench("blpseg_train")
def bench_blpseg_train(
    case: Case,
    arch: str = "resnet101",
    batch: int = 2,
    crop: int = 384,
    amp: bool = True,
    loss: str = "blp",
    multiscale: bool = False,
    **_: Any,
) -> list[dict[str, Any]]:
    """BLPSeg training throughput (one AdamW step per batch of ``crop`` x ``crop``, BLPSeg Eq. 12
    with the paper's LAM: sigma 6, a 37 x 37 window, 256-d low-level features; ``loss`` blp or
    pce) and single-scale inference per image (``multiscale``: + scales 0.5-1.75 and flips)."""
    if loss not in ("blp", "pce"):
        raise ValueError(f"blpseg_train bench: loss must be blp or pce, got {loss!r}")
    return _seg_rows(case, "blpseg", arch, batch, crop, amp, loss, multiscale)

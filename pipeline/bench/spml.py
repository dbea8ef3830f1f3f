"""Benchmark of SPML's embedding: a training step and the train-split inference."""

from __future__ import annotations


from typing import Any

import numpy as np

from .core import Case, bench, in_child, measured, measured_repeat


def _spml_train_step(case: Case, depth: int, batch: int, crop: int, memory: int) -> dict[str, Any]:
    """One SPML step per batch of random crops (21 classes, ~3% of the pixels labelled as
    scribbles, 16 x 16 regions as the over-segmentation): embedding, per-image spherical k-means,
    the C / O / V terms against the batch and ``memory`` earlier batches, SGD."""
    import torch

    from stages.spml_train import spml_objective
    from stages.training import optimizer_step

    from stages.spml_train import SpmlTrainConfig

    from models.segmentation import SpmlNet
    from models.spml import Memory

    cfg = SpmlTrainConfig(depth=depth, crop=crop, batch_size=batch, memory_batches=memory)
    device, steps = case.device, max(1, case.images // batch)
    model = SpmlNet(depth, 21).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (batch, 3, crop, crop), generator=gen).float().to(device)
    y = torch.randint(0, 21, (batch, crop, crop), generator=gen).to(device)
    y[torch.rand(batch, crop, crop, generator=gen).to(device) > 0.03] = 255
    yy, xx = torch.meshgrid(torch.arange(crop), torch.arange(crop), indexing="ij")
    regions = ((yy // 16) * (crop // 16 + 1) + xx // 16).expand(batch, crop, crop).to(device)
    real = torch.ones(batch, crop, crop, dtype=torch.bool, device=device)
    tags = torch.rand(batch, 20, generator=gen).to(device) < 0.15
    bank: list[dict] = []

    def step() -> None:
        emb, logits = model.forward_train(x)
        mem = Memory(*(torch.cat([b[k] for b in bank]) for k in ("protos", "label", "tags"))) if bank else None
        terms, new = spml_objective(emb.float(), logits.float(), y, regions, real, tags, cfg, 21, mem)
        optimizer_step(terms["loss"], opt)
        bank.append(new)
        del bank[: -memory or len(bank)]

    return measured_repeat(step, steps, batch, device)


def _spml_infer(case: Case, depth: int) -> dict[str, Any]:
    """SPML's pseudo-label of each image: embedding, classifier, the random walk on the
    embedding (released beta 20, gamma 5, 2^6 steps), every class kept."""
    import torch
    import torch.nn.functional as F

    from models.segmentation import SpmlNet
    from models.spml import embedding_walk

    device, samples = case.device, case.samples()
    model = SpmlNet(depth, 21).to(device).eval()
    ids = torch.arange(21, device=device)

    def one(image: np.ndarray) -> None:
        x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float().to(device)
        with torch.no_grad():
            emb = model.embedding(x)
            embedding_walk(emb[0], model.classifier(F.normalize(emb, dim=1))[0], ids, image.shape[:2], 20.0, 5.0, 6)

    def work() -> int:
        for image, _, _ in samples:
            one(image)
        return len(samples)

    return measured(work, device, warmup=lambda: one(samples[0][0]))


@bench("spml_train")
def bench_spml_train(
    case: Case, depth: int = 101, batch: int = 4, crop: int = 512, memory: int = 2, **_: Any
) -> list[dict[str, Any]]:
    """SPML training throughput (one step per batch of ``crop`` x ``crop``: embedding, k-means
    segments, the pixel-to-segment terms with a memory bank of ``memory`` batches, SGD; the
    released VOC batch is 4) and its pseudo-label per image (embedding, classifier, random walk
    on the embedding)."""
    r = in_child(_spml_train_step, case, depth=int(depth), batch=int(batch), crop=int(crop), memory=int(memory))
    rows = [{"case": f"spml_train step resnet{depth} batch {batch} crop {crop} memory {memory}", **r}]
    r = in_child(_spml_infer, case, depth=int(depth))
    rows.append({"case": f"spml resnet{depth}: classifier + random walk on the embedding", **r})
    return rows

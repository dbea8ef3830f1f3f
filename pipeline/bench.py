"""``wsss bench NAME``: speed and peak memory of one stage's work at VOC size.

Each case runs in a fresh child process (forked from :mod:`pipeline.processes`' server), so
its peak resident memory (``ru_maxrss``) is its own; on CUDA the peak allocated GPU memory
is reported too. Inputs are synthetic images from the demo generator at the requested size (500x375 by default,
a typical VOC image) with their synthesized weak labels, so no dataset is needed. Models have random
weights: speed and memory do not depend on what the weights are.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import numpy as np

from .processes import forkserver

BENCHES: dict[str, Callable[..., list[dict[str, Any]]]] = {}

# Training stages sized to run in seconds: the upstream of a per-image stage whose speed,
# not quality, is measured (``scale_out``), and the tests' tiny runs.
TINY_TRAINING: dict[str, dict[str, Any]] = {
    "cam_train": {"depth": 18, "crop": 48, "batch_size": 3, "epochs": 1, "checkpoint_every": 1000},
    "cam": {"scales": [1.0]},
    "affinity_train": {"depth": 18, "crop": 48, "batch_size": 3, "epochs": 1, "checkpoint_every": 1000},
    "a2gnn": {"epochs": 2, "hidden": 16},
    "final_train": {
        "arch": "deeplabv3_mobilenet_v3_large",
        "crop": 48,
        "batch_size": 2,
        "iterations": 2,
        "checkpoint_every": 1000,
    },
    "dfr_train": {
        "backbone": "swin_mini",
        "channels": 16,
        "feature_dim": 8,
        "crop": 48,
        "batch_size": 2,
        "iterations": 2,
        "warmup_iterations": 0,
        "lr": 1e-3,
        "checkpoint_every": 1000,
    },
    "dfr_eval": {"scales": [1.0], "flip": False},
    "blpseg_train": {
        "backbone": "resnet18",
        "channels": 16,
        "low_dim": 8,
        "radius": 3,
        "crop": 48,
        "batch_size": 2,
        "iterations": 2,
        "self_training_from": 1,
        "checkpoint_every": 1000,
    },
    "rrm_train": {
        "depth": 18,
        "local_channels": 16,
        "attention_channels": 8,
        "crop": 48,
        "batch_size": 2,
        "iterations": 2,
        "cls_only_fraction": 0.0,
        "cam_scales": [1.0],
        "crf_workers": 1,
        "checkpoint_every": 1000,
    },
    "spml_train": {
        "depth": 18,
        "channels": 16,
        "dim": 8,
        "clusters": 2,
        "kmeans_iterations": 2,
        "crop": 48,
        "batch_size": 2,
        "iterations": 2,
        "warmup_iterations": 0,
        "checkpoint_every": 1000,
    },
    "fewshot_train": {
        "depth": 18,
        "channels": 16,
        "crop": 48,
        "batch_size": 2,
        "iterations": 2,
        "folds": 3,
        "min_pixels": 16,
        "checkpoint_every": 1000,
    },
    "fewshot_eval": {"episodes": 4, "shots": [1, 2]},
}


@dataclass(frozen=True)
class Case:
    """What every measurement shares: the device, the torch / OpenCV threads, and the
    synthetic images (count and size). A measurement gets it plus its own named options."""

    device: str
    threads: int
    images: int
    height: int
    width: int

    def samples(self) -> list[tuple[np.ndarray, np.ndarray, Any]]:
        return demo_samples(self.images, self.height, self.width)

    def grid(self, stride: int = 8) -> tuple[int, int]:
        return -(-self.height // stride), -(-self.width // stride)

    def setup(self) -> None:
        """In the measuring process: the thread count for torch and OpenCV."""
        import cv2
        import torch

        torch.set_num_threads(self.threads)
        cv2.setNumThreads(self.threads)


def bench(name: str):
    def register(fn):
        BENCHES[name] = fn
        return fn

    return register


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child(fn, case, options, queue) -> None:
    try:
        case.setup()
        queue.put(("ok", fn(case, **options)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def in_child(fn: Callable, case: Case, **options: Any) -> dict[str, Any]:
    """Run ``fn(case, **options)`` in a child process (threads set from ``case``); its dict
    result carries the process's own peak memory."""
    ctx = forkserver()
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, case, options, queue))
    proc.start()
    status, out = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(out)
    return out


def measured(work: Callable[[], int], device: str, warmup: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Time ``work()`` (returns how many images it did) and read the peak memory."""
    import torch

    if warmup is not None:
        warmup()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    t0 = time.perf_counter()
    n = work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 3),
        "s_per_image": round(seconds / n, 4),
        "rss_before_mb": round(base, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    out["peak_over_start_mb"] = round(out["peak_rss_mb"] - base, 1)
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def measured_steps(loss_fn: Callable[[], Any], opt, steps: int, batch: int, device: str) -> dict[str, Any]:
    """Time ``steps`` optimiser steps on ``loss_fn()`` after one warm-up step; images = steps x batch."""

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return measured_repeat(step, steps, batch, device)


def measured_repeat(step: Callable[[], Any], steps: int, batch: int, device: str) -> dict[str, Any]:
    """Time ``steps`` calls of ``step()`` after one warm-up call; images = steps x batch."""

    def work() -> int:
        for _ in range(steps):
            step()
        return steps * batch

    return measured(work, device, warmup=step)


def demo_samples(n: int, height: int, width: int) -> list[tuple[np.ndarray, np.ndarray, Any]]:
    """(image, GT, weak labels) of ``n`` synthetic images of the given size."""
    from .config import DemoDataset, WeakConfig
    from .datasets import DemoData

    data = DemoData(DemoDataset(num_train=n, num_val=1, height=height, width=width), WeakConfig())
    return [(data.load_image(i), data.load_gt(i), data.load_weak(i)) for i in data.ids("train")]


# --------------------------------------------------------------------------- cam
def _cam_infer(case: Case, depth: int, output_stride: int, scales: list[float]) -> dict[str, Any]:
    from models.cam import CamNet, multiscale_cam

    device, samples = case.device, case.samples()
    model = CamNet(3, depth, output_stride).to(device).eval()

    def work() -> int:
        for image, _, weak in samples:
            multiscale_cam(model, image, [c - 1 for c in weak.tags], scales, True, device)
        return len(samples)

    return measured(work, device, warmup=lambda: multiscale_cam(model, samples[0][0], [0], [1.0], False, device))


def _cam_train_step(case: Case, depth: int, output_stride: int, batch: int, crop: int) -> dict[str, Any]:
    import torch

    from models.cam import CamNet, classification_loss

    device, steps = case.device, max(1, case.images // batch)
    model = CamNet(20, depth, output_stride).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randint(0, 255, (batch, 3, crop, crop), device=device).float()
    y = (torch.rand(batch, 20, device=device) > 0.8).float()

    return measured_steps(lambda: classification_loss(model(x), y), opt, steps, batch, device)


@bench("cam")
def bench_cam(
    case: Case, depth: int = 50, output_stride: int = 16, batch: int = 4, crop: int = 512, **_: Any
) -> list[dict[str, Any]]:
    """CAM inference (4 scales + flip) per image, and classifier training throughput."""
    scales = [0.5, 1.0, 1.5, 2.0]
    rows = []
    r = in_child(_cam_infer, case, depth=depth, output_stride=output_stride, scales=scales)
    rows.append({"case": f"cam inference resnet{depth} os{output_stride} scales {scales} + flip", **r})
    r = in_child(_cam_train_step, case, depth=depth, output_stride=output_stride, batch=batch, crop=crop)
    rows.append({"case": f"cam_train step resnet{depth} os{output_stride} batch {batch} crop {crop}", **r})
    return rows


# --------------------------------------------------------------------------- seeds
def _seeds(case: Case, kind: str) -> dict[str, Any]:
    import cv2

    from models.cam import with_background
    from models.grabcut import grabcut_seeds
    from stages.seeds import seed_maps

    from stages.seeds import SeedsConfig

    samples = case.samples()
    rng = np.random.default_rng(0)
    # Plausible CAMs: blurred GT class masks plus noise (the rules' cost does not depend on their values).
    cams = []
    for _, gt, weak in samples:
        maps = [
            cv2.GaussianBlur((gt == c).astype(np.float32), (0, 0), 15) + 0.1 * rng.random(gt.shape, np.float32)
            for c in weak.tags
        ]
        cams.append((with_background(np.stack([m / m.max() for m in maps]), 4.0), np.array([0, *weak.tags])))
    cfg = SeedsConfig()
    labels, with_cam = {
        "cam_reliable": ("tags", True),
        "box": ("box", True),
        "scribble": ("scribble", False),
        "point": ("point", False),
    }[kind]

    def work() -> int:
        for (image, _, weak), cam in zip(samples, cams):
            m_b = grabcut_seeds(image, weak.boxes) if labels == "box" else None
            seed_maps(labels, cfg, image, weak, cam if with_cam else None, m_b)
        return len(samples)

    return measured(work, "cpu")


@bench("seeds")
def bench_seeds(case: Case, **_: Any) -> list[dict[str, Any]]:
    """Seed maps per image (CPU work: dense CRF, GrabCut, SLIC), one process."""
    cases = {
        "cam_reliable": "M_I + M'_I (dense CRF agreement, top 40%)",
        "box": "box: GrabCut M_B + M'_I + M_F + M_g",
        "scribble": "scribble: SLIC + expansion (M_S)",
        "point": "point: SLIC + expansion (M_P)",
    }
    return [{"case": label, **in_child(_seeds, case, kind=kind)} for kind, label in cases.items()]


# --------------------------------------------------------------------------- affinity training
def _affinity_train_step(case: Case, depth: int, radius: int, batch: int, crop: int) -> dict[str, Any]:
    import torch

    from models.affinity import AffinityNet, affinity_objective, window_offsets

    device, steps = case.device, max(1, case.images // batch)
    model = AffinityNet(depth).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (batch, 3, crop, crop), generator=gen).float().to(device)
    grid = crop // 8
    seeds = torch.randint(0, 3, (batch, grid, grid), generator=gen).to(device)
    seeds[torch.rand(seeds.shape, generator=gen).to(device) < 0.3] = 255
    valid = torch.ones(batch, grid, grid, dtype=torch.bool, device=device)
    offsets = window_offsets(radius)

    return measured_steps(
        lambda: affinity_objective(model, x, seeds, valid, offsets, 6.0, 0.1, 3.0)["loss"], opt, steps, batch, device
    )


@bench("affinity_train")
def bench_affinity_train(
    case: Case, depth: int = 50, radius: int = 5, batch: int = 4, crop: int = 448, **_: Any
) -> list[dict[str, Any]]:
    """Affinity CNN training throughput (L_Ac + 3 L_Ar, one SGD step per batch), VOC settings."""
    r = in_child(_affinity_train_step, case, depth=depth, radius=radius, batch=batch, crop=crop)
    return [{"case": f"affinity_train step resnet{depth} os8 batch {batch} crop {crop} r={radius}", **r}]


# --------------------------------------------------------------------------- graph + random walk
def _affinity_graph(case: Case, depth: int, radius: int) -> dict[str, Any]:
    import io

    from models.affinity import AffinityNet, window_offsets
    from models.graph import EDGE_THRESHOLD
    from stages.graph import image_graph

    device, samples = case.device, case.samples()
    model = AffinityNet(depth).to(device).eval()
    offsets = window_offsets(radius)
    sizes, edges = [], []

    def work() -> int:
        for image, _, _ in samples:
            g = image_graph(model, offsets, image, EDGE_THRESHOLD, device)
            buf = io.BytesIO()
            np.savez_compressed(buf, **g)
            sizes.append(buf.tell())
            edges.append(g["weight"].size)
        return len(samples)

    out = measured(work, device, warmup=lambda: image_graph(model, offsets, samples[0][0], EDGE_THRESHOLD, device))
    return {**out, "graph_bytes": int(np.mean(sizes)), "nodes": int(np.prod(case.grid())), "edges": int(np.mean(edges))}


def _smooth_noise(channels: int, grid: tuple[int, int], gen):
    """(channels, h, w) uniform noise varying over about 4 grid cells (bilinear from a 4x coarser grid)."""
    import torch

    coarse = torch.rand(1, channels, grid[0] // 4 + 1, grid[1] // 4 + 1, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=grid, mode="bilinear", align_corners=False)[0]


def _walk(
    case: Case, dense: bool, grid: tuple[int, int], radius: int, classes: int, beta: float, logt: int
) -> dict[str, Any]:
    import torch

    from models.affinity import window_offsets
    from models.graph import grid_edges, random_walk, random_walk_dense

    device, n = case.device, case.images
    gen = torch.Generator().manual_seed(0)
    # Smooth random features: affinities spread over (0, 1] like a trained net's.
    edge_index, weight = grid_edges(_smooth_noise(16, grid, gen).to(device) * 4, window_offsets(radius))
    weight = weight.half().float()  # as stored
    source = torch.rand(classes, grid[0] * grid[1], generator=gen).to(device)
    walk = random_walk_dense if dense else random_walk

    def work() -> int:
        for _ in range(n):
            walk(edge_index, weight, source, beta, logt)
        return n

    return {**measured(work, device), "nodes": grid[0] * grid[1], "edges": int(weight.numel())}


@bench("random_walk")
def bench_random_walk(
    case: Case,
    depth: int = 50,
    radius: int = 5,
    classes: int = 3,
    beta: float = 8.0,
    logt: int = 8,
    dense: bool = True,
    grid_stride: int = 8,
    **_: Any,
) -> list[dict[str, Any]]:
    """Graph construction (affinity net forward + edges, npz bytes) and the random walk on
    the image's stride-8 grid: sparse (this project) against the dense N x N formulation of
    the reference code, same graph, same source. ``--opt dense=false`` skips the dense case;
    ``--opt grid_stride=4`` walks on IRN's finer grid (16x the dense matrix)."""
    grid = case.grid(grid_stride)
    rows = [
        {
            "case": f"graph: affinity net resnet{depth} + edges r={radius}",
            **in_child(_affinity_graph, case, depth=depth, radius=radius),
        }
    ]
    for is_dense in [False, True] if dense else [False]:
        kind = "dense N x N, squared (reference code)" if is_dense else "sparse, O(N K) (this project)"
        r = in_child(_walk, case, dense=is_dense, grid=grid, radius=radius, classes=classes, beta=beta, logt=logt)
        rows.append({"case": f"random walk {grid[0]}x{grid[1]} grid, logt {logt}: {kind}", **r})
    return rows


# --------------------------------------------------------------------------- a2gnn
def _a2gnn_problems(case: Case, radius: int, channels: int, seed_fraction: float):
    """Synthetic per-image problems at the image size, with their GT as class indices so
    the outputs can be scored: affinities and node features follow the GT on the stride-8
    grid (a class signal plus smooth / uniform noise), seeds = a random part of the GT, the
    synthesized boxes."""
    import torch

    from models.affinity import window_offsets
    from models.types import IGNORE
    from models.graph import grid_edges, to_grid
    from stages.a2gnn import A2GNN_RELEASED, A2gnnConfig
    from models.transductive import class_index, classes_of, make_problem

    cfg = A2gnnConfig(**A2GNN_RELEASED["box"])
    out = []
    grid = case.grid()
    for k, (image, gt, weak) in enumerate(case.samples()):
        gen = torch.Generator().manual_seed(k)
        seeds = np.where(np.random.default_rng(k).random(gt.shape) < seed_fraction, gt, IGNORE).astype(np.uint8)
        class_ids = classes_of(gt, weak)
        truth = class_index(class_ids)[gt]
        onehot = to_grid(torch.from_numpy(truth[None] == np.arange(len(class_ids))[:, None, None]).float(), 8)
        edge_index, weight = grid_edges(torch.cat([onehot * 3, _smooth_noise(8, grid, gen)]), window_offsets(radius))
        signal = onehot.flatten(1).t().repeat_interleave(-(-channels // len(class_ids)), 1)[:, :channels]
        x = signal + torch.rand(grid[0] * grid[1], channels, generator=gen)
        out.append(
            (
                make_problem(image, seeds, class_ids, weak.boxes, x, edge_index, weight.half().float(), grid, cfg, k),
                truth,
            )
        )
    return out


def _a2gnn_fit(
    case: Case, path: str, layer: str, batch: int, epochs: int, radius: int, channels: int
) -> dict[str, Any]:
    from models.metrics import confusion_matrix, scores
    from models.transductive import batches, fit
    from stages.a2gnn import A2GNN_RELEASED, A2gnnConfig

    device, n = case.device, case.images
    cfg = A2gnnConfig(**{**A2GNN_RELEASED["box"], "epochs": epochs}, path=path, layer=layer)
    problems, truths = zip(*_a2gnn_problems(case, radius, channels, 0.3))
    # as the stage: only images with as many classes train together
    chunks = batches([p.num_classes for p in problems], batch)
    probs: list[np.ndarray] = [None] * n

    def work() -> int:
        for chunk in chunks:
            for i, p in zip(chunk, fit([problems[i] for i in chunk], cfg, radius, device)[0].numpy()):
                probs[i] = p
        return n

    warm = A2gnnConfig(**{**A2GNN_RELEASED["box"], "epochs": 1}, path=path, layer=layer)
    out = measured(work, device, warmup=lambda: fit([problems[0]], warm, radius, device))
    # per-image class indices differ between images: mean of the per-image mIoU
    miou = np.mean([scores(confusion_matrix(p.argmax(0), t, p.shape[0]))["miou"] for p, t in zip(probs, truths)])
    return {
        **out,
        "s_per_epoch": round(out["seconds"] / n / (2 * epochs), 4),
        "image_miou": round(float(miou), 4),
        "probs": probs,
    }


@bench("a2gnn")
def bench_a2gnn(
    case: Case,
    epochs: int = 150,
    radius: int = 4,
    channels: int = 3584,
    batch: int = 4,
    paths: str = "grid,batched,dense,edges",
    **_: Any,
) -> list[dict[str, Any]]:
    """Per-image A²GNN training, box schedule (``epochs`` per phase; 150 = the released
    300), on the stride-8 grid of the image size: each implementation path of the affinity
    attention layer, with the released code's dense N x N formulation measured in the same
    run. ``channels``: node features (3584: ResNet-50 affinity net). ``batched``: ``batch``
    images' models stacked. Every path's probabilities are compared with the first one's:
    ``max_dprob`` and ``same_label`` (fraction of pixels with the same argmax). The paths
    agree to rounding for the same MP nodes; over many epochs rounding-level differences
    can flip the MP loss's argmax between near-tied pixels (bilinear upsampling makes
    exact ties), and the trajectories drift apart without changing the labels much."""
    cases = {
        "grid": ("grid", "a2gnn", 1, "tiled grid (this project)"),
        "batched": ("grid", "a2gnn", batch, f"tiled grid, {batch} images stacked"),
        "dense": ("dense", "a2gnn", 1, "dense N x N (released code)"),
        "edges": ("edges", "a2gnn", 1, "PyG message passing"),
        "gcn": ("edges", "gcn", 1, "GCN baseline (PyG)"),
    }
    grid = case.grid()
    rows, first = [], None
    for name in paths.split(","):
        if name not in cases:
            raise ValueError(f"unknown path {name!r} (known: {', '.join(cases)})")
        path, layer, b, label = cases[name]
        r = in_child(_a2gnn_fit, case, path=path, layer=layer, batch=b, epochs=epochs, radius=radius, channels=channels)
        probs = r.pop("probs")
        first = probs if first is None else first
        if layer == "a2gnn":
            dprob = max(float(np.abs(a - b).max()) for a, b in zip(probs, first))
            r["max_dprob"] = float(f"{dprob:.2e}")
            r["same_label"] = round(
                float(np.mean([(a.argmax(0) == b.argmax(0)).mean() for a, b in zip(probs, first)])), 5
            )
        rows.append({"case": f"a2gnn {grid[0]}x{grid[1]} grid, {2 * epochs} epochs: {label}", **r})
    return rows


# --------------------------------------------------------------------------- segmentation models
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
    from .runner import pool_map

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


# --------------------------------------------------------------------------- scale out
def _timed_stage(data: dict[str, Any], stage: str, label: str) -> dict[str, Any]:
    """Recompute ``stage`` under the config ``data``; its manifest's timing (begin to finish,
    without Prefect's or the cluster's start) and the wall time with them."""
    from .config import config_from_dict
    from .runner import make_run, run_local

    run = make_run(config_from_dict(data, "<bench>"))
    t0 = time.perf_counter()
    if run.config.engine == "prefect":
        from .flow import run_prefect

        run_prefect(run, [stage], {stage})
    else:
        run_local(run, [stage], {stage})
    wall = time.perf_counter() - t0
    manifest = run.store(stage).read_manifest()
    n, seconds = manifest["timings"]["last_run_images"], manifest["timings"]["last_run_s"]
    return {
        "case": label,
        "images": n,
        "seconds": seconds,
        "images_per_s": round(n / seconds, 3),
        "s_per_image": round(seconds / n, 4),
        "wall_s_with_startup": round(wall, 1),
        "processes": len(manifest.get("ran_on", [])),
    }


@bench("scale_out")
def bench_scale_out(
    case: Case, stage: str = "crf", workers: tuple[int, ...] = (1, 2), shard_size: int = 1, **_: Any
) -> list[dict[str, Any]]:
    """Images/s of one per-image stage (``stage``: crf, graph, a2gnn, box_seeds, ...) on
    ``case.images`` demo images at the case size, in one run: the local engine with a process
    pool of each ``workers`` count (1: in the process), then Prefect's Dask task runner on a
    local cluster of as many worker processes (shards of ``shard_size`` images). The upstream
    stages are computed once with tiny training settings (not timed). torch threads per process:
    the cores shared out (``threads: 0``); ``processes``: how many processes ran shards."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="wsss-bench-") as tmp:
        base = {
            "run": "bench",
            "output_root": tmp,
            "device": case.device,
            "engine": "local",
            "shard_size": shard_size,
            **TINY_TRAINING,
            "dataset": {
                "kind": "demo",
                "num_train": case.images,
                "num_val": 1,
                "height": case.height,
                "width": case.width,
            },
        }
        from .config import config_from_dict
        from .runner import make_run, run_local

        run = make_run(config_from_dict(base, "<bench>"))
        if stage not in run.names or not run.spec(stage).per_image:
            raise ValueError(
                f"scale_out: '{stage}' is not a per-image stage of the demo DAG "
                f"({', '.join(n for n in run.names if run.spec(n).per_image)})"
            )
        run_local(run, run.names[: run.names.index(stage)])
        rows = [
            _timed_stage(
                {**base, "workers": k},
                stage,
                f"{stage}: local engine, " + ("in the process" if k == 1 else f"process pool of {k}"),
            )
            for k in workers
        ]
        rows += [
            _timed_stage(
                {**base, "engine": "prefect", "task_runner": "dask", "dask": {"n_workers": k}},
                stage,
                f"{stage}: Prefect + Dask, {k} worker process{'es' if k > 1 else ''}",
            )
            for k in workers
        ]
    return rows

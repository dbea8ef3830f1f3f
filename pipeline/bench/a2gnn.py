"""Benchmarks of the A²GNN pipeline's stages: the classifier and its CAMs, the seed rules, the
affinity net, the graph and random walk, A²GNN.
"""

from __future__ import annotations


from typing import Any

import numpy as np

from .core import Case, bench, in_child, measured, measured_steps


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

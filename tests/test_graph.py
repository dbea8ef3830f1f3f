"""Image -> graph (Eq. 3.14-3.15) edge by edge against a naive construction; the sparse
random walk against the dense reference formulation and a naive matrix power."""

import numpy as np
import pytest
import torch

from models.affinity import AffinityNet, window_offsets
from models.types import IGNORE
from models.graph import (
    cell_labels,
    from_grid,
    grid_edges,
    node_features,
    pair_confusion,
    random_walk,
    random_walk_dense,
    sample_grid,
    to_grid,
)
from stages.graph import image_graph, node_features_of
from models.cam import with_background
from models.graph import keep_known, propagate, seed_scores


def _naive_edges(f, radius, shape, threshold):
    """{(i, j): E_ij} by looping over every pair of grid cells."""
    c, h, w = f.shape
    out = {}
    for y in range(h):
        for x in range(w):
            out[(y * w + x, y * w + x)] = 1.0
            for v in range(h):
                for u in range(w):
                    dy, dx = v - y, u - x
                    if (dy, dx) == (0, 0):
                        continue
                    inside = dy * dy + dx * dx <= radius**2 if shape == "disk" else max(abs(dy), abs(dx)) <= radius
                    d = float(np.exp(-np.abs(f[:, y, x] - f[:, v, u]).mean()))
                    if inside and d > threshold:
                        out[(y * w + x, v * w + u)] = d
    return out


@pytest.mark.parametrize("shape", ["disk", "square"])
def test_grid_edges_match_a_naive_construction(shape):
    rng = np.random.default_rng(0)
    f = rng.normal(0, 1.5, (5, 4, 6)).astype(np.float64)
    threshold = 0.2  # high enough that some in-window pairs are dropped
    naive = _naive_edges(f, 2, shape, threshold)
    edge_index, weight = grid_edges(torch.from_numpy(f), window_offsets(2, shape), threshold)
    got = {(int(i), int(j)): float(v) for (i, j), v in zip(edge_index.t().tolist(), weight)}
    assert len(got) == edge_index.shape[1]  # no duplicate edges
    assert got.keys() == naive.keys()
    assert any(0 < v < 1 for v in got.values()) and len(naive) < 24 * (1 + len(window_offsets(2, shape)))
    for key, value in naive.items():
        assert got[key] == pytest.approx(value, rel=1e-9)
    # symmetric: E_ij = E_ji
    assert all(got[(j, i)] == pytest.approx(v) for (i, j), v in got.items())


def test_node_features_are_l1_normalised_rows():
    x = torch.rand(7, 3, 4, dtype=torch.float64)
    rows = node_features(x)
    assert rows.shape == (12, 7)
    for node in range(12):
        y, xx = divmod(node, 4)
        naive = x[:, y, xx] / x[:, y, xx].sum()
        torch.testing.assert_close(rows[node], naive)


def _tiny_graph(seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(4, 5, 6, generator=g, dtype=torch.float64) * 3
    return grid_edges(f, window_offsets(2), 1e-3), 30


def test_random_walk_sparse_equals_dense_equals_matrix_power():
    (edge_index, weight), n = _tiny_graph()
    source = torch.rand(3, n, dtype=torch.float64)
    beta, logt = 8.0, 3
    a = np.zeros((n, n))
    for (i, j), v in zip(edge_index.t().tolist(), weight.tolist()):
        a[i, j] = v**beta
    t = a / a.sum(0, keepdims=True)
    naive = source.numpy() @ np.linalg.matrix_power(t, 2**logt)
    sparse = random_walk(edge_index, weight, source, beta, logt)
    dense = random_walk_dense(edge_index, weight, source, beta, logt)
    np.testing.assert_allclose(sparse.numpy(), naive, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dense.numpy(), naive, rtol=1e-10, atol=1e-12)
    # each column of T sums to 1, so every node's new score is a convex combination
    assert np.allclose(t.sum(0), 1.0) and (sparse.numpy() <= source.numpy().max(1, keepdims=True) + 1e-12).all()


def test_to_grid_averages_in_image_pixels_and_from_grid_inverts_placement():
    maps = torch.arange(2 * 10 * 13, dtype=torch.float64).reshape(2, 10, 13)
    grid = to_grid(maps, 4)
    assert grid.shape == (2, 3, 4)
    for gy in range(3):
        for gx in range(4):
            naive = maps[:, 4 * gy : 4 * gy + 4, 4 * gx : 4 * gx + 4].mean((1, 2))
            torch.testing.assert_close(grid[:, gy, gx], naive)
    const = torch.full((1, 3, 4), 2.5, dtype=torch.float64)
    back = from_grid(const, (10, 13), 4)
    assert back.shape == (1, 10, 13) and torch.allclose(back, torch.full_like(back, 2.5))


def test_seed_and_cam_scores():
    seeds = np.array([[0, 255, 2], [2, 255, 0]], np.uint8)
    scores, ids = seed_scores(seeds)
    assert ids.tolist() == [0, 2]
    np.testing.assert_array_equal(scores[0], [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(scores[1], [[0, 0, 1], [1, 0, 0]])
    probs = np.array([[[0.9, 0.1]], [[0.2, 0.5]], [[0.4, 1.0]]], np.float16)
    scores = with_background(probs[1:].astype(np.float32), alpha=2.0)  # the random walk's CAM source
    np.testing.assert_allclose(scores[0], [[0.6**2, 0.0]], rtol=1e-3)
    np.testing.assert_allclose(scores[1:], probs[1:].astype(np.float32))


def test_propagation_stays_inside_connected_components():
    """A 1x4 grid (8x32 image) with edges 0-1 and 2-3 only: the unknown cells 1 and 2 take
    the label of the seed in their own component."""
    edge_index = np.array([[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 1, 0, 3, 2]], np.int32)
    graph = {
        "edge_index": edge_index,
        "weight": np.array([1, 1, 1, 1, 0.9, 0.9, 0.8, 0.8], np.float16),
        "grid": np.array([1, 4], np.int32),
    }
    seeds = np.full((8, 32), 255, np.uint8)
    seeds[:, :8] = 1
    seeds[:, 24:] = 0
    scores, ids = seed_scores(seeds)
    probs = propagate(graph, scores, beta=2.0, logt=4)
    assert probs.shape == (2, 8, 32)
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-6)
    labels = ids[probs.argmax(0)]
    assert (labels[:, 8:12] == 1).all() and (labels[:, 20:24] == 0).all()
    assert probs[1, 4, 11] > 0.9 and probs[0, 4, 20] > 0.9


def test_keep_seeds_restores_the_seeds_the_walk_changed():
    """All cells linked with equal weight: the walk averages the labels everywhere, so the
    seeds themselves come out mixed; ``keep_known`` puts them back and leaves the unknown."""
    n = 4
    src, dst = np.meshgrid(np.arange(n), np.arange(n))
    graph = {
        "edge_index": np.stack([src.ravel(), dst.ravel()]).astype(np.int32),
        "weight": np.ones(n * n, np.float16),
        "grid": np.array([1, n], np.int32),
    }
    seeds = np.full((8, 32), 255, np.uint8)
    seeds[:, :8], seeds[:, 24:] = 1, 0
    scores, ids = seed_scores(seeds)
    walked = propagate(graph, scores, beta=1.0, logt=2)
    assert abs(walked[1, 4, 2] - 0.5) < 0.05  # the seed of class 1 is now a coin flip
    kept = keep_known(walked, scores)
    np.testing.assert_array_equal(kept[:, :, :8], scores[:, :, :8])
    np.testing.assert_array_equal(kept[:, :, 24:], scores[:, :, 24:])
    np.testing.assert_array_equal(kept[:, :, 8:24], walked[:, :, 8:24])
    assert kept.dtype == walked.dtype


def test_image_graph_features_stored_or_recomputed_agree():
    torch.manual_seed(0)
    model = AffinityNet(18).eval()
    image = (np.random.default_rng(0).random((45, 60, 3)) * 255).astype(np.uint8)
    offsets = window_offsets(3)
    g = image_graph(model, offsets, image, 1e-3, "cpu", store_features=True)
    assert g["grid"].tolist() == [6, 8]  # ceil(45 / 8), ceil(60 / 8)
    assert g["edge_index"].dtype == np.int32 and g["weight"].dtype == np.float16
    with torch.no_grad():
        f_a, _ = model(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    ei, w = grid_edges(f_a[0], offsets, 1e-3)
    np.testing.assert_array_equal(g["edge_index"], ei.numpy())
    np.testing.assert_allclose(g["weight"].astype(np.float32), w.numpy(), rtol=1e-3)
    stored = node_features_of(g, None, image, "cpu")
    without = {k: v for k, v in g.items() if k != "features"}
    recomputed = node_features_of(without, model, image, "cpu")
    assert stored.shape == (48, model.node_channels)
    torch.testing.assert_close(stored, recomputed, rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="no stored node features"):
        node_features_of(without, None, image, "cpu")


def test_edge_heatmap_colours_the_neighbours_of_the_chosen_pixel():
    from pipeline.visualize import edge_heatmap

    image = np.full((16, 24, 3), 200, np.uint8)
    # grid 2x3; node 0 has edges from itself (1.0) and node 1 (0.5); node 4 links to node 5 only
    graph = {
        "edge_index": np.array([[0, 1, 5], [0, 0, 4]], np.int32),
        "weight": np.array([1.0, 0.5, 0.9], np.float16),
        "grid": np.array([2, 3], np.int32),
    }
    heat = edge_heatmap(image, graph, (3, 4))
    dimmed = np.full(3, round(0.35 * 200))
    assert heat.shape == image.shape
    assert not np.array_equal(heat[4, 12], dimmed) and not np.array_equal(heat[4, 3], dimmed)  # nodes 1, 0
    np.testing.assert_array_equal(heat[12, 20], dimmed)  # node 5: no edge into node 0
    np.testing.assert_array_equal(heat[4, 20], dimmed)  # node 2
    assert not np.array_equal(heat[4, 12], heat[4, 3])  # weight 0.5 vs 1.0: different colours


def test_tag_supervision_walks_the_cams_and_a2gnn_fuses_the_walk(tmp_path):
    from pipeline.runner import make_run, run_local
    from stages.crf import inputs as crf_inputs

    from .conftest import demo_config

    run = make_run(demo_config(tmp_path, labels="tags", random_walk__logt=3))
    assert run.upstream["random_walk"] == ["graph", "cam"] and crf_inputs(run.config) == ["a2gnn"]
    assert "random_walk" in run.upstream["a2gnn"]
    out = run_local(run, run.names)
    assert all(m["counts"]["failed"] == 0 for m in out.values())
    walk = run.store("random_walk")
    some = sorted(walk.done_ids())[0]
    probs, ids = walk.read_soft(some)
    cam_ids = run.store("cam").read_soft(some)[1]
    np.testing.assert_array_equal(ids, cam_ids)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert out["crf"]["info"]["input"] == "a2gnn" and out["a2gnn"]["info"]["fused_random_walk"]
    fused, fused_ids = run.store("a2gnn").read_soft(some)
    np.testing.assert_array_equal(fused_ids, cam_ids)  # [0] + tags on both sides
    np.testing.assert_allclose(fused.astype(np.float32).sum(0), 1.0, atol=5e-3)
    # boxes propagate the seeds instead; A²GNN does not fuse the walk, the CRF refines A²GNN
    box = make_run(demo_config(tmp_path / "box"))
    assert box.upstream["random_walk"] == ["graph", "seeds"] and box.upstream["crf"] == ["a2gnn"]
    assert "random_walk" not in box.upstream["a2gnn"]


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_sample_grid_equals_the_upsampled_map_at_those_pixels(stride):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    size = (5 * stride - 1, 6 * stride - 2)
    up = from_grid(maps, size, stride)
    ys = torch.tensor([0, 1, size[0] - 1, size[0] // 2, 3])
    xs = torch.tensor([0, size[1] - 1, size[1] - 1, 2, size[1] // 3])
    torch.testing.assert_close(sample_grid(maps, ys, xs, stride), up[:, ys, xs].t())
    grad_a = torch.autograd.grad(sample_grid(maps, ys, xs, stride).sum(), maps)[0]
    grad_b = torch.autograd.grad(from_grid(maps, size, stride)[:, ys, xs].sum(), maps)[0]
    torch.testing.assert_close(grad_a, grad_b)
    batch = from_grid(maps.detach()[None].expand(2, -1, -1, -1), size, stride)
    torch.testing.assert_close(batch[1], up.detach())


def test_pair_confusion_matches_a_naive_count():
    """Every window pair counted by hand from a dense affinity table."""
    rng = np.random.default_rng(3)
    h, w = 5, 6
    offsets = window_offsets(2)
    f_a = torch.from_numpy(rng.random((4, h, w)).astype(np.float32)) * 3
    edge_index, weight = grid_edges(f_a, offsets, threshold=0.2)
    cells = torch.from_numpy(rng.integers(0, 3, (h, w)))
    cells[0, 0] = IGNORE
    involved = torch.from_numpy(rng.random((h, w)) < 0.3)
    got = pair_confusion(edge_index, weight, (h, w), offsets, cells, involved, threshold=0.5)
    dense = {(int(a), int(b)): float(v) for a, b, v in zip(*edge_index, weight)}
    want = np.zeros((2, 2), np.int64)
    for y in range(h):
        for x in range(w):
            for dy, dx in offsets:
                ty, tx = y + dy, x + dx
                if not (0 <= ty < h and 0 <= tx < w) or IGNORE in (int(cells[y, x]), int(cells[ty, tx])):
                    continue
                if not (involved[y, x] or involved[ty, tx]):
                    continue
                high = dense.get((y * w + x, ty * w + tx), 0.0) > 0.5
                want[int(cells[y, x] != cells[ty, tx]), int(not high)] += 1
    np.testing.assert_array_equal(got.numpy(), want)
    assert want.sum() > 20 and want[0, 0] > 0 and want[1, 1] > 0


def test_cell_labels_need_a_pure_cell():
    labels = torch.zeros(8, 16, dtype=torch.long)
    labels[:, 8:13] = 1  # the right cell is 5/8 class 1
    labels[0, 0] = IGNORE
    assert cell_labels(labels, 2, stride=8, purity=0.75).tolist() == [[0, IGNORE]]
    assert cell_labels(labels, 2, stride=8, purity=0.5).tolist() == [[0, 1]]

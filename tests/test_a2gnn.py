"""A²GNN layer (Eq. 3.18) on every path against a naive per-node loop; losses against
double-loop references and hand-made cases."""

import math

import pytest
import torch

from models.a2gnn import A2GNN, AffinityAttention, DenseGraph, GridGraph
from models.affinity import gaussian_kernel, window_offsets
from models.boxes import restrict_to_boxes
from models.graph import from_grid, grid_edges
from models.losses import (
    a2gnn_objective,
    consistency_check,
    mp_loss,
    mp_nodes,
    potts_loss,
    prototype_similarity,
    seed_ce,
)


def _graph(h=5, w=7, radius=2, threshold=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(3, h, w, generator=g, dtype=torch.float64) * 4
    edge_index, weight = grid_edges(f, window_offsets(radius), threshold)
    return edge_index, weight


def _naive_layer(x, edge_index, weight, w_l, beta, negative):
    n = x.shape[0]
    out = []
    for i in range(n):
        js = [(int(j), float(e)) for j, t, e in zip(edge_index[0], edge_index[1], weight) if int(t) == i]
        scores, rows = [], []
        for j, e in js:
            cos = torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm())
            if negative == "drop":
                if cos < 0:
                    continue
                scores.append(w_l * cos + beta * e)
            else:
                scores.append(w_l * cos + beta * (1.0 if cos > 0 else 0.0) * e)
            rows.append(x[j])
        p = torch.softmax(torch.stack(scores), 0)
        out.append(sum(pk * row for pk, row in zip(p, rows)))
    return torch.stack(out)


@pytest.mark.parametrize("negative", ["drop", "keep"])
@pytest.mark.parametrize("tile", [2, 3, 8])
def test_attention_paths_match_a_naive_loop_in_value_and_gradient(negative, tile):
    torch.manual_seed(0)
    edge_index, weight = _graph()
    n = 35
    layer = AffinityAttention(beta=10.0 if negative == "drop" else 2.0, negative=negative).double()
    x0 = torch.randn(n, 6, dtype=torch.float64)  # mixed signs: some cosines are negative
    grid = GridGraph.from_edges(edge_index, weight, (5, 7), tile)
    dense = DenseGraph.from_edges(edge_index, weight, n)
    paths = {
        "naive": lambda x: _naive_layer(x, edge_index, weight, layer.w, layer.beta, negative),
        "pyg": lambda x: layer(x, edge_index, weight),
        "tiles": lambda x: layer(x, grid),
        "dense": lambda x: layer(x, dense),
    }
    target = torch.randn(n, 6, dtype=torch.float64)
    results = {}
    for name, fn in paths.items():
        x = x0.clone().requires_grad_(True)
        layer.zero_grad()
        out = fn(x)
        (out * target).sum().backward()
        results[name] = (out.detach(), x.grad.clone(), layer.w.grad.clone())
    ref = results.pop("naive")
    for name, (out, gx, gw) in results.items():
        torch.testing.assert_close(out, ref[0], msg=name)
        torch.testing.assert_close(gx, ref[1], msg=name)
        torch.testing.assert_close(gw, ref[2], msg=name)


def test_attention_masks_non_neighbours_and_negative_cosines():
    # three nodes on a line: 0-1 linked, 2 linked to nobody but itself
    edge_index = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 1, 0]])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    layer = AffinityAttention(beta=10.0).double()
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)  # cos(0, 1) < 0
    out = layer(x, edge_index, weight)
    torch.testing.assert_close(out, x)  # each node only keeps itself
    keep = AffinityAttention(beta=10.0, negative="keep").double()
    with torch.no_grad():
        keep.w.fill_(0.5)
    out = keep(x, edge_index, weight)
    cos01 = float(torch.nn.functional.cosine_similarity(x[0], x[1], 0))
    p = torch.softmax(torch.tensor([0.5 + 10.0, 0.5 * cos01]), 0)  # self: w + beta*1; neighbour: no edge term
    torch.testing.assert_close(out[0], p[0] * x[0] + p[1] * x[1])
    torch.testing.assert_close(out[2], x[2])


def test_a2gnn_model_runs_every_layer_kind_and_grid_equals_edges():
    torch.manual_seed(0)
    edge_index, weight = _graph()
    x = torch.rand(35, 12)
    grid = GridGraph.from_edges(edge_index, weight.float(), (5, 7), 4)
    model = A2GNN(12, 3, hidden=16).eval()
    a, fa = model(x, edge_index, weight.float())
    b, fb = model(x, grid)
    torch.testing.assert_close(a, b)
    assert a.shape == (35, 3) and fa.shape == (35, 16)
    for kind in ("gcn", "gat", "agnn"):
        logits, _ = A2GNN(12, 3, hidden=16, layer=kind)(x, edge_index, weight.float())
        assert logits.shape == (35, 3) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="unknown A2GNN layer"):
        A2GNN(12, 3, layer="gin")


def test_stacked_models_equal_the_models_run_alone():
    graphs = [_graph(seed=s) for s in (0, 1)]
    xs = [torch.rand(35, 12, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (2, 3)]
    noise = torch.rand(2, 35, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    target = torch.randn(2, 35, 3, dtype=torch.float64)
    alone = []
    for m in range(2):
        model = A2GNN(12, 3, hidden=16).double()
        model.reset_parameters([torch.Generator().manual_seed(10 + m)])
        grid = GridGraph.from_edges(*graphs[m], (5, 7), 4, radius=2)
        logits, feats = model(xs[m], grid, noise=noise[m])
        (logits * target[m]).sum().backward()
        alone.append((logits.detach(), feats.detach(), model.embed.grad[0], model.props[0].w.grad[0]))
    stacked = A2GNN(12, 3, hidden=16, models=2).double()
    stacked.reset_parameters([torch.Generator().manual_seed(10 + m) for m in range(2)])
    grid = GridGraph.stack([GridGraph.from_edges(*g, (5, 7), 4, radius=2) for g in graphs])
    logits, feats = stacked(torch.stack(xs), grid, noise=noise)
    (logits * target).sum().backward()
    for m in range(2):
        torch.testing.assert_close(logits[m], alone[m][0])
        torch.testing.assert_close(feats[m], alone[m][1])
        torch.testing.assert_close(stacked.embed.grad[m], alone[m][2])
        torch.testing.assert_close(stacked.props[0].w.grad[m], alone[m][3])
    with pytest.raises(ValueError, match="same grid"):
        GridGraph.stack(
            [
                GridGraph.from_edges(*graphs[0], (5, 7), 4, radius=2),
                GridGraph.from_edges(*graphs[1], (5, 7), 4, radius=3),
            ]
        )


def test_seed_ce_averages_background_and_foreground_separately_per_image():
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 3.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    lsm = torch.log_softmax(logits, 1)[0, :, 0]
    expected = -lsm[0, 0] - lsm[1, 1]  # one bg pixel, one fg pixel, the third ignored
    torch.testing.assert_close(seed_ce(logits, labels), expected[None])
    only_bg = torch.tensor([[[0, 0, 255]]])
    torch.testing.assert_close(seed_ce(logits, only_bg), -(lsm[0, 0] + lsm[0, 1])[None] / 2)
    assert float(seed_ce(logits, torch.full((1, 1, 3), 255))) == 0.0
    # two images: each image's means are its own (not pooled over the batch)
    both = seed_ce(logits.expand(2, -1, -1, -1), torch.cat([labels, only_bg]))
    torch.testing.assert_close(both, torch.stack([expected, -(lsm[0, 0] + lsm[0, 1]) / 2]))


def test_potts_loss_matches_a_double_loop_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    image = torch.randn(1, 3, 4, 5, dtype=torch.float64) * 0.1
    offsets = window_offsets(2, "square")
    loss = potts_loss(torch.softmax(logits, 1), gaussian_kernel(image, offsets, 6.0, 0.1), offsets)
    ref_logits = logits.detach().clone().requires_grad_(True)
    p = torch.softmax(ref_logits, 1)[0]
    total = 0.0
    for y in range(4):
        for x in range(5):
            for v in range(4):
                for u in range(5):
                    if (v, u) == (y, x) or max(abs(v - y), abs(u - x)) > 2:
                        continue
                    k = math.exp(-((v - y) ** 2 + (u - x) ** 2) / 72) * torch.exp(
                        -((image[0, :, y, x] - image[0, :, v, u]) ** 2).sum() / 0.02
                    )
                    total = total + k * (1 - (p[:, y, x] * p[:, v, u]).sum())
    ref = total / 20
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_mp_nodes_on_a_hand_made_map():
    prob = torch.zeros(5, 7)
    prob[1, 2], prob[1, 5] = 0.9, 0.3  # row 1: max at x=2
    prob[2, 4] = 0.8  # row 2: max at x=4
    prob[3, 3] = 0.7  # row 3: max at x=3
    prob[0, 3] = 0.95  # outside the window (row 0): never chosen
    nodes = mp_nodes(prob, (1, 4, 2, 6)).tolist()  # rows 1..3, columns 2..5
    rows, cols = nodes[:3], nodes[3:]
    assert rows == [1 * 7 + 2, 2 * 7 + 4, 3 * 7 + 3]
    # columns 2..5: argmax rows 1, 3, 2, 1 (column 5: 0.3 at row 1 beats zeros)
    assert cols == [1 * 7 + 2, 3 * 7 + 3, 2 * 7 + 4, 1 * 7 + 5]


@pytest.mark.parametrize("stride", [1, 2])
def test_mp_loss_value_and_prototypes(stride):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)  # image resolution
    feats = torch.randn(4, 3, 4, dtype=torch.float64)  # grid (ceil(5/2), ceil(7/2)) at stride 2
    feats = feats if stride == 2 else torch.randn(4, 5, 7, dtype=torch.float64)
    up = from_grid(feats, (5, 7), stride)  # what the released code computes for every pixel
    boxes = [((1, 3, 2, 5), 2), ((0, 2, 0, 2), 1)]
    loss, protos = mp_loss(logits, feats, boxes, stride)
    probs = torch.softmax(logits.detach(), 0)
    ce, n, dis, m, ref_protos = 0.0, 0, 0.0, 0, []
    for window, cls in boxes:
        y0, y1, x0, x1 = window
        p = probs[cls]
        nodes = [(y, x0 + int(p[y, x0:x1].argmax())) for y in range(y0, y1)]
        nodes += [(y0 + int(p[y0:y1, x].argmax()), x) for x in range(x0, x1)]
        for y, x in nodes:
            ce = ce - torch.log_softmax(logits[:, y, x], 0)[cls]
        for yi, xi in nodes:
            for yj, xj in nodes:
                dis = dis + 1 - torch.nn.functional.cosine_similarity(up[:, yi, xi], up[:, yj, xj], 0)
        n, m = n + len(nodes), m + len(nodes) ** 2
        ref_protos.append(torch.stack([up[:, y, x] for y, x in nodes]).mean(0))
    torch.testing.assert_close(loss, ce / n + dis / m)
    for got, ref in zip(protos, ref_protos):
        torch.testing.assert_close(got, ref)
    assert float(mp_loss(logits, feats, [], stride)[0]) == 0.0


def test_consistency_check_unlabels_only_dissimilar_box_class_pixels():
    labels = torch.tensor([[0, 2, 2, 1], [0, 2, 2, 1], [0, 0, 2, 255]])
    similarity = torch.tensor([[-1.0, -0.5, 0.2, -1.0], [-1.0, 0.1, -0.1, -1.0], [-1.0, -1.0, -0.3, -1.0]])
    out = consistency_check(labels, similarity, (0, 3, 1, 3), cls=2)
    expected = torch.tensor(
        [
            [0, 255, 2, 1],  # (0,1): class 2, similarity < 0
            [0, 2, 255, 1],  # (1,2)
            [0, 0, 255, 255],
        ]
    )  # (2,1) is background: kept; column 0 and 3 outside the box
    torch.testing.assert_close(out, expected)
    assert labels[0, 1] == 2  # the input is not modified
    stricter = consistency_check(labels, similarity, (0, 3, 1, 3), cls=2, threshold=0.15)
    assert stricter[1, 1] == 255 and stricter[0, 2] == 2  # 0.1 < 0.15 <= 0.2


def test_centred_consistency_check_removes_a_seed_that_points_away_from_its_box_prototype():
    """Non-negative node features (as A²GNN's): the raw cosine is >= 0 everywhere, so the
    released check at 0 keeps every seed; centred on the image mean it removes the seed whose
    feature lies on the background side and keeps the ones like the prototype."""
    feats = torch.tensor(
        [
            [1.0, 0.0, 0.0, 1.0],  # channel 0: background-like
            [0.0, 1.0, 1.0, 0.1],
        ]
    )[:, None, :]  # (D=2, h=1, w=4)
    proto = torch.tensor([0.0, 1.0])  # the box's MP nodes are foreground-like
    labels = torch.tensor([[0, 1, 1, 1]])  # pixel 3: a class-1 seed whose feature is background-like
    raw = prototype_similarity(feats, proto, centred=False)[0]
    assert (raw >= 0).all()
    assert consistency_check(labels, raw[None], (0, 1, 0, 4), cls=1).tolist() == [[0, 1, 1, 1]]  # inert
    centred = prototype_similarity(feats, proto)[0]
    mu = feats.mean((1, 2))
    naive = [
        float(torch.dot(feats[:, 0, k] - mu, proto - mu) / ((feats[:, 0, k] - mu).norm() * (proto - mu).norm()))
        for k in range(4)
    ]
    torch.testing.assert_close(centred, torch.tensor(naive))
    assert centred[1] > 0.99 and centred[3] < 0
    assert consistency_check(labels, centred[None], (0, 1, 0, 4), cls=1).tolist() == [[0, 1, 1, 255]]


def test_a2gnn_objective_is_eq_3_20_summed_over_the_stacked_images():
    """L_G = L_ce + L_mp + lambda_1 L_reg per image, summed; the check (Eq. 3.27-3.28) runs on
    each box's MP prototypes before L_ce and the labels it returns are the checked ones."""
    g = torch.Generator().manual_seed(0)
    m, c, h, w, d = 2, 3, 3, 4, 5
    grid = torch.randn(m, c, h, w, generator=g, requires_grad=True)
    feats = torch.rand(m, d, h, w, generator=g) - 0.5
    up = from_grid(grid, (24, 32), 8)
    labels = torch.full((m, 24, 32), 255, dtype=torch.long)
    labels[:, 2:20, 3:12] = 1
    labels[:, 20:, :] = 0
    labels[1, 5:10, 20:30] = 2
    boxes = [[((0, 20, 0, 16), 1)], [((0, 20, 0, 16), 1), ((4, 12, 18, 32), 2)]]
    offsets = window_offsets(1, "square")
    kernel = torch.rand(m, len(offsets), h, w, generator=g)
    loss, checked = a2gnn_objective(up, grid, feats, labels.clone(), boxes, kernel, offsets, 0.3, (0.0, True), 8)
    expect, ref = torch.zeros(()), labels.clone()
    for i in range(m):
        mp, protos = mp_loss(up[i], feats[i], boxes[i], 8)
        expect = expect + mp
        for (window, cls), proto in zip(boxes[i], protos):
            cos = from_grid(prototype_similarity(feats[i], proto)[None], (24, 32), 8)[0]
            ref[i] = consistency_check(ref[i], cos, window, cls, 0.0)
    assert (ref != labels).any() and torch.equal(checked, ref)  # the check removed seeds
    expect = expect + seed_ce(up, ref).sum() + 0.3 * m * potts_loss(torch.softmax(grid, 1), kernel, offsets)
    torch.testing.assert_close(loss, expect)
    plain, same = a2gnn_objective(up, grid, None, labels.clone(), boxes, kernel, offsets, 0.0)
    assert torch.equal(same, labels)
    torch.testing.assert_close(plain, seed_ce(up, labels).sum())  # phase 1 without MP: L_ce alone


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_keep_seeds_sets_each_remaining_seed_to_its_one_hot(weight):
    from models.transductive import keep_seeds

    probs = torch.softmax(torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1)), 1)
    labels = torch.full((2, 4, 5), 255, dtype=torch.long)
    labels[0, 1, 2], labels[0, 3, 4], labels[1, 0, 0] = 2, 0, 1
    out = keep_seeds(probs, labels, weight)
    for m in range(2):
        for y in range(4):
            for x in range(5):
                p = probs[m, :, y, x]
                if labels[m, y, x] == 255:
                    torch.testing.assert_close(out[m, :, y, x], p)
                    continue
                torch.testing.assert_close(out[m, :, y, x], weight * torch.eye(3)[labels[m, y, x]] + (1 - weight) * p)
                assert out[m, :, y, x].argmax() == labels[m, y, x]  # w >= 0.5: the seed wins
    assert torch.allclose(out.sum(1), torch.ones(2, 4, 5))


def test_restrict_to_boxes_matches_a_naive_loop():
    probs = torch.softmax(torch.randn(4, 12, 15, generator=torch.Generator().manual_seed(0)), 0)
    boxes = [((2, 8, 3, 9), 1), ((5, 12, 10, 15), 1), ((0, 4, 0, 5), 2)]  # class 3: no box, not restricted
    out = restrict_to_boxes(probs, boxes)
    for y in range(12):
        for x in range(15):
            allowed = torch.tensor([1.0, 0.0, 0.0, 1.0])
            for (y0, y1, x0, x1), c in boxes:
                if y0 <= y < y1 and x0 <= x < x1:
                    allowed[c] = 1.0
            expected = probs[:, y, x] * allowed / (probs[:, y, x] * allowed).sum()
            assert torch.allclose(out[:, y, x], expected, atol=1e-6), (y, x)
    assert out[1, 0, 0] == 0 and out[2, 0, 0] > 0 and out[2, 11, 14] == 0 and out[1, 11, 14] > 0


def test_restrict_to_boxes_gives_background_where_only_excluded_classes_had_mass():
    probs = torch.zeros(3, 4, 4)
    probs[1] = 1.0  # all mass on class 1, whose only box is the top-left 2x2
    out = restrict_to_boxes(probs, [((0, 2, 0, 2), 1), ((2, 4, 2, 4), 2)])
    assert torch.equal(out[:, :2, :2], probs[:, :2, :2])
    assert torch.equal(out[0, 2:, :], torch.ones(2, 4)) and torch.equal(out[0, :, 2:], torch.ones(4, 2))
    assert out.sum(0).eq(1).all()

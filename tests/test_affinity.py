"""Affinity numerics (Eq. 3.6-3.13) against naive double loops on tiny grids."""

import math

import numpy as np
import pytest
import torch

from models.affinity import (
    AffinityNet,
    affinity_class_loss,
    affinity_reg_loss,
    gaussian_kernel,
    pair_affinity,
    pair_distance,
    pair_labels,
    window_offsets,
)


@pytest.mark.parametrize(
    "offsets",
    [window_offsets(2, "disk"), window_offsets(3, "square"), [(0, 1), (1, 0), (2, -1)], [(0, 1), (0, -1), (1, 1)]],
)
def test_pair_distance_backward_matches_autograd_of_the_plain_expression(offsets):
    """The hand-written backward (no per-offset copies kept) against autograd of
    ``mean_c |F(i) - F(i + o)|`` on shifted tensors, symmetric windows and lone offsets."""
    from models.affinity import shifted, valid_pairs

    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, len(offsets), 7, 9, dtype=torch.float64)
    got = pair_distance(x, offsets)
    (grad_got,) = torch.autograd.grad((got * g).sum(), x)
    ref = (x[:, None] - shifted(x, offsets)).abs().mean(2) * valid_pairs(7, 9, offsets)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), x)
    assert torch.allclose(got, ref, atol=1e-12) and torch.allclose(grad_got, grad_ref, atol=1e-12)
    # finite differences on a smaller grid (one evaluation per input: 630 inputs took ~5 s a case)
    small = x.detach()[:1, :3, :5, :6].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pair_distance(t, offsets), (small,))


def test_window_offsets():
    assert len(window_offsets(1, "square")) == 8 and len(window_offsets(1, "disk")) == 4
    disk = window_offsets(5)
    assert (0, 0) not in disk and all(dy * dy + dx * dx <= 25 for dy, dx in disk) and len(disk) == 80
    assert len(window_offsets(4, "square")) == 80
    with pytest.raises(ValueError):
        window_offsets(2, "hex")


def _naive_pairs(seeds, r, shape):
    """{(i, j): 'bg'|'fg'|'neg'} over pixel pairs within the window, i != j."""
    h, w = seeds.shape
    out = {}
    for y in range(h):
        for x in range(w):
            for v in range(h):
                for u in range(w):
                    dy, dx = v - y, u - x
                    if (dy, dx) == (0, 0):
                        continue
                    inside = dy * dy + dx * dx <= r * r if shape == "disk" else max(abs(dy), abs(dx)) <= r
                    if not inside or seeds[y, x] == 255 or seeds[v, u] == 255:
                        continue
                    if seeds[y, x] != seeds[v, u]:
                        out[(y, x, v, u)] = "neg"
                    else:
                        out[(y, x, v, u)] = "bg" if seeds[y, x] == 0 else "fg"
    return out


@pytest.mark.parametrize("shape", ["disk", "square"])
def test_pair_labels_match_a_double_loop(shape):
    rng = np.random.default_rng(0)
    seeds = rng.choice([0, 1, 2, 255], size=(5, 6), p=[0.4, 0.25, 0.15, 0.2]).astype(np.uint8)
    offsets = window_offsets(2, shape)
    pairs = pair_labels(torch.from_numpy(seeds)[None], offsets)
    naive = _naive_pairs(seeds, 2, shape)
    got = {}
    for name, key in (("bg_pos", "bg"), ("fg_pos", "fg"), ("neg", "neg")):
        for k, y, x in zip(*np.nonzero(pairs[name][0].numpy())):
            dy, dx = offsets[k]
            assert (y, x, y + dy, x + dx) not in got
            got[(y, x, y + dy, x + dx)] = key
    assert got == naive


def _naive_losses(feat, image, seeds, r, sxy, srgb):
    c, h, w = feat.shape
    bg, fg, neg, reg, pairs = [], [], [], 0.0, h * w  # the released code counts each pixel's self-pair
    labels = _naive_pairs(seeds, r, "disk")
    for y in range(h):
        for x in range(w):
            for v in range(h):
                for u in range(w):
                    dy, dx = v - y, u - x
                    if (dy, dx) == (0, 0) or dy * dy + dx * dx > r * r:
                        continue
                    dist = (feat[:, y, x] - feat[:, v, u]).abs().mean()
                    aff = torch.exp(-dist)
                    g = math.exp(-(dy * dy + dx * dx) / (2 * sxy**2)) * torch.exp(
                        -((image[:, y, x] - image[:, v, u]) ** 2).sum() / (2 * srgb**2)
                    )
                    reg = reg + g * dist
                    pairs += 1
                    kind = labels.get((y, x, v, u))
                    if kind == "bg":
                        bg.append(-torch.log(aff + 1e-5))
                    elif kind == "fg":
                        fg.append(-torch.log(aff + 1e-5))
                    elif kind == "neg":
                        neg.append(-torch.log(1 + 1e-5 - aff))
    mean = lambda xs: torch.stack(xs).sum() / (len(xs) + 1e-5)  # noqa: E731
    return mean(bg) / 4 + mean(fg) / 4 + mean(neg) / 2, reg / pairs


def test_losses_and_gradients_match_a_double_loop():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    seeds = rng.choice([0, 1, 255], size=(4, 5), p=[0.45, 0.35, 0.2]).astype(np.uint8)
    feat_a = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    feat_b = feat_a.detach().clone().requires_grad_(True)
    image = torch.randn(3, 4, 5, dtype=torch.float64) * 0.2
    offsets = window_offsets(2)
    aff = pair_affinity(feat_a[None], offsets)
    l_ac = affinity_class_loss(aff, pair_labels(torch.from_numpy(seeds)[None], offsets))["loss"]
    l_ar = affinity_reg_loss(
        pair_distance(feat_a[None], offsets), gaussian_kernel(image[None], offsets, 6.0, 0.1), offsets
    )
    ref_ac, ref_ar = _naive_losses(feat_b, image, seeds, 2, 6.0, 0.1)
    torch.testing.assert_close(l_ac, ref_ac)
    torch.testing.assert_close(l_ar, ref_ar)
    (l_ac + 3 * l_ar).backward()
    (ref_ac + 3 * ref_ar).backward()
    torch.testing.assert_close(feat_a.grad, feat_b.grad)


def test_affinity_is_one_for_equal_features_and_zero_outside():
    feat = torch.ones(1, 4, 3, 3)
    offsets = window_offsets(1, "square")
    aff = pair_affinity(feat, offsets)
    k_left = offsets.index((0, -1))
    assert aff[0, k_left, 1, 1] == 1.0
    # at the left border the left neighbour is outside: its pair is never labeled or weighted
    pairs = pair_labels(torch.zeros(1, 3, 3, dtype=torch.uint8), offsets)
    assert not pairs["bg_pos"][0, k_left, :, 0].any() and pairs["bg_pos"][0, k_left, :, 1:].all()
    assert (gaussian_kernel(torch.zeros(1, 3, 3, 3), offsets, 6.0, 0.1)[0, k_left, :, 0] == 0).all()


def test_affinity_net_shapes():
    net = AffinityNet(depth=18).eval()
    with torch.no_grad():
        f_a, nodes = net(torch.rand(1, 3, 64, 80) * 255)
    assert f_a.shape == (1, 448, 8, 10) and nodes.shape == (1, net.node_channels, 8, 10)
    assert net.node_channels == 128 + 256 + 512


def test_affinity_training_fits_one_image_and_skips_padding():
    from models.affinity import affinity_objective

    torch.manual_seed(0)
    net = AffinityNet(depth=18).train()
    image = torch.zeros(1, 3, 64, 64)
    image[:, 0, :, 32:] = 255  # left half dark, right half red
    seeds = torch.full((1, 8, 8), 255, dtype=torch.uint8)
    seeds[:, :, :3] = 0
    seeds[:, :, 5:] = 1
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    offsets = window_offsets(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(15):
        out = affinity_objective(net, image, seeds, valid, offsets, 6.0, 0.1, 3.0)
        first = first or float(out["class"].detach())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["class"].detach()) < 0.5 * first
    # with every pixel marked as padding, neither term sees a pair
    none = affinity_objective(net, image, torch.full_like(seeds, 255), torch.zeros_like(valid), offsets, 6.0, 0.1, 3.0)
    assert float(none["loss"].detach()) == 0.0


def test_reg_loss_leaves_out_padding_pairs_from_sum_and_count():
    torch.manual_seed(1)
    feat = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    image = torch.randn(1, 3, 4, 5, dtype=torch.float64) * 0.1
    valid = torch.ones(1, 4, 5, dtype=torch.bool)
    valid[:, :, 3:] = False  # the last two columns are crop padding
    offsets = window_offsets(2)
    got = affinity_reg_loss(pair_distance(feat, offsets), gaussian_kernel(image, offsets, 6.0, 0.1), offsets, valid)
    total, count = 0.0, 0
    for y in range(4):
        for x in range(3):
            count += 1  # the self-pair
            for dy, dx in offsets:
                v, u = y + dy, x + dx
                if 0 <= v < 4 and 0 <= u < 3:
                    d = (feat[0, :, y, x] - feat[0, :, v, u]).abs().mean()
                    g = math.exp(-(dy * dy + dx * dx) / 72) * torch.exp(
                        -((image[0, :, y, x] - image[0, :, v, u]) ** 2).sum() / 0.02
                    )
                    total, count = total + g * d, count + 1
    torch.testing.assert_close(got, total / count)

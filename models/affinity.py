"""Affinity CNN and its losses (thesis Sect. 3.3.3, Eq. 3.6-3.13).

Pairs live on the stride-8 feature grid. The neighbourhood of pixel i is a fixed set of
offsets o = (dy, dx), o != 0: ``disk`` = ``dy^2 + dx^2 <= r^2`` (thesis Eq. 3.7 / 3.11) or
``square`` = ``max(|dy|, |dx|) <= r`` (the released code's ``F.unfold`` window). Every
pairwise quantity is a dense tensor (N, K, H, W) over the K offsets, with a validity mask
for neighbours that fall outside the image: no N x N matrix is ever built.

::

    D(i, j)   = exp(-|F_A(i) - F_A(j)|_1 / d_A)                              (Eq. 3.8)
    L_A(i, j) = 1 if M(i) = M(j), 0 if M(i) != M(j), ignored if either is 255 (Eq. 3.6)
    L_Ac      = bg+/4 + fg+/4 + neg/2, each the mean of its own pairs        (Eq. 3.10)
                bg+: -log D over positive pairs whose centre is background,
                fg+: the same for foreground centres, neg: -log(1 - D)
    L_Ar      = 1/|P| sum_i sum_{j in R(i)} G(i, j) |F_A(i) - F_A(j)|_1 / d_A   (Eq. 3.12)
                |P|: the number of pairs (i, j), j in R(i) or j = i, as the released code
    G(i, j)   = exp(-|p_i - p_j|^2 / 2 s_xy^2 - |c_i - c_j|^2 / 2 s_rgb^2)   (Eq. 3.13)

The printed Eq. 3.13 has unsquared norms; the Gaussian bandwidth filter it cites (and the
released gated-CRF code) squares them, which is what is implemented. ``1e-5`` inside the
logarithms is the released code's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ResNetBackbone, normalize
from .types import IGNORE

EPS = 1e-5

STRIDE = 8
"""Output stride of the affinity net: graph nodes, the random walk and A²GNN live on this grid."""


def window_offsets(radius: int, shape: str = "disk") -> list[tuple[int, int]]:
    """The (dy, dx) offsets of a pixel's neighbours, raster order, without (0, 0): the pair
    windows of Eq. 3.7 / 3.11 (``disk``) and DFR Eq. 3 / 8 (``square``)."""
    if shape not in ("disk", "square"):
        raise ValueError(f"neighbourhood must be 'disk' or 'square', got {shape!r}")
    out = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if (dy, dx) == (0, 0):
                continue
            if shape == "disk" and dy * dy + dx * dx > radius * radius:
                continue
            out.append((dy, dx))
    return out


def shifted(x: torch.Tensor, offsets: Sequence[tuple[int, int]], fill: float = 0.0) -> torch.Tensor:
    """(N, C, H, W) -> (N, K, C, H, W): ``out[:, k, :, y, x] = x[:, :, y+dy_k, x+dx_k]``
    (``fill`` outside the image)."""
    n, c, h, w = x.shape
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, (r, r, r, r), value=fill)
    return torch.stack([padded[:, :, r + dy : r + dy + h, r + dx : r + dx + w] for dy, dx in offsets], 1)


def valid_pairs(h: int, w: int, offsets: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
    """(K, H, W) bool: the neighbour at offset k lies inside the image."""
    ones = torch.ones(1, 1, h, w, device=device)
    return shifted(ones, offsets)[0, :, 0] > 0


def pair_reduce(
    x: torch.Tensor, offsets: Sequence[tuple[int, int]], fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """(N, K, H, W): ``fn(x, x shifted by o_k)`` for every offset, ``fn`` a *symmetric*
    reduction of the channel axis of two (N, C, H, W) tensors to (N, H, W); 0 where the
    neighbour is out of the image. One offset at a time, so wide features never need the
    (N, K, C, H, W) stack; and ``fn`` runs once per pair {o, -o}: the map of -o is the map
    of o moved by -o (``f(x_p, x_{p-o}) = f(x_q, x_{q+o})``, q = p - o), bit for bit."""
    n, c, h, w = x.shape
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, (r, r, r, r))
    maps: dict[tuple[int, int], torch.Tensor] = {}
    for dy, dx in offsets:
        if (-dy, -dx) in maps:
            moved = F.pad(maps[(-dy, -dx)], (r, r, r, r))
            maps[(dy, dx)] = moved[:, r + dy : r + dy + h, r + dx : r + dx + w]
        else:
            maps[(dy, dx)] = fn(x, padded[:, :, r + dy : r + dy + h, r + dx : r + dx + w])
    return torch.stack([maps[o] for o in offsets], 1) * valid_pairs(h, w, offsets, x.device)


def _mean_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean(1)


class _PairDistance(torch.autograd.Function):
    """``pair_reduce(x, offsets, mean_c |a - b|)`` with a hand-written backward.

    Autograd would keep one (N, C, H, W) difference per offset pair for ``abs``' backward:
    K/2 copies of the features (8 GB for the DFR paper's batch 16, crop 512, d 128, r 5).
    Here only ``x`` is kept and ``sign(x_i - x_j)`` is recomputed per pair {o, -o}:
    ``dL/dx_i += g / C * sign(x_i - x_j)``, ``dL/dx_j -= g / C * sign(x_i - x_j)`` with
    ``g(i) = G_o(i) + G_-o(i + o)`` (the -o map is the o map moved, see :func:`pair_reduce`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, offsets: tuple[tuple[int, int], ...]) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.offsets = offsets
        return pair_reduce(x, offsets, _mean_l1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        offsets = ctx.offsets
        n, c, h, w = x.shape
        r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
        grad = grad * valid_pairs(h, w, offsets, x.device)
        index = {o: k for k, o in enumerate(offsets)}
        padded = F.pad(x, (r, r, r, r))
        centre = torch.zeros_like(x)  # dL/dx as the first of a pair
        acc = torch.zeros_like(padded)  # dL/dx as the second, on the padded grid
        for (dy, dx), k in index.items():
            if (-dy, -dx) in index and index[(-dy, -dx)] < k:
                continue  # folded into its partner's pass
            g = grad[:, k]
            if (-dy, -dx) in index:
                g = g + F.pad(grad[:, index[(-dy, -dx)]], (r, r, r, r))[:, r + dy : r + dy + h, r + dx : r + dx + w]
            rows, cols = slice(r + dy, r + dy + h), slice(r + dx, r + dx + w)
            step = torch.sign(x - padded[:, :, rows, cols]).mul_((g / c)[:, None])
            centre += step
            acc[:, :, rows, cols] -= step
        return centre + acc[:, :, r : r + h, r : r + w], None


def pair_distance(features: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(N, K, H, W): mean over channels of |F(i) - F(i + o_k)| (0 where out of the image).
    Differentiable in ``features`` without keeping a per-offset copy of them (:class:`_PairDistance`)."""
    return _PairDistance.apply(features, tuple(offsets))


def pair_affinity(features: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """D(i, j) = exp(-mean_c |F(i) - F(j)|) for every pixel and offset (Eq. 3.8)."""
    return torch.exp(-pair_distance(features, offsets))


def pair_labels(seeds: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Masks (N, K, H, W) of the pair sets of Eq. 3.6-3.7 (DFR Eq. 8-9) from (N, H, W) seed labels.

    ``bg_pos``: both known, equal, centre background; ``fg_pos``: both known, equal,
    centre foreground; ``neg``: both known, different.
    """
    lab = seeds.long()[:, None]
    nb = shifted(lab.float(), offsets, fill=IGNORE)[:, :, 0].long()
    centre = lab.expand_as(nb)
    known = (centre != IGNORE) & (nb != IGNORE)
    same = known & (nb == centre)
    return {"bg_pos": same & (centre == 0), "fg_pos": same & (centre != 0), "neg": known & (nb != centre)}


def affinity_class_loss(
    aff: torch.Tensor, pairs: dict[str, torch.Tensor], weights: tuple[float, float, float] = (0.25, 0.25, 0.5)
) -> dict[str, torch.Tensor]:
    """L_Ac = bg/4 + fg/4 + neg/2 (Eq. 3.10 as the released code weights it); DFR's L_fd
    (DFR Eq. 11) is the same sum with ``weights`` (1, 1, 2). A set with no pairs gives 0."""

    def mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (values * mask).sum() / (mask.sum() + EPS)

    bg = mean(-torch.log(aff + EPS), pairs["bg_pos"])
    fg = mean(-torch.log(aff + EPS), pairs["fg_pos"])
    neg = mean(-torch.log(1.0 + EPS - aff), pairs["neg"])
    w_bg, w_fg, w_neg = weights
    return {"loss": w_bg * bg + w_fg * fg + w_neg * neg, "bg": bg, "fg": fg, "neg": neg}


def gaussian_kernel(
    image: torch.Tensor, offsets: Sequence[tuple[int, int]], sigma_xy: float, sigma_rgb: float
) -> torch.Tensor:
    """G(i, j) of Eq. 3.13 (N, K, H, W) for an (N, 3, H, W) colour image; 0 outside."""
    d_xy = torch.tensor([dy * dy + dx * dx for dy, dx in offsets], dtype=image.dtype, device=image.device)
    d_rgb = ((image[:, None] - shifted(image, offsets)) ** 2).sum(2)
    k = torch.exp(-d_xy.view(1, -1, 1, 1) / (2 * sigma_xy**2) - d_rgb / (2 * sigma_rgb**2))
    return k * valid_pairs(*image.shape[-2:], offsets, image.device)


def image_kernel(
    images: torch.Tensor, size: tuple[int, int], offsets: Sequence[tuple[int, int]], sigma_xy: float, sigma_rgb: float
) -> torch.Tensor:
    """G(i, j) of Eq. 3.13 (= K_f of DFR Eq. 13, the position and colour factors of DFR Eq. 6)
    on a feature grid of ``size``: the ImageNet-normalised (N, 3, H, W)
    0..255 images resized bilinearly to the grid (as the released code), positions in grid
    cells."""
    rgb = F.interpolate(normalize(images), size=size, mode="bilinear", align_corners=False)
    return gaussian_kernel(rgb, offsets, sigma_xy, sigma_rgb)


def affinity_reg_loss(
    distance: torch.Tensor, kernel: torch.Tensor, offsets: Sequence[tuple[int, int]], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """L_Ar (Eq. 3.12): the kernel-weighted L1 feature distance over every pair in the window,
    divided by the number of pairs (the released code's gated-CRF normalisation, which also
    counts each pixel's pair with itself; its weight 3 is tuned for that scale).

    ``valid`` (N, H, W) marks real pixels (not crop padding): pairs touching padding are
    left out of the sum and of the count.
    """
    n, _, h, w = distance.shape
    centres = (
        torch.ones(n, 1, h, w, dtype=distance.dtype, device=distance.device)
        if valid is None
        else valid.to(distance.dtype)[:, None]
    )
    pairs = centres * shifted(centres, offsets)[:, :, 0]
    return (kernel * pairs * distance).sum() / (pairs.sum() + centres.sum()).clamp_min(1.0)


class AffinityNet(nn.Module):
    """Dilated ResNet (output stride 8); the last three stages -> 1x1 reduce convs to
    64/128/256 channels (ELU) -> concat -> 1x1 conv to 448 (ELU) = F_A.

    ``forward`` returns ``(F_A, node features)``; node features are the raw concatenation
    of the last three stages' outputs (the graph's X before Eq. 3.15).
    """

    def __init__(self, depth: int = 50, weights: str = "none") -> None:
        super().__init__()
        self.backbone = ResNetBackbone(depth, 8, weights)
        c2, c3, c4 = self.backbone.channels[1:]
        self.reduce = nn.ModuleList([nn.Conv2d(c, o, 1, bias=False) for c, o in ((c2, 64), (c3, 128), (c4, 256))])
        self.fuse = nn.Conv2d(448, 448, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in self.reduce:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)

    @property
    def node_channels(self) -> int:
        return sum(self.backbone.channels[1:])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, f2, f3, f4 = self.backbone(normalize(images))
        reduced = [F.elu(conv(f)) for conv, f in zip(self.reduce, (f2, f3, f4))]
        return F.elu(self.fuse(torch.cat(reduced, 1))), torch.cat([f2, f3, f4], 1)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, new layers): the new layers get the larger learning rate."""
        new = [*self.reduce.parameters(), *self.fuse.parameters()]
        return [p for p in self.backbone.parameters() if p.requires_grad], new


def affinity_objective(
    model: AffinityNet,
    images: torch.Tensor,
    seeds: torch.Tensor,
    valid: torch.Tensor,
    offsets: list[tuple[int, int]],
    sigma_xy: float,
    sigma_rgb: float,
    reg_weight: float,
) -> dict[str, torch.Tensor]:
    """Eq. 3.9, ``L_Aff = L_Ac + lambda L_Ar`` (``reg_weight`` = lambda), for a batch: images
    (N, 3, H, W) 0..255; seeds and valid (N, h, w) on the feature grid."""
    f_a, _ = model(images)
    if f_a.shape[-2:] != seeds.shape[-2:]:
        raise ValueError(f"feature grid {tuple(f_a.shape[-2:])} != seed grid {tuple(seeds.shape[-2:])}")
    dist = pair_distance(f_a, offsets)
    out = affinity_class_loss(torch.exp(-dist), pair_labels(seeds, offsets))
    kernel = image_kernel(images, f_a.shape[-2:], offsets, sigma_xy, sigma_rgb)
    out["reg"] = affinity_reg_loss(dist, kernel, offsets, valid)
    out["class"] = out["loss"]
    out["loss"] = out["class"] + reg_weight * out["reg"]
    return out

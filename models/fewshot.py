"""Few-shot segmentation with self-guided and cross-guided learning (SCL, thesis Ch. 5) on a
CANet-style base, and the prototype-only baseline.

::

    v_s   = sum_i F_s(i) [M_s(i) = 1] / sum_i [M_s(i) = 1]                       (Eq. 5.1)
    F_sv  = Concat([F_s, V_s, V_s])                                              (Eq. 5.2)
    P_s1  = softmax(D(FPM_s(F_sv))),  M^_s = argmax P_s1                         (Eq. 5.3-5.4)
    v_pri = masked GAP of F_s over [M_s = 1][M^_s = 1]                           (Eq. 5.5)
    v_aux = masked GAP of F_s over [M_s = 1][M^_s != 1]                          (Eq. 5.6)
    P_s2  = softmax(D(FPM_s(Concat([F_s, V_pri, V_aux]))))                       (Eq. 5.8-5.9)
    P_q   = softmax(D(FPM_q(Concat([F_q, V_pri, V_aux]))))                       (Eq. 5.11-5.12)
    L     = CE(P_s1, M_s) + CE(P_s2, M_s) + CE(P_q, M_q)          (Eq. 5.7 / 5.10 / 5.13, Eq. 5.14)
    Y_q   = minmax_q max_{j} cos(H_q(q), H_s(j) m_s(j))                         (PFENet's prior mask)
    U^k   = 1/K sum_i IoU(argmax G(I_s^i | I_s^k), M_s^i)                        (Eq. 5.15-5.16)
    P^_q  = softmax(1/K sum_k U^k G(I_q | I_s^k))                                (Eq. 5.17)

The masks are taken to the feature grid by nearest sampling; an empty mask gives the zero
vector (the thesis is silent; v_aux is empty whenever the support is predicted perfectly).
The CE terms are means over the pixels of the masks' resolution (logits upsampled bilinearly).
G(.|.) in Eq. 5.15-5.17 is the 1-shot model's query logits.

The PFENet-style base (``prior=True``; the thesis' "SCL (PFENet)", Fig. 5.5) adds PFENet's
training-free prior Y_q as one more channel of the query FPM only (the thesis: never in the
support FPM): H are the backbone's last-stage features, taken without gradient (PFENet's frozen
ImageNet backbone gives none), m_s the support's foreground resized bilinearly, the max over
every support position (background ones are zero vectors, cosine 0), then min-max normalised
over the query's positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ResNetBackbone, normalize


def mask_to(mask: torch.Tensor, size: tuple[int, int], value: int = 1) -> torch.Tensor:
    """(N, H, W) mask (0 background, 1 foreground, 255 ignored) -> (N, h, w) float, 1 where
    the nearest-sampled mask is ``value``."""
    return (F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0] == value).float()


def masked_gap(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 5.1: the mean of ``feat`` (N, C, h, w) over the pixels where ``mask`` (N, h, w) is 1;
    the zero vector where it has none. (N, C)."""
    m = mask.to(feat.dtype)[:, None]
    return (feat * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1.0)


def guided_vectors(feat: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5.5-5.6: (v_pri, v_aux) of support features (N, C, h, w), its mask M_s (N, h, w) and
    the predicted mask M^_s (N, h, w), both 0/1 on the feature grid."""
    fg = mask > 0.5
    hit = pred > 0.5
    return masked_gap(feat, fg & hit), masked_gap(feat, fg & ~hit)


def expand(v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C) -> (N, C, h, w): a vector repeated at every position (V_s of Eq. 5.2)."""
    return v[:, :, None, None].expand(-1, -1, *size)


def prior_mask(hq: torch.Tensor, hs: torch.Tensor, ms: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PFENet's prior Y_q (N, 1, h, w) of query features ``hq`` (N, C, h, w) from support features
    ``hs`` (N, C, h', w') and its mask ``ms`` (N, H, W) (1 = foreground):
    Y(q) = max_j <hq(q), s(j)> / (|hq(q)| |s(j)| + eps) with s = hs * m_s, min-max normalised
    over q."""
    m = F.interpolate((ms == 1).float()[:, None], size=hs.shape[-2:], mode="bilinear", align_corners=False)
    s = (hs * m).flatten(2)  # (N, C, J)
    q = hq.flatten(2)  # (N, C, Q)
    cos = torch.einsum("ncj,ncq->njq", s, q) / (s.norm(dim=1)[:, :, None] * q.norm(dim=1)[:, None] + eps)
    y = cos.max(1).values  # (N, Q)
    lo, hi = y.min(1, keepdim=True).values, y.max(1, keepdim=True).values
    return ((y - lo) / (hi - lo + eps)).view(hq.shape[0], 1, *hq.shape[-2:])


class Residual(nn.Module):
    """CANet's residual block: x + conv3x3(ReLU(conv3x3(ReLU(x))))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(F.relu(self.a(F.relu(x))))


class Decoder(nn.Module):
    """D: CANet's ASPP (1x1, three 3x3 of dilation 6 / 12 / 18 and image pooling, concatenated,
    1x1 back), a residual block and the 1x1 classifier to background / foreground."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Conv2d(c, c, 1)] + [nn.Conv2d(c, c, 3, padding=d, dilation=d) for d in (6, 12, 18)]
        )
        self.pool = nn.Conv2d(c, c, 1)
        self.fuse = nn.Conv2d(5 * c, c, 1)
        self.res = Residual(c)
        self.cls = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.relu(self.pool(x.mean((2, 3), keepdim=True))).expand_as(x)
        y = F.relu(self.fuse(torch.cat([F.relu(b(x)) for b in self.branches] + [pooled], 1)))
        return self.cls(F.relu(self.res(y)))


class FPM(nn.Module):
    """A feature processing module: the concatenation [F, V_a, V_b] (3C, + ``extra`` channels such
    as the prior mask) through a 1x1 conv to C, ReLU, then a residual block (the single-scale FPM
    of the thesis' CANet variant)."""

    def __init__(self, c: int, extra: int = 0) -> None:
        super().__init__()
        self.merge = nn.Conv2d(3 * c + extra, c, 1)
        self.res = Residual(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(F.relu(self.merge(x)))


class SclNet(nn.Module):
    """SCL on a CANet-style base: a ResNet encoder at output stride 8 whose stage-2 and stage-3
    maps are concatenated and reduced by a 1x1 conv (+ ReLU, channel dropout ``dropout``, CANet's
    0.5) to ``channels`` (CANet's encoder), the support FPM_s and query FPM_q, and one shared decoder D.
    ``sgm=False`` is the base alone (the query guided by [V_s, V_s]); ``prior=True`` feeds the
    query FPM PFENet's prior mask (:func:`prior_mask`) of the last-stage features."""

    def __init__(
        self,
        depth: int = 50,
        channels: int = 256,
        weights: str = "none",
        sgm: bool = True,
        prior: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(depth, 8, weights)
        c2, c3 = self.backbone.channels[1], self.backbone.channels[2]
        self.reduce = nn.Sequential(nn.Conv2d(c2 + c3, channels, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout))
        self.fpm_s, self.fpm_q = FPM(channels), FPM(channels, int(prior))
        self.decoder = Decoder(channels)
        self.sgm, self.prior = sgm, prior
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The new layers: He-normal (fan-in, ReLU) convolutions, zero biases, residual blocks
        that start as the identity and a small classifier. PyTorch's default (kaiming-uniform,
        a = sqrt 5) shrinks the signal by ~sqrt 6 a layer; from scratch (no ImageNet features)
        the ~12 BN-free layers of FPM + decoder then passed nothing and the query logits stayed
        at the foreground prior."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and not name.startswith("backbone"):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Residual):  # each block starts as the identity
                nn.init.zeros_(m.b.weight)
        nn.init.normal_(self.decoder.cls.weight, std=0.01)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 3, H, W) 0..255 -> (F (N, C, H/8, W/8), the detached last-stage features for the
        prior mask, None without it)."""
        feats = self.backbone(normalize(images), 4 if self.prior else 3)  # CANet drops stage 4
        f2, f3 = feats[1], feats[2]
        if f2.shape[-2:] != f3.shape[-2:]:
            f2 = F.interpolate(f2, size=f3.shape[-2:], mode="bilinear", align_corners=False)
        return self.reduce(torch.cat([f2, f3], 1)), feats[3].detach() if self.prior else None

    def prior_of(self, hq: torch.Tensor | None, hs: torch.Tensor | None, ms: torch.Tensor) -> torch.Tensor | None:
        """The prior mask of a query from one support (None without the prior)."""
        return prior_mask(hq, hs, ms) if self.prior else None

    def support_vectors(self, fs: torch.Tensor, ms: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 5.1-5.9 on encoded supports ``fs`` and their masks ``ms`` (N, H, W): v_s, v_pri,
        v_aux and the support logits P_s1, P_s2 (grid; P_s2 absent without the SGM)."""
        size = fs.shape[-2:]
        m = mask_to(ms, size)
        v_s = masked_gap(fs, m)
        s1 = self.decoder(self.fpm_s(torch.cat([fs, expand(v_s, size), expand(v_s, size)], 1)))
        if not self.sgm:
            return {"v_s": v_s, "a": v_s, "b": v_s, "s1": s1}
        v_pri, v_aux = guided_vectors(fs, m, s1.argmax(1).float())
        s2 = self.decoder(self.fpm_s(torch.cat([fs, expand(v_pri, size), expand(v_aux, size)], 1)))
        return {"v_s": v_s, "a": v_pri, "b": v_aux, "s1": s1, "s2": s2}

    def query_logits(
        self, fq: torch.Tensor, a: torch.Tensor, b: torch.Tensor, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Eq. 5.11-5.12 (before the softmax): the query guided by the vectors ``a``, ``b`` (and
        the ``prior`` mask, resized to the grid, in the PFENet-style base)."""
        size = fq.shape[-2:]
        parts = [fq, expand(a, size), expand(b, size)]
        if self.prior:
            parts.append(F.interpolate(prior, size=size, mode="bilinear", align_corners=False))
        return self.decoder(self.fpm_q(torch.cat(parts, 1)))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, new layers)."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]

    def forward(
        self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One 1-shot episode per row: logits ``q`` of the query and ``s1`` / ``s2`` of the
        support, on the feature grid."""
        (fs, hs), (fq, hq) = self.encode(support), self.encode(query)
        out = self.support_vectors(fs, support_mask)
        out["q"] = self.query_logits(fq, out["a"], out["b"], self.prior_of(hq, hs, support_mask))
        return out


def up_ce(logits: torch.Tensor, mask: torch.Tensor, balanced: bool = False) -> torch.Tensor:
    """Eq. 5.7 / 5.10 / 5.13: the CE of grid ``logits`` (N, 2, h, w), upsampled to the mask
    (N, H, W) (255 = ignored), averaged over its pixels. ``balanced``: the mean of the two
    classes' mean CEs over the batch, 1/2 (sum_{bg} l / n_bg + sum_{fg} l / n_fg) (a class with
    no pixel drops out), so a small foreground weighs as much as the background."""
    up = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    target = mask.long()
    weight = None
    if balanced:
        counts = torch.stack([(target == k).sum() for k in (0, 1)]).to(up.dtype)
        weight = 1.0 / counts.clamp_min(1.0)
    return F.cross_entropy(up, target, weight=weight, ignore_index=255)


def scl_loss(
    out: dict[str, torch.Tensor], support_mask: torch.Tensor, query_mask: torch.Tensor, balanced: bool = False
) -> dict[str, torch.Tensor]:
    """Eq. 5.14: L_ce^s1 + L_ce^s2 + L_ce^q (the base alone: L_ce^s1 + L_ce^q, CANet has no
    support loss; here it keeps the decoder's support path trained for the comparison), each
    term class-balanced with ``balanced`` (:func:`up_ce`)."""
    terms = {"s1": up_ce(out["s1"], support_mask, balanced), "q": up_ce(out["q"], query_mask, balanced)}
    if "s2" in out:
        terms["s2"] = up_ce(out["s2"], support_mask, balanced)
    terms["loss"] = sum(terms.values())
    return terms


def binary_iou(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IoU of the foreground of 0/1 maps (..., H, W) (255 in ``mask`` ignored); 1 when both are
    empty."""
    valid = mask != 255
    p, m = (pred == 1) & valid, (mask == 1) & valid
    inter = (p & m).sum((-2, -1)).float()
    union = (p | m).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def cross_guided(
    logits_of: Callable[[int, torch.Tensor], torch.Tensor],
    supports: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    query: torch.Tensor,
) -> torch.Tensor:
    """Eq. 5.15-5.17 for one episode of K support images (3, H_i, W_i) with masks (H_i, W_i) and
    a query (3, H, W): ``logits_of(k, image)`` is the 1-shot model's logits (2, H, W) of
    ``image`` guided by support k, at the image's size. U^k is the mean IoU of the supports
    predicted under support k; returns P^_q (2, H, W)."""
    k = len(supports)
    weights = [
        torch.stack([binary_iou(logits_of(j, s).argmax(0), m) for s, m in zip(supports, masks)]).mean()
        for j in range(k)
    ]
    fused = sum(w * logits_of(j, query) for j, w in enumerate(weights)) / k
    return torch.softmax(fused, 0)


def prototype_logits(
    support_feats: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], fq: torch.Tensor, scale: float = 20.0
) -> torch.Tensor:
    """The prototype-only baseline (masked average pooling + cosine): the foreground and
    background prototypes of each support's features (1, C, h, w) and mask (1, H, W), averaged
    over the shots; the query's features (1, C, h, w) scaled cosine to each: (1, 2, h, w)."""
    fg = torch.stack([masked_gap(f, mask_to(m, f.shape[-2:]))[0] for f, m in zip(support_feats, masks)]).mean(0)
    bg = torch.stack([masked_gap(f, mask_to(m, f.shape[-2:], 0))[0] for f, m in zip(support_feats, masks)]).mean(0)
    protos = F.normalize(torch.stack([bg, fg]), dim=1)
    return scale * torch.einsum("kc,nchw->nkhw", protos, F.normalize(fq, dim=1))

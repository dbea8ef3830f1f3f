"""Losses shared by the A²GNN, final-training and DFR stages.

Pairwise terms live on (N, K, H, W) offset tensors (see :mod:`models.affinity`): a local
window of K offsets, never an N x N matrix.

::

    L_ce    = CE over background seeds + CE over foreground seeds, each averaged over its
              own pixels (thesis Eq. 3.21 as the released code computes it)
    L_reg   = 1/(N H W) sum_i sum_{j in W(i)} K_ij (1 - sum_c P_c(i) P_c(j))       (Eq. 3.22)
    K_ij    = exp(-|p_i - p_j|^2 / 2 s_xy^2 - |c_i - c_j|^2 / 2 s_rgb^2)

The printed Eq. 3.22 lacks the disagreement factor ([c_i != c_j], relaxed to
1 - P(i).P(j)) and would be constant in the prediction; the relaxed Potts form is what the
released gated-CRF code computes and what is implemented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .affinity import (
    affinity_class_loss,
    image_kernel,
    pair_distance,
    pair_labels,
    pair_reduce,
    shifted,
    window_offsets,
)
from .graph import from_grid, sample_grid
from .params import DfrTerms
from .types import IGNORE


def seed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_ce (Eq. 3.21 as the released code computes it), per image: CE(background seeds) +
    CE(foreground seeds), each a mean over its own pixels; a set with no pixels contributes
    0. ``logits`` (N, C, H, W), ``labels`` (N, H, W) class indices into C with IGNORE for
    unknown. Returns (N,): one loss per image (sum them for independent per-image models,
    average them for a shared model)."""
    ce = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE, reduction="none")  # 0 where ignored
    total = logits.new_zeros(len(labels))
    for part in (labels == 0, (labels != 0) & (labels != IGNORE)):
        total = total + (ce * part).sum((1, 2)) / part.sum((1, 2)).clamp_min(1)
    return total


def potts_loss(probs: torch.Tensor, kernel: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Relaxed Potts / dense-CRF loss on a local window (Eq. 3.22, intended form; DFR Eq. 4-5
    with the DFR kernel): ``sum_i sum_k K_ik (1 - P(i) . P(i + o_k)) / (N H W)``.

    ``probs`` (N, C, H, W) softmax; ``kernel`` (N, K, H, W) pair weights over ``offsets``,
    0 for pairs leaving the image (e.g. :func:`models.affinity.gaussian_kernel`).
    """
    n, _, h, w = probs.shape
    agree = (probs[:, None] * shifted(probs, offsets)).sum(2)  # (N, K, H, W)
    return (kernel * (1.0 - agree)).sum() / (n * h * w)


def dense_crf_loss(
    logits: torch.Tensor,
    images: torch.Tensor,
    valid: torch.Tensor,
    radius: int,
    scale: float,
    sigma_xy: float,
    sigma_rgb: float,
) -> torch.Tensor:
    """The relaxed dense-CRF regularized loss of Tang et al. (ECCV 2018, Tang Eq. 4, Potts form
    ``sum_ij W_ij (1 - S_i . S_j)``) on a local square window of ``radius``, computed, as
    their released code does (``--rloss-scale``), at ``scale`` x the input: :func:`potts_loss` of the bilinearly
    resized softmax, with the kernel of :func:`models.affinity.image_kernel`.

    ``logits`` (N, C, H, W); ``images`` (N, 3, H, W) 0..255; ``valid`` (N, H, W) real pixels
    (crop padding is False): pairs touching padding have weight 0.
    """
    n, _, h, w = logits.shape
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    probs = F.interpolate(torch.softmax(logits, 1), size=size, mode="bilinear", align_corners=False)
    offsets = window_offsets(radius, "square")
    _, real_pairs = grid_validity(valid, size, offsets)
    return potts_loss(probs, image_kernel(images, size, offsets, sigma_xy, sigma_rgb) * real_pairs, offsets)


def grid_validity(
    valid: torch.Tensor, size: tuple[int, int], offsets: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, H, W) real-pixel mask (crop padding False) resized (nearest) to a grid of
    ``size``: (N, h, w) bool, and (N, K, h, w) float = 1 where both ends of a pair are real."""
    real = F.interpolate(valid[:, None].float(), size=size, mode="nearest")
    return real[:, 0] > 0, real * shifted(real, offsets)[:, :, 0]


Window = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


def mp_nodes(prob: torch.Tensor, window: Window) -> torch.Tensor:
    """Flat indices (into an (h, w) grid) of the MP nodes of one box (Eq. 3.23-3.24): in
    every row of the window the node with the highest ``prob``, then in every column."""
    y0, y1, x0, x1 = window
    w = prob.shape[1]
    inside = prob[y0:y1, x0:x1]
    rows = torch.arange(y0, y1, device=prob.device) * w + x0 + inside.argmax(1)
    cols = (y0 + inside.argmax(0)) * w + torch.arange(x0, x1, device=prob.device)
    return torch.cat([rows, cols])


def mp_loss(
    logits: torch.Tensor, feats: torch.Tensor, boxes: list[tuple[Window, int]], stride: int = 8
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """MP loss (Eq. 3.25-3.26) at image resolution, as the released code: ``logits``
    (C, H, W) the upsampled prediction, ``feats`` (D, h, w) the last attention layer's
    features on the grid, ``boxes`` ``(window in pixels, class index)``. In each box the MP
    nodes (:func:`mp_nodes` on the softmax of the box's class) get CE towards the class,
    summed and divided by the number of MP nodes; their features, bilinearly upsampled
    from the grid at those pixels only (:func:`models.graph.sample_grid`), get the mean of
    ``1 - cos`` over all pairs of a box; both pooled over boxes. Also returns each box's
    prototype (Eq. 3.27): the mean feature of its MP nodes."""
    if not boxes:
        return logits.new_zeros(()), []
    width = logits.shape[-1]
    probs = torch.softmax(logits.detach(), 0)
    flat = logits.flatten(1)
    ce, n_ce, dis, n_dis, protos = logits.new_zeros(()), 0, logits.new_zeros(()), 0, []
    for window, cls in boxes:
        nodes = mp_nodes(probs[cls], window)
        target = torch.full((len(nodes),), cls, dtype=torch.long, device=logits.device)
        ce = ce + F.cross_entropy(flat[:, nodes].t(), target, reduction="sum")
        node_feats = sample_grid(feats, nodes // width, nodes % width, stride)
        unit = F.normalize(node_feats, dim=1)
        dis = dis + (1.0 - unit @ unit.t()).sum()
        n_ce, n_dis = n_ce + len(nodes), n_dis + len(nodes) ** 2
        protos.append(node_feats.detach().mean(0))
    return ce / n_ce + dis / n_dis, protos


def prototype_similarity(feats: torch.Tensor, proto: torch.Tensor, centred: bool = True) -> torch.Tensor:
    """The similarity Eq. 3.28 tests: the cosine of each node feature ``feats`` (D, h, w)
    to a box prototype ``proto`` (D,), (h, w).

    ``centred`` (default): ``cos(h_i - mu, p - mu)`` with ``mu`` the image's mean node
    feature. The A²GNN node features are non-negative (ReLU embedding, attention layers
    that output convex combinations), so the raw cosine is >= 0 everywhere and a check at
    0, as released, never removes a seed. Centred, 0 separates the features on the
    prototype's side of the image average from those on the far side, which is the check
    the thesis describes (seeds whose features disagree with their box's MP nodes).
    ``centred=False``: the released raw cosine.
    """
    if centred:
        mu = feats.mean((1, 2))
        feats, proto = feats - mu[:, None, None], proto - mu
    return F.cosine_similarity(feats, proto[:, None, None], dim=0)


def consistency_check(
    labels: torch.Tensor, similarity: torch.Tensor, region: Window, cls: int, threshold: float = 0.0
) -> torch.Tensor:
    """Eq. 3.27-3.28: seed pixels of class ``cls`` inside ``region`` whose cosine similarity
    to the box prototype is below ``threshold`` (0, the released code; the printed
    "distance > 0" means similarity) become unknown. ``labels`` and ``similarity`` (H, W);
    returns new labels."""
    y0, y1, x0, x1 = region
    out = labels.clone()
    box = out[y0:y1, x0:x1]
    box[(box == cls) & (similarity[y0:y1, x0:x1] < threshold)] = IGNORE
    return out


# --------------------------------------------------------------------------- DFR (Zhang et al.)
def confident_labels(probs: torch.Tensor, gamma: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """M (DFR Eq. 7): ``argmax_c P_c(i)`` where ``max_c P_c(i) > gamma``, else IGNORE (and IGNORE
    on crop padding, ``valid`` False). ``probs`` (N, C, H, W) -> (N, H, W) long, no gradient."""
    top, labels = probs.detach().max(1)
    keep = top > gamma
    if valid is not None:
        keep &= valid
    return torch.where(keep, labels, torch.full_like(labels, IGNORE))


def feature_kernel(feats: torch.Tensor, offsets: Sequence[tuple[int, int]], sigma: float) -> torch.Tensor:
    """The deep-feature factor of K (DFR Eq. 6), ``exp(-|F_i - F_j|^2 / 2 s3^2)`` (N, K, h, w), of
    the *detached* features: the kernel passes no gradient into F. The position and colour
    factors are :func:`models.affinity.image_kernel` (S in grid cells, I the
    ImageNet-normalised RGB resized to the grid; an infinite sigma switches a factor off,
    Table 5); with those two alone it is K_f of DFR Eq. 13 and Tang et al.'s Potts kernel."""
    sq = pair_reduce(feats.detach(), offsets, lambda a, b: ((a - b) ** 2).sum(1))
    return torch.exp(-sq / (2 * sigma**2))


def feature_distance_loss(distance: torch.Tensor, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_fd (DFR Eq. 10-11): ``D = exp(-|F_i - F_j|_1 / d)`` from ``distance`` = the channel-mean
    L1 (:func:`models.affinity.pair_distance`); -log D averaged over background positives
    and, separately, foreground positives, plus 2 x the mean of -log(1 - D) over negatives
    (:func:`models.affinity.affinity_class_loss` with weights 1, 1, 2)."""
    return affinity_class_loss(torch.exp(-distance), pairs, (1.0, 1.0, 2.0))["loss"]


def feature_regularized_loss(distance: torch.Tensor, kernel: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """L_fr (DFR Eq. 12): ``1/(N h w) sum_i sum_{(i, j) in R_A} K_f(i, j) |F_i - F_j|_1 / d``;
    ``known`` (N, K, h, w) marks R_A, the window pairs whose labels M are both known."""
    n, _, h, w = distance.shape
    return (kernel * known * distance).sum() / (n * h * w)


def a2gnn_objective(
    up: torch.Tensor,
    grid_logits: torch.Tensor,
    feats: torch.Tensor | None,
    labels: torch.Tensor,
    boxes: Sequence[Sequence[tuple[Window, int]]],
    kernel: torch.Tensor,
    offsets: Sequence[tuple[int, int]],
    reg_weight: float,
    check: tuple[float, bool] | None = None,
    stride: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thesis Eq. 3.20 for M stacked per-image models, summed over the images::

        L_G = L_ce + L_mp + lambda_1 L_reg

    ``up`` (M, C, H, W): the logits upsampled to the image; ``grid_logits`` (M, C, h, w) the
    same on the node grid (L_reg, Eq. 3.22, with ``kernel`` and ``offsets``; ``reg_weight`` =
    lambda_1, 0 leaves it out); ``feats`` (M, D, h, w): the last attention layer (L_mp,
    Eq. 3.25-3.26, over each image's ``boxes``; ``None`` leaves it out); ``labels`` (M, H, W):
    seed class indices (L_ce, Eq. 3.21). ``check = (threshold, centred)``: consistency checking
    (Eq. 3.27-3.28) of the seeds against the boxes' MP prototypes, before L_ce, as the released
    code. Returns the loss and the (checked) labels.
    """
    loss = up.new_zeros(())
    if feats is not None:
        for i, image_boxes in enumerate(boxes):
            if not image_boxes:
                continue
            mp, protos = mp_loss(up[i], feats[i], image_boxes, stride)
            loss = loss + mp
            if check is not None:
                for (window, cls), proto in zip(image_boxes, protos):
                    cos = prototype_similarity(feats[i].detach(), proto, check[1])
                    labels[i] = consistency_check(
                        labels[i], from_grid(cos[None], labels.shape[1:], stride)[0], window, cls, check[0]
                    )
    loss = loss + seed_ce(up, labels).sum()
    if reg_weight > 0:
        # potts_loss averages over the stack; the models' losses are summed
        loss = loss + reg_weight * up.shape[0] * potts_loss(torch.softmax(grid_logits, 1), kernel, offsets)
    return loss, labels


DFR_PRESETS = {
    "pce": dict(dfr=False, fd=False, fr=False),  # partial CE alone
    "potts": dict(kernel_feature=False, fd=False, fr=False),  # + Tang et al.'s Potts (XY + RGB)
    "dfr": {},
}  # DFR Eq. 1 in full


def dfr_preset(name: str) -> DfrTerms:
    """The baselines and the full loss by name: ``pce``, ``potts`` or ``dfr``."""
    if name not in DFR_PRESETS:
        raise ValueError(f"DFR loss must be one of {', '.join(DFR_PRESETS)}, got {name!r}")
    return DfrTerms(**DFR_PRESETS[name])


def partial_ce(logits: torch.Tensor, scribbles: torch.Tensor) -> torch.Tensor:
    """L_pce (DFR Eq. 2): ``-1/N_s sum_i [M_s(i) != 255] log P^{M_s(i)}(i)``, the logits
    (N, C, h, w) upsampled (bilinear) to the scribbles' (N, H, W) size; 0 with no label."""
    up = F.interpolate(logits, size=scribbles.shape[-2:], mode="bilinear", align_corners=False)
    if not (scribbles != IGNORE).any():
        return up.sum() * 0.0
    return F.cross_entropy(up, scribbles.long(), ignore_index=IGNORE)


def dfr_objective(
    logits: torch.Tensor,
    feats: torch.Tensor | None,
    images: torch.Tensor,
    scribbles: torch.Tensor,
    valid: torch.Tensor,
    terms: DfrTerms,
) -> dict[str, torch.Tensor]:
    """DFR Eq. 1: ``L = L_pce + l1 L_dfr + l2 (L_fd + L_fr)``, the switched-off terms left out.

    ``logits`` (N, C, h, w) and ``feats`` (N, d, h, w) on the head's grid (stride 4);
    ``images`` (N, 3, H, W) 0..255, ``scribbles`` (N, H, W) with IGNORE = unlabelled and
    ``valid`` (N, H, W) = real pixels (False on crop padding), at input size. L_pce:
    :func:`partial_ce`; the pairwise terms live on the grid, over the (2r+1)^2 - 1 offsets of a
    square window (DFR Eq. 3), pairs touching padding excluded. Returns every computed term and
    ``loss``, plus two detached diagnostics: ``k_feature``, the mean deep-feature factor of K
    over real pairs (near 1 means sigma_3 is wide for the scale of F and L_dfr acts as the Potts
    loss), and ``confident``, the fraction of real pixels with a label in M (DFR Eq. 7).
    """
    n, _, h, w = logits.shape
    out = {"pce": partial_ce(logits, scribbles)}
    loss = out["pce"]
    if not (terms.dfr or terms.fd or terms.fr):
        out["loss"] = loss
        return out
    offsets = window_offsets(terms.radius, "square")
    real, real_pairs = grid_validity(valid, (h, w), offsets)
    kernels: dict[tuple[float, float], torch.Tensor] = {}  # K_f is the switched K's image part when all is on

    def image_part(sigma_xy: float, sigma_rgb: float) -> torch.Tensor:
        if (sigma_xy, sigma_rgb) not in kernels:
            kernels[sigma_xy, sigma_rgb] = image_kernel(images, (h, w), offsets, sigma_xy, sigma_rgb)
        return kernels[sigma_xy, sigma_rgb]

    probs = torch.softmax(logits, 1)
    if terms.dfr:
        kernel = (
            image_part(
                terms.sigma_xy if terms.kernel_xy else math.inf, terms.sigma_rgb if terms.kernel_rgb else math.inf
            )
            * real_pairs
        )
        if terms.kernel_feature and feats is not None:
            k_feature = feature_kernel(feats, offsets, terms.sigma_feat)
            kernel = kernel * k_feature
            out["k_feature"] = (k_feature * real_pairs).sum() / real_pairs.sum().clamp(min=1)
        out["dfr"] = potts_loss(probs, kernel, offsets)
        loss = loss + terms.lambda_dfr * out["dfr"]
    if (terms.fd or terms.fr) and feats is not None:
        confident = confident_labels(probs, terms.gamma, real)
        out["confident"] = (confident != IGNORE).sum() / real.sum().clamp(min=1)
        pairs = pair_labels(confident, offsets)
        distance = pair_distance(feats, offsets)
        feat_loss = logits.new_zeros(())
        if terms.fd:
            out["fd"] = feature_distance_loss(distance, pairs)
            feat_loss = feat_loss + out["fd"]
        if terms.fr:
            known = pairs["bg_pos"] | pairs["fg_pos"] | pairs["neg"]
            out["fr"] = feature_regularized_loss(distance, image_part(terms.sigma_xy, terms.sigma_rgb), known)
            feat_loss = feat_loss + out["fr"]
        loss = loss + terms.lambda_feat * feat_loss
    out["loss"] = loss
    return out

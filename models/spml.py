"""SPML's numerics (Ke et al., "Universal Weakly Supervised Segmentation by Pixel-to-Segment
Contrastive Learning", ICLR 2021): segments by spherical k-means, the SegSort+ pixel-to-segment
contrastive loss and the four relations that pick its positive and negative segments.

::

    mu_s = sum_{i in R_s} e_i / |sum_{i in R_s} e_i|                  (segment prototype, M-step)
    z_i  = argmax_s mu_s . e_i                                       (E-step, spherical k-means)
    p(z_i = t | e_i, mu) = exp(kappa mu_t . e_i) / sum_{t'} exp(kappa mu_t' . e_i)      (SPML Eq. 1)
    L_SegSort+(i, C+, C-) = -log sum_{t in C+} exp(kappa mu_t . e_i)
                                 / sum_{t in C+ u C-} exp(kappa mu_t . e_i)            (SPML Eq. 3)
    L(i) = l_I L(i, V+, V-) + l_C L(i, C+, C-) + l_O L(i, O+, O-) + l_A L(i, C^+, C^-)  (SPML Eq. 4)

e_i is the unit-length pixel embedding (64-d as released for VOC). The segments of an image are
the spherical k-means clusters of [e_i, (y, x) - 0.5] (normalised; started from a regular grid of
clusters, 10 iterations) split by every label map the relations read (the semantic annotation and
the over-segmentation), as the released ``segment_by_kmeans``. The four relations of pixel i
(own segment s):

- V (low-level image similarity): positives are the segments of i's over-segmentation region, the
  negatives the image's other segments; SPML used HED + gPb-owt-ucm regions, we use SLIC
  (:func:`models.seeds.superpixels`). Prototypes with the location features, per image.
- C (semantic annotation): labelled pixels only; positives the labelled segments of i's class,
  negatives those of other classes (the batch's and the memory bank's).
- O (semantic co-occurrence): positives the segments of images sharing a tag with i's image, and
  every segment of i's own image (the paper's rule; the released code leaves an image without
  tags without them), negatives the segments of images sharing none.
- C^ (feature affinity): each unlabelled segment takes the class of its nearest labelled
  segment (cosine of prototypes); then as C over every pixel.

Inside each set the released ``segsort+`` numerator is the positives other than s, or s alone
when there are none; the denominator is that numerator plus the negatives (s is in neither set
otherwise). Each term is the mean over its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def grid_clusters(h: int, w: int, ny: int, nx: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The k-means start: an (h, w) long map of ny x nx regular cells, ids 0..ny nx - 1."""
    ys = torch.linspace(0, ny - 1, h, device=device).round().long()
    xs = torch.linspace(0, nx - 1, w, device=device).round().long()
    return ys[:, None] * nx + xs[None, :]


def segment_prototypes(emb: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """mu (n, D): the normalised sum of the rows of ``emb`` (P, D) in each segment ``seg`` (P,)
    (an empty segment gets the zero vector)."""
    total = emb.new_zeros(n, emb.shape[1]).index_add_(0, seg, emb)
    return F.normalize(total, dim=1, eps=1e-12)


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, init: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """von Mises-Fisher k-means of unit rows ``x`` (P, D) started from labels ``init`` (P,) in
    0..k-1: ``iterations`` rounds of M-step (prototypes) then E-step (nearest prototype by
    cosine). No gradient (the released clustering is not differentiated either)."""
    labels = init
    for _ in range(iterations):
        labels = (x @ segment_prototypes(x, labels, k).t()).argmax(1)
    return labels


def split_segments(*maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments as the distinct tuples of the (P,) long ``maps`` (cluster, labels, ...): the
    segment id of every pixel (P,) and, per segment, its row of the tuple (S, len(maps))."""
    keys = torch.stack(maps, 1)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return inverse, uniq


def segsort_plus(
    emb: torch.Tensor,
    own: torch.Tensor,
    protos: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    kappa: float,
) -> torch.Tensor:
    """SPML Eq. 3 per pixel (P,): ``emb`` (P, D) unit embeddings, ``own`` (P,) each pixel's
    segment, ``protos`` (S, D), ``positive`` / ``negative`` (P, S) bool (C+ / C-; ``own`` may be
    in ``positive``: it counts only where no other positive exists, as released)."""
    # unit vectors: kappa (mu . e - 1) is in [-2 kappa, 0], so exp neither overflows nor needs a max
    w = torch.exp(kappa * (emb @ protos.t() - 1.0))  # (P, S)
    self_mask = F.one_hot(own, protos.shape[0]).bool()
    others = positive & ~self_mask
    num_mask = torch.where(others.any(1, keepdim=True), others, self_mask)
    num = (w * num_mask).sum(1)
    den = num + (w * (negative & ~num_mask)).sum(1)
    return torch.log(den) - torch.log(num)


@dataclass
class Batch:
    """One step's pixels and segments (on the embedding grid, every image of the batch).

    ``emb`` / ``emb_loc`` (P, D) / (P, D + 2) unit rows; ``image`` (P,) image index in the batch;
    ``label`` (P,) semantic annotation (``unlabelled`` = no label); ``region`` (P,) the
    over-segmentation; ``seg`` (P,) segment ids 0..S-1 and per segment ``seg_image``,
    ``seg_label``, ``seg_region`` (S,); ``tags`` (B, K) bool, the classes present per image
    (background excluded)."""

    emb: torch.Tensor
    emb_loc: torch.Tensor
    image: torch.Tensor
    label: torch.Tensor
    region: torch.Tensor
    seg: torch.Tensor
    seg_image: torch.Tensor
    seg_label: torch.Tensor
    seg_region: torch.Tensor
    tags: torch.Tensor


def make_batch(
    emb: torch.Tensor,
    label: torch.Tensor,
    region: torch.Tensor,
    tags: torch.Tensor,
    clusters: tuple[int, int],
    iterations: int,
    valid: torch.Tensor | None = None,
) -> Batch:
    """Segments of a batch: ``emb`` (B, D, h, w) raw embeddings (normalised here), ``label``
    (B, h, w) semantic annotation, ``region`` (B, h, w) over-segmentation, ``tags`` (B, K) bool,
    ``clusters`` (ny, nx) the k-means grid, ``valid`` (B, h, w) bool (crop padding False: left
    out). Per image: spherical k-means of [e, (y, x) - 0.5] (renormalised), then the clusters
    split by label and region; segment ids are unique over the batch."""
    b, d, h, w = emb.shape
    e = F.normalize(emb, dim=1).permute(0, 2, 3, 1)  # (B, h, w, D)
    yy, xx = torch.meshgrid(
        torch.linspace(0, 1, h, device=emb.device), torch.linspace(0, 1, w, device=emb.device), indexing="ij"
    )
    loc = torch.stack([yy, xx], -1) - 0.5
    init = grid_clusters(h, w, *clusters, device=emb.device)
    if valid is None:
        valid = torch.ones(b, h, w, dtype=torch.bool, device=emb.device)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("emb", "emb_loc", "image", "label", "region", "cluster")}
    k = clusters[0] * clusters[1]
    for i in range(b):
        m = valid[i]
        ei = e[i][m]
        el = F.normalize(torch.cat([ei, loc[m]], 1), dim=1)
        cl = spherical_kmeans(el.detach(), init[m], k, iterations)
        rows["emb"].append(ei)
        rows["emb_loc"].append(el)
        rows["image"].append(torch.full_like(cl, i))
        rows["label"].append(label[i][m].long())
        rows["region"].append(region[i][m].long())
        rows["cluster"].append(cl)
    cat = {key: torch.cat(v) for key, v in rows.items()}
    seg, keys = split_segments(cat["image"], cat["cluster"], cat["label"], cat["region"])
    return Batch(
        cat["emb"],
        cat["emb_loc"],
        cat["image"],
        cat["label"],
        cat["region"],
        seg,
        keys[:, 0],
        keys[:, 2],
        keys[:, 3],
        tags.bool(),
    )


@dataclass
class Memory:
    """Prototypes of earlier batches (detached), with their class and tags (SPML: 2 batches)."""

    protos: torch.Tensor
    label: torch.Tensor
    tags: torch.Tensor


def semantic_annotation_loss(
    batch: Batch,
    protos: torch.Tensor,
    unlabelled: int,
    kappa: float,
    memory: Memory | None = None,
    labels: torch.Tensor | None = None,
    seg_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The C term: labelled pixels against labelled segments (same class: C+, other: C-),
    the memory bank's labelled prototypes appended. ``labels`` / ``seg_labels`` replace the
    annotation (the feature-affinity term passes its expanded labels). Zero without labelled
    pixels."""
    lab = batch.label if labels is None else labels
    seg_lab = batch.seg_label if seg_labels is None else seg_labels
    all_protos, all_lab = protos, seg_lab
    if memory is not None and len(memory.protos):
        all_protos, all_lab = torch.cat([protos, memory.protos]), torch.cat([seg_lab, memory.label])
    pix = lab != unlabelled
    kept = all_lab != unlabelled
    if not pix.any() or not kept.any():
        return protos.new_zeros(())
    # own segment index among the kept prototypes
    remap = torch.cumsum(kept.long(), 0) - 1
    own = remap[batch.seg[pix]]
    p_lab, s_lab = lab[pix], all_lab[kept]
    pos = p_lab[:, None] == s_lab[None, :]
    return segsort_plus(batch.emb[pix], own, all_protos[kept], pos, ~pos, kappa).mean()


def co_occurrence_loss(batch: Batch, protos: torch.Tensor, kappa: float, memory: Memory | None = None) -> torch.Tensor:
    """The O term: every pixel against every segment; positives the segments of images sharing a
    tag with the pixel's image and all of its own image's segments, negatives the rest."""
    seg_tags = batch.tags[batch.seg_image]
    all_protos, all_tags = protos, seg_tags
    if memory is not None and len(memory.protos):
        all_protos, all_tags = torch.cat([protos, memory.protos]), torch.cat([seg_tags, memory.tags])
    # decided per (image, segment), then read per pixel
    pos_of_image = (batch.tags.float() @ all_tags.float().t()) > 0  # (B, S)
    images = torch.arange(len(batch.tags), device=protos.device)
    pos_of_image[:, : len(protos)] |= images[:, None] == batch.seg_image[None, :]
    pos = pos_of_image[batch.image]
    return segsort_plus(batch.emb, batch.seg, all_protos, pos, ~pos, kappa).mean()


def image_similarity_loss(batch: Batch, kappa: float) -> torch.Tensor:
    """The V term, per image (then the mean over images): the prototypes of the image's segments
    from the embeddings with location; positives the segments of the pixel's over-segmentation
    region, negatives the image's other segments."""
    losses = []
    for i in batch.image.unique():
        m = batch.image == i
        segs = torch.nonzero(batch.seg_image == i).flatten()
        local = torch.full((len(batch.seg_image),), -1, dtype=torch.long, device=segs.device)
        local[segs] = torch.arange(len(segs), device=segs.device)
        own = local[batch.seg[m]]
        protos = segment_prototypes(batch.emb_loc[m], own, len(segs))
        pos = batch.region[m][:, None] == batch.seg_region[segs][None, :]
        losses.append(segsort_plus(batch.emb_loc[m], own, protos, pos, ~pos, kappa).mean())
    return torch.stack(losses).mean()


def nearest_labelled(protos: torch.Tensor, seg_label: torch.Tensor, unlabelled: int) -> torch.Tensor:
    """C^: each unlabelled segment takes the class of the labelled segment whose prototype is the
    most similar (cosine); labelled ones keep theirs. All stay unlabelled without labelled ones."""
    kept = seg_label != unlabelled
    if not kept.any():
        return seg_label.clone()
    nearest = (protos.detach() @ protos.detach()[kept].t()).argmax(1)
    return torch.where(kept, seg_label, seg_label[kept][nearest])


def feature_affinity_loss(batch: Batch, protos: torch.Tensor, unlabelled: int, kappa: float) -> torch.Tensor:
    """The C^ term: :func:`semantic_annotation_loss` with every segment (and pixel) labelled by
    :func:`nearest_labelled`."""
    seg_lab = nearest_labelled(protos, batch.seg_label, unlabelled)
    return semantic_annotation_loss(batch, protos, unlabelled, kappa, labels=seg_lab[batch.seg], seg_labels=seg_lab)


@torch.no_grad()
def embedding_walk(
    emb: torch.Tensor,
    logits: torch.Tensor,
    class_ids: torch.Tensor,
    size: tuple[int, int],
    beta: float,
    gamma: float,
    logt: int,
) -> torch.Tensor:
    """SPML's pseudo-labels before the CRF (released ``pseudo_softmaxrw_crf``): on the (H//8,
    W//8) grid, the classifier's softmax of ``logits`` (K, h, w) over every class, rows
    ``class_ids`` kept (the classes the image's labels name; the rest are 0), each divided by
    its maximum; then ``M' = M T^(2^logt)`` with ``T = A / colsum(A)``,
    ``A_ij = exp(gamma (e_i . e_j - 1))^beta`` of the normalised embedding ``emb`` (D, h', w')
    resized to the grid (:func:`models.graph.dense_walk`). Upsampled bilinearly to ``size`` and
    normalised per pixel: (len(class_ids), H, W)."""
    from .graph import dense_walk

    grid = (max(1, size[0] // 8), max(1, size[1] // 8))
    e = F.normalize(F.interpolate(emb[None].float(), size=grid, mode="bilinear", align_corners=False)[0], dim=0)
    probs = torch.softmax(F.interpolate(logits[None].float(), size=grid, mode="bilinear", align_corners=False)[0], 0)
    m = probs[class_ids]
    m = m / m.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
    flat = e.flatten(1)
    a = torch.exp(beta * gamma * (flat.t() @ flat - 1.0))
    walked = dense_walk(a, m.flatten(1), logt).view(len(class_ids), *grid)
    up = F.interpolate(walked[None], size=size, mode="bilinear", align_corners=False)[0].clamp_min(0)
    total = up.sum(0, keepdim=True)
    return torch.where(total > 0, up / total.clamp_min(1e-12), torch.full_like(up, 1.0 / len(up)))

"""Seed label rules for every supervision type (thesis Sect. 3.2, 3.3.2, 3.6.1).

Maps (255 = unknown everywhere):

- ``M_I`` (Eq. 3.1): the CAM labels, argmax of ``[P_bg, P_c...]``.
- ``M_I_reliable`` (M'_I, Ch. 2 Eq. 2.6-2.7): for every class c (background included) the
  ``reliable_ratio`` (40%) most confident pixels among those M_I labels c, kept only where
  the dense CRF of the CAM probabilities gives the same label::

      M'_I(i) = M_I(i)  if P_{M_I(i)}(i) is in the top 40% of its class and CRF(i) = M_I(i)
                255     otherwise

- ``M_F`` (Eq. 3.4), boxes with CAMs::

      M_F(i) = M_B(i)     if i is in no box                               (branch 1)
               M_I(i)     if i is in a box and M_B(i) = M_I(i)             (branch 2)
               M_Bk(i)    if i in B_k and M_I predicts no pixel of L_Bk in B_k  (branch 3)
               255        otherwise

  M_Bk(i) (GrabCut of box k alone) is read from the merged M_B: L_k where M_B(i) = L_k.
- ``M_g`` (Eq. 3.5), the main output and the A2GNN node labels. Printed, Eq. 3.5 keeps
  M_F(i) where ``M_F(i) = M_B(i) or M_F(i) = M'_I(i)``; read literally, every label of M_F
  equals M_B (branches 1-3 all copy an M_B value), so M_g would be M_F and selection
  would select nothing. We implement the intended reading, which also matches the text's
  "only around 40% foreground pixels are labeled": labels M_F took *from M_B* (branches 1
  and 3: outside boxes, boxes the CAM missed) are kept; labels it took from the CAM
  (branch 2) are kept only where the confident CAM M'_I agrees::

      M_g(i) = M_F(i)  if M_F(i) came from M_B (branch 1 or 3), or M_F(i) = M'_I(i)
               255     otherwise

  With ``cam.enabled: false``, M_g = M_B (boxes work without a classifier).
- ``M_S`` / ``M_P`` (Sect. 3.6.1): scribbles / points expanded over SLIC superpixels: a
  superpixel touched by exactly one class takes it; one touched by several keeps only the
  annotated pixels; the rest stay 255. They are M_g for scribble / point supervision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .types import IGNORE, Box


def labels_from_soft(probs: np.ndarray, class_ids: np.ndarray | None = None) -> np.ndarray:
    """A soft map (n, H, W) over ``class_ids`` (``None``: classes 0..n-1) -> uint8 class ids,
    the most probable per pixel (M_I of Eq. 3.1 for CAM scores)."""
    best = np.asarray(probs).argmax(0)
    return best.astype(np.uint8) if class_ids is None else np.asarray(class_ids, np.uint8)[best]


def top_ratio_mask(labels: np.ndarray, score: np.ndarray, ratio: float) -> np.ndarray:
    """True on the ``ceil(ratio * n_c)`` highest-scoring pixels of every label c (ties broken
    by raster order), where ``score`` is each pixel's score for its own label."""
    keep = np.zeros(labels.shape, bool)
    flat_l, flat_s, flat_k = labels.reshape(-1), score.reshape(-1), keep.reshape(-1)
    for c in np.unique(flat_l):
        if c == IGNORE:
            continue
        idx = np.nonzero(flat_l == c)[0]
        n = int(np.ceil(ratio * idx.size))
        order = np.argsort(-flat_s[idx], kind="stable")[:n]
        flat_k[idx[order]] = True
    return keep


def reliable_cam_labels(
    probs: np.ndarray, class_ids: np.ndarray, ratio: float, crf_labels: np.ndarray | None = None
) -> np.ndarray:
    """M'_I: the top ``ratio`` of each class of M_I, where the CRF labels agree (if given)."""
    m_i = labels_from_soft(probs, class_ids)
    keep = top_ratio_mask(m_i, probs.max(0), ratio)
    if crf_labels is not None:
        keep &= crf_labels == m_i
    return np.where(keep, m_i, IGNORE).astype(np.uint8)


def reliable_from_probs(
    image: np.ndarray, probs: np.ndarray, class_ids: np.ndarray, ratio: float, crf_params=None
) -> np.ndarray:
    """M'_I of an image (Ch. 2 Eq. 2.5-2.7): the dense CRF (``crf_params``; None: no CRF check)
    of the CAM probabilities ``probs`` (n, H, W) over ``class_ids`` (background first), then
    :func:`reliable_cam_labels`. An image with one class only skips the CRF (nothing to
    disagree). Shared by the ``seeds`` stage and RRM's online labels."""
    crf = None
    if crf_params is not None and len(class_ids) > 1:
        from .crf import crf_from_probs

        crf = labels_from_soft(crf_from_probs(image, probs, crf_params), class_ids)
    return reliable_cam_labels(probs, class_ids, ratio, crf)


def box_masks(shape: tuple[int, int], boxes: Sequence[Box]) -> list[np.ndarray]:
    out = []
    for b in boxes:
        m = np.zeros(shape, bool)
        m[b.y0 : b.y1, b.x0 : b.x1] = True
        out.append(m)
    return out


def fuse_box_cam(m_b: np.ndarray, m_i: np.ndarray, boxes: Sequence[Box]) -> tuple[np.ndarray, np.ndarray]:
    """(M_F of Eq. 3.4, mask of the pixels whose M_F label was taken from M_B)."""
    masks = box_masks(m_b.shape, boxes)
    in_box = np.zeros(m_b.shape, bool)
    for m in masks:
        in_box |= m
    m_f = np.full(m_b.shape, IGNORE, np.uint8)
    m_f[~in_box] = m_b[~in_box]  # branch 1
    from_box = ~in_box
    agree = in_box & (m_b == m_i) & (m_b != IGNORE)
    m_f[agree] = m_i[agree]  # branch 2
    for box, m in zip(boxes, masks):
        if box.cls in np.unique(m_i[m]):
            continue
        sel = m & ~agree & (m_b == box.cls)  # branch 3: M_Bk(i) = L_k
        m_f[sel] = box.cls
        from_box |= sel
    return m_f, from_box


def confident_box_seeds(m_f: np.ndarray, from_box: np.ndarray, m_i_reliable: np.ndarray) -> np.ndarray:
    """M_g of Eq. 3.5 (intended reading, see the module docstring)."""
    keep = (m_f != IGNORE) & (from_box | (m_f == m_i_reliable))
    return np.where(keep, m_f, IGNORE).astype(np.uint8)


def expand_superpixels(sparse: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """M_S / M_P: a superpixel touched by annotations of exactly one class takes that class;
    one touched by several keeps only its annotated pixels; the others stay 255."""
    out = np.full(sparse.shape, IGNORE, np.uint8)
    known = sparse != IGNORE
    if not known.any():
        return out
    seg = segments.astype(np.int64)
    pairs = np.unique(seg[known] * 256 + sparse[known].astype(np.int64))
    seg_of, cls_of = pairs // 256, pairs % 256
    ids, counts = np.unique(seg_of, return_counts=True)
    single = ids[counts == 1]
    lut = np.full(seg.max() + 1, IGNORE, np.int64)
    lut[single] = cls_of[np.isin(seg_of, single)]
    out[:] = lut[seg]
    mixed = known & np.isin(seg, ids[counts > 1])
    out[mixed] = sparse[mixed]
    return out


def merge_seeds(primary: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``primary`` where known, else ``fallback`` (scribbles: M_S over M'_I)."""
    return np.where(primary != IGNORE, primary, fallback).astype(np.uint8)


def superpixels(image: np.ndarray, n_segments: int, compactness: float, sigma: float) -> np.ndarray:
    """SLIC superpixels of an RGB image (labels from 0), the regions M_S / M_P expand over."""
    from skimage.segmentation import slic

    return slic(image, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0, channel_axis=-1)


def classes_of(seeds: np.ndarray, weak) -> np.ndarray:
    """``[0]`` + every class the seeds or the weak labels of the image mention, sorted."""
    named = {b.cls for b in weak.boxes} | set(weak.tags) | {p.cls for p in weak.points}
    if weak.scribbles is not None:
        named |= set(np.unique(weak.scribbles[weak.scribbles != IGNORE]).tolist())
    return np.array(sorted({0, *named, *np.unique(seeds[seeds != IGNORE]).tolist()}), np.int64)

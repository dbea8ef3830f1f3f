"""``seeds``: seed label maps for every supervision type (thesis Sect. 3.2, 3.3.2, 3.6.1).

Maps (255 = unknown everywhere):

- ``M_I`` (Eq. 3.1): the CAM labels, argmax of ``[P_bg, P_c...]`` from the ``cam`` stage.
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
- ``affinity``: the labels the affinity CNN trains on: M_g for boxes and tags; for
  scribbles M_S where known, else M'_I; for points M'_I (M_S / M_P alone without CAMs).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from skimage.segmentation import slic

from models.crf import crf_from_probs
from models.types import PIPELINE, Supervision

from .base import (IGNORE, STAGES, Box, DataError, StageContext, StageResult, StageSpec, WeakLabels, labels_from_soft,
                   run_items)
from .routing import cam_enabled
from .sparse import sparse_labels

VERSION = "1"


# --------------------------------------------------------------------------- numerics
def cam_labels(probs: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """M_I: the class id of the highest score per pixel."""
    return labels_from_soft(probs, class_ids)


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


def reliable_cam_labels(probs: np.ndarray, class_ids: np.ndarray, ratio: float,
                        crf_labels: np.ndarray | None = None) -> np.ndarray:
    """M'_I: the top ``ratio`` of each class of M_I, where the CRF labels agree (if given)."""
    m_i = cam_labels(probs, class_ids)
    keep = top_ratio_mask(m_i, probs.max(0), ratio)
    if crf_labels is not None:
        keep &= crf_labels == m_i
    return np.where(keep, m_i, IGNORE).astype(np.uint8)


def box_masks(shape: tuple[int, int], boxes: list[Box]) -> list[np.ndarray]:
    out = []
    for b in boxes:
        m = np.zeros(shape, bool)
        m[b.y0:b.y1, b.x0:b.x1] = True
        out.append(m)
    return out


def fuse_box_cam(m_b: np.ndarray, m_i: np.ndarray, boxes: list[Box]) -> tuple[np.ndarray, np.ndarray]:
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


def superpixels(image: np.ndarray, cfg) -> np.ndarray:
    return slic(image, n_segments=cfg.n_segments, compactness=cfg.compactness, sigma=cfg.sigma, start_label=0,
                channel_axis=-1)


# --------------------------------------------------------------------------- the stage
def variants(config) -> list[str]:
    """The extra maps written beside M_g, per supervision."""
    if not cam_enabled(config):
        return []
    extra = {"box": ["M_F"], "scribble": ["affinity"], "point": ["affinity"]}
    return ["M_I", "M_I_reliable", *extra.get(config.supervision, [])]


def seed_maps(supervision: Supervision, cfg, image: np.ndarray, weak: WeakLabels,
              cam: tuple[np.ndarray, np.ndarray] | None = None,
              m_b: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(M_g, the extra maps) of one image. ``cfg``: the ``seeds`` section; ``cam``: the CAM
    probabilities and class ids (None without CAMs); ``m_b``: GrabCut's M_B (boxes)."""
    maps: dict[str, np.ndarray] = {}
    if cam is not None:
        probs, class_ids = cam[0].astype(np.float32), cam[1]
        maps["M_I"] = cam_labels(probs, class_ids)
        crf = None
        if cfg.crf_agreement and len(class_ids) > 1:
            crf = cam_labels(crf_from_probs(image, probs, cfg.crf), class_ids)
        maps["M_I_reliable"] = reliable_cam_labels(probs, class_ids, cfg.reliable_ratio, crf)
    if supervision == Supervision.BOX:
        if cam is None:
            return m_b, maps
        maps["M_F"], from_box = fuse_box_cam(m_b, maps["M_I"], weak.boxes)
        return confident_box_seeds(maps["M_F"], from_box, maps["M_I_reliable"]), maps
    if supervision == Supervision.IMAGE:
        return maps["M_I_reliable"], maps
    sparse = sparse_labels(weak, supervision, image.shape[:2])
    if sparse.shape != image.shape[:2]:
        raise ValueError(f"the {supervision} map is {sparse.shape[::-1]} but the image is {image.shape[1::-1]}")
    m_g = expand_superpixels(sparse, superpixels(image, cfg.superpixels))
    if cam is not None:
        # scribbles: M_S over M'_I; points: M'_I alone (Sect. 3.6.1)
        maps["affinity"] = merge_seeds(m_g, maps["M_I_reliable"]) if supervision == Supervision.SCRIBBLE \
            else maps["M_I_reliable"]
    return m_g, maps


def _one(ctx: StageContext, image_id: str) -> dict[str, Any]:
    config = ctx.config
    cam = ctx.input("cam").read_soft(image_id) if cam_enabled(config) else None
    m_b = ctx.input("box_seeds").read_label(image_id) if config.supervision == Supervision.BOX else None
    try:
        m_g, maps = seed_maps(config.supervision, ctx.cfg, ctx.dataset.load_image(image_id),
                              ctx.dataset.load_weak(image_id), cam, m_b)
    except ValueError as err:
        raise DataError(ctx.dataset.image_path(image_id), str(err)) from None
    for name in variants(config):
        ctx.out.write_label(image_id, maps[name], variant=name)
    ctx.out.write_label(image_id, m_g)
    return {}


def run(ctx: StageContext) -> StageResult:
    return run_items(ctx, _one, desc="seeds")


def inputs(config) -> list[str]:
    out = ["box_seeds"] if config.supervision == Supervision.BOX else []
    return out + (["cam"] if cam_enabled(config) else [])


SPEC = STAGES.register(StageSpec(
    name="seeds", run=run, inputs=inputs, supervisions=PIPELINE, output="label",
    version=VERSION, variants=variants,
    reads=("dataset", "weak", "supervision")))

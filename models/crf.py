"""Dense CRF (Kraehenbuehl & Koltun 2011) through ``pydensecrf`` (the ``pydensecrf2`` wheel).

Energy, for labels x and image I::

    E(x) = sum_i psi_u(x_i) + sum_{i<j} mu(x_i, x_j) [ w1 exp(-|p_i-p_j|^2 / 2 sxy_b^2
                                                        - |I_i-I_j|^2 / 2 srgb^2)
                                                     + w2 exp(-|p_i-p_j|^2 / 2 sxy_g^2) ]

with Potts compatibility mu and mean-field inference. The CRF runs over the classes
present in the input only (as PSA/IRN do): fewer labels, same answer for absent ones.
"""

from __future__ import annotations

import numpy as np

from .params import CrfParams
from .types import IGNORE


def unary_from_labels(labels: np.ndarray, n_labels: int, gt_prob: float) -> np.ndarray:
    """Negative log-probabilities (n_labels, H*W) for a hard label map.

    A labelled pixel puts ``gt_prob`` on its label and spreads ``1 - gt_prob`` evenly over the
    others; an unknown pixel (``labels < 0``) is uniform. Same numbers as
    ``pydensecrf.utils.unary_from_labels(..., zero_unsure=True)`` with labels shifted by one.
    """
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    flat = labels.reshape(-1)
    if n_labels == 1:
        return np.zeros((1, flat.size), np.float32)
    energy = np.full((n_labels, flat.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), np.float32)
    known = flat >= 0
    energy[flat[known], np.nonzero(known)[0]] = -np.log(gt_prob)
    energy[:, ~known] = -np.log(1.0 / n_labels)
    return energy


def dense_crf(image: np.ndarray, unary: np.ndarray, params: CrfParams) -> np.ndarray:
    """Mean-field marginals (n_labels, H, W) for an RGB uint8 image and a unary energy."""
    import pydensecrf.densecrf as dcrf

    h, w = image.shape[:2]
    n = unary.shape[0]
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    d.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.require(image, np.uint8, ["C", "W"]),
        compat=params.bilateral_compat,
    )
    q = d.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n, h, w)


def crf_from_labels(image: np.ndarray, labels: np.ndarray, params: CrfParams, gt_prob: float = 0.7) -> np.ndarray:
    """Refine a label map (IGNORE = unknown); returns a full label map (no unknowns).

    A map with no known pixel at all is returned unchanged (there is nothing to propagate).
    """
    present = np.unique(labels[labels != IGNORE])
    if present.size == 0:
        return labels.copy()
    if present.size == 1:
        return np.full_like(labels, present[0])
    lut = np.full(256, -1, np.int64)
    lut[present] = np.arange(present.size)
    q = dense_crf(image, unary_from_labels(lut[labels], present.size, gt_prob), params)
    return present[q.argmax(0)].astype(np.uint8)


def crf_from_probs(image: np.ndarray, probs: np.ndarray, params: CrfParams, eps: float = 1e-5) -> np.ndarray:
    """Refine class probabilities (n, H, W); returns the CRF marginals (n, H, W)."""
    unary = -np.log(np.clip(probs.reshape(probs.shape[0], -1).astype(np.float32), eps, 1.0))
    return dense_crf(image, unary, params)

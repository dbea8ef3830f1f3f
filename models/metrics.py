"""mIoU from one confusion matrix over a whole dataset (as mmseg's ``IoUMetric``). Pure numpy.

The matrix has one extra *unlabeled* column, so the same code scores dense predictions and
partial seed maps::

    conf[g, p] = #pixels with GT class g (GT 255 ignored) and prediction p,
                 p = C for an unlabeled prediction (255)

    IoU_c      = conf[c, c] / (sum_p conf[c, p] + sum_g conf[g, c] - conf[c, c])
    coverage   = 1 - sum_g conf[g, C] / sum conf          (share of pixels labeled)
    precision  = trace(conf[:, :C]) / sum conf[:, :C]      (accuracy on labeled pixels)

An unlabeled pixel counts against its GT class's IoU (a seed map is scored as a
segmentation); classes absent from both GT and prediction are NaN and left out of the mean.
"""
from __future__ import annotations

from typing import Any

import numpy as np

IGNORE = 255


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """(C, C+1) int64 counts for one image; ``pred`` values >= C count as unlabeled."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    valid = gt != ignore
    g = gt[valid].astype(np.int64)
    if g.size and g.max() >= num_classes:
        raise ValueError(f"ground truth has class {int(g.max())} but the dataset has {num_classes} classes")
    p = np.minimum(pred[valid].astype(np.int64), num_classes)
    return np.bincount(g * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1)).reshape(
        num_classes, num_classes + 1)


def scores(conf: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """Per-class IoU, mIoU, coverage and precision from a (C, C+1) confusion matrix."""
    conf = np.asarray(conf, dtype=np.float64)
    c = conf.shape[0]
    tp = np.diag(conf[:, :c])
    union = conf.sum(1) + conf[:, :c].sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = conf.sum()
    labeled = conf[:, :c].sum()
    names = class_names or [str(k) for k in range(c)]
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "iou": {names[k]: (None if np.isnan(iou[k]) else float(iou[k])) for k in range(c)},
        "coverage": float(labeled / total) if total else float("nan"),
        "precision": float(tp.sum() / labeled) if labeled else float("nan"),
        "pixels": int(total),
    }


def evaluate(predictions, ground_truths, num_classes: int, class_names: list[str] | None = None) -> dict[str, Any]:
    """Score pairs of (prediction, GT) arrays with one confusion matrix."""
    conf = np.zeros((num_classes, num_classes + 1), np.int64)
    n = 0
    for pred, gt in zip(predictions, ground_truths):
        conf += confusion_matrix(pred, gt, num_classes)
        n += 1
    out = scores(conf, class_names)
    out["images"] = n
    return out

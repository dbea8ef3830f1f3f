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
``lost`` names the classes present in the GT that no pixel is labelled as: a label map
with no background, or one that dropped a class, is degenerate whatever its mIoU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .types import IGNORE


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
        num_classes, num_classes + 1
    )


def class_iou(conf: np.ndarray) -> np.ndarray:
    """IoU_k = TP_k / (GT_k + Pred_k - TP_k) per class from a (C, C+1) confusion matrix (rows GT,
    the last column unlabelled predictions, which count as misses); NaN for a class neither holds."""
    conf = np.asarray(conf, dtype=np.float64)
    c = conf.shape[0]
    tp = np.diag(conf[:, :c])
    union = conf.sum(1) + conf[:, :c].sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """mIoU: the mean of :func:`class_iou` over the classes the GT or the labels hold (for one
    image's confusion matrix, the classes of that image)."""
    return _held_mean(class_iou(conf))


def _held_mean(iou: np.ndarray) -> float:
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def scores(conf: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """Per-class IoU, mIoU, coverage and precision from a (C, C+1) confusion matrix."""
    conf = np.asarray(conf, dtype=np.float64)
    c = conf.shape[0]
    tp = np.diag(conf[:, :c])
    iou = class_iou(conf)
    total = conf.sum()
    labeled = conf[:, :c].sum()
    names = class_names or [str(k) for k in range(c)]
    return {
        "miou": _held_mean(iou),
        "iou": {names[k]: (None if np.isnan(iou[k]) else float(iou[k])) for k in range(c)},
        "coverage": float(labeled / total) if total else float("nan"),
        "precision": float(tp.sum() / labeled) if labeled else float("nan"),
        "pixels": int(total),
        # classes the GT has but the labels never predict (e.g. no background at all)
        "lost": [names[k] for k in range(c) if conf[k].sum() > 0 and conf[:, k].sum() == 0],
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


# --------------------------------------------------------------------------- instance masks
def mask_iou(masks_a: list[np.ndarray], masks_b: list[np.ndarray]) -> np.ndarray:
    """(len(a), len(b)) IoU of boolean masks of one image."""
    if not masks_a or not masks_b:
        return np.zeros((len(masks_a), len(masks_b)))
    a = np.stack([m.reshape(-1) for m in masks_a]).astype(np.float64)
    b = np.stack([m.reshape(-1) for m in masks_b]).astype(np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def match_instances(
    dets: list[tuple[int, float, np.ndarray]], gts: list[tuple[int, np.ndarray]], thresholds: list[float]
) -> list[tuple[int, float, list[bool]]]:
    """One image's detections ``(class, score, mask)`` against its GT ``(class, mask)``, VOC
    style (the mAP^r protocol of Hariharan et al.): in decreasing score, a detection takes
    the same-class GT it overlaps most; it is a true positive at threshold t when that IoU
    >= t and the GT was not taken at t before (else a duplicate: false positive).
    Returns ``(class, score, [true positive at each t])`` per detection."""
    order = sorted(range(len(dets)), key=lambda k: -dets[k][1])
    taken = [set() for _ in thresholds]
    out = []
    for k in order:
        cls, score, mask = dets[k]
        same = [j for j, (g, _) in enumerate(gts) if g == cls]
        hits = [False] * len(thresholds)
        if same:
            ious = mask_iou([mask], [gts[j][1] for j in same])[0]
            best = int(ious.argmax())
            for t, thr in enumerate(thresholds):
                if ious[best] >= thr and same[best] not in taken[t]:
                    taken[t].add(same[best])
                    hits[t] = True
        out.append((cls, float(score), hits))
    return out


def average_precision(tp: np.ndarray, n_pos: int) -> float:
    """VOC all-point AP of detections already sorted by decreasing score (``tp`` bool):
    the area under the precision envelope ``max_{r' >= r} p(r')`` over recall."""
    if n_pos == 0:
        return float("nan")
    hits = np.cumsum(tp)
    recall = np.concatenate([[0.0], hits / n_pos, [1.0]])
    precision = np.concatenate([[0.0], hits / np.arange(1, len(tp) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(((recall[steps + 1] - recall[steps]) * precision[steps + 1]).sum())


def mask_ap(
    records: list[tuple[int, float, list[bool]]],
    gt_counts: dict[int, int],
    thresholds: list[float],
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """mAP^r at each threshold over a dataset: ``records`` from :func:`match_instances` of
    every image, ``gt_counts`` the number of GT objects per class. Per-class AP and their
    mean over the classes that have GT objects."""
    out: dict[str, Any] = {}
    for t, thr in enumerate(thresholds):
        per_class = {}
        for cls in sorted(gt_counts):
            mine = sorted((r for r in records if r[0] == cls), key=lambda r: -r[1])
            ap = average_precision(np.array([r[2][t] for r in mine], bool), gt_counts[cls])
            per_class[class_names[cls] if class_names else str(cls)] = ap
        valid = [v for v in per_class.values() if not np.isnan(v)]
        out[f"mAP@{thr:g}"] = float(np.mean(valid)) if valid else float("nan")
        out[f"AP@{thr:g}"] = per_class
    out["detections"] = len(records)
    out["gt_objects"] = int(sum(gt_counts.values()))
    return out

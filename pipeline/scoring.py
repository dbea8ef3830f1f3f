"""Scoring a stage's label maps against GT: one confusion matrix per map, mIoU per class,
coverage and precision, and the flags for degenerate maps.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from models.metrics import confusion_matrix, scores
from stages.base import DataError

from .dag import Run

log = logging.getLogger("wsss")


def evaluate_maps(run: Run, name: str, maps: list[str | None]) -> dict[str | None, dict[str, Any]]:
    """mIoU / coverage / precision against GT of a label stage's main map (``None``) and
    named extra maps, over the images it labeled; each GT is read once for all maps."""
    spec, store = run.spec(name), run.store(name)
    if spec.output not in ("label", "soft"):
        return {}
    c = run.dataset.num_classes
    conf = {m: np.zeros((c, c + 1), np.int64) for m in maps}
    seen = dict.fromkeys(maps, 0)
    for image_id in sorted(store.done_ids()):
        try:
            gt = run.dataset.load_gt(image_id)
        except DataError as err:
            log.warning("eval %s: %s", name, err)
            continue
        if gt is None:
            continue
        for m in maps:
            if m is not None and not store.has(image_id, m):
                continue
            pred = store.labels_of(image_id, m)
            if pred.shape != gt.shape:
                raise DataError(
                    store.item_path(image_id, m),
                    f"labels are {pred.shape[::-1]} but the GT of '{image_id}' is {gt.shape[::-1]}",
                )
            conf[m] += confusion_matrix(pred, gt, c)
            seen[m] += 1
    return {m: {**scores(conf[m], run.dataset.class_names), "images": seen[m]} for m in maps if seen[m]}


def evaluate_store(run: Run, name: str, variant: str | None = None) -> dict[str, Any] | None:
    """The scores of one map of a stage (the main one by default), or None without GT."""
    return evaluate_maps(run, name, [variant]).get(variant)


def degenerate(name: str, metrics: dict[str, Any]) -> list[str]:
    """Warnings for label maps that lost a class the GT has (no background at all, say)."""
    out = []
    for label, m in [(name, metrics), *((f"{name}/{v}", sub) for v, sub in metrics.get("maps", {}).items())]:
        if m.get("lost"):
            out.append(
                f"{label}: no pixel is labelled {', '.join(m['lost'])}, although the ground truth has "
                f"{'it' if len(m['lost']) == 1 else 'them'}: these labels are degenerate"
            )
    return out

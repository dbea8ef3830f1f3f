"""Scoring a stage's label maps against GT: one confusion matrix per map, mIoU per class,
coverage and precision, and the flags for degenerate maps.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from models.metrics import confusion_matrix, mean_iou, scores
from models.types import IGNORE
from stages.base import DataError, Scoring

from .dag import Run

log = logging.getLogger("wsss")


def evaluate_maps(
    run: Run, name: str, maps: list[str | None], per_image: dict[str, dict[str, float]] | None = None
) -> dict[str | None, dict[str, Any]]:
    """mIoU / coverage / precision against GT of a label stage's main map (``None``) and
    named extra maps, over the images it labeled; each GT is read once for all maps.
    ``per_image``, when given, receives each map's per-image mIoU (key ``""`` for the main
    map): the mean IoU over the classes that image's GT or labels hold."""
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
            one = confusion_matrix(pred, gt, c)
            conf[m] += one
            seen[m] += 1
            if per_image is not None:
                per_image.setdefault(m or "", {})[image_id] = round(mean_iou(one), 4)
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


CHANGED = 0.1
"""Per-image mIoU difference above which the ladder counts an image as made worse / better."""


def references(run: Run, name: str) -> list[tuple[str, str, str]]:
    """What a label stage's per-image scores are held against: ``(label, stage, map)``. The
    map it starts from (its first input scored as label maps on the same split) and, for the
    final box labels (``crf``), one plain GrabCut call per box (``box_seeds``' ``grabcut_filled``)."""
    spec = run.spec(name)
    out = []
    for up in run.upstream[name]:
        u = run.spec(up)
        if u.scores is Scoring.MAPS and u.split == spec.split:
            out.append((up, up, ""))
            break
    if name == "crf" and "box_seeds" in run.names:
        out.append(("GrabCut filled", "box_seeds", "grabcut_filled"))
    return out


def changed_images(run: Run, name: str, manifests: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per reference of :func:`references`: how many images the stage made worse / better
    than it by more than :data:`CHANGED` in per-image mIoU (where both have GT scores), and
    the worst of them. Only for a stage that labels every pixel: a seed map leaves pixels
    unknown on purpose, and its mIoU counts them as misses."""
    manifest = manifests.get(name) or {}
    mine = manifest.get("image_miou", {}).get("")
    if manifest.get("metrics", {}).get("coverage", 0.0) < 0.999:
        return []
    out = []
    for label, stage, m in references(run, name):
        theirs = (manifests.get(stage) or {}).get("image_miou", {}).get(m)
        if not mine or not theirs:
            continue
        both = sorted(set(mine) & set(theirs))
        delta = {i: mine[i] - theirs[i] for i in both}
        worse = sorted((i for i in both if delta[i] < -CHANGED), key=lambda i: delta[i])
        better = [i for i in both if delta[i] > CHANGED]
        out.append(
            {"against": label, "images": len(both), "worse": len(worse), "better": len(better), "worst": worse[:3]}
        )
    return out


def agreement(run: Run, name: str) -> dict[str, dict[str, float]]:
    """Per reference of :func:`references`: each image's mIoU of the stage's main map against
    the reference map taken as the truth (the classes either holds; the reference's unknown
    pixels left out). Needs no GT: how far the stage moved the labels it was given. Images
    whose own map leaves pixels unknown (a seed map) are not judged."""
    spec = run.spec(name)
    if spec.output not in ("label", "soft"):
        return {}
    store, c = run.store(name), run.dataset.num_classes
    refs = [(label, run.store(stage), m or None) for label, stage, m in references(run, name)]
    out: dict[str, dict[str, float]] = {label: {} for label, _, _ in refs}
    for image_id in sorted(store.done_ids()) if refs else []:
        mine = None
        for label, theirs, variant in refs:
            if not theirs.has(image_id, variant):
                continue
            if mine is None:  # each of the stage's maps read once for all its references
                mine = store.labels_of(image_id)
                if (mine == IGNORE).any():
                    break
            ref = theirs.labels_of(image_id, variant)
            if mine.shape != ref.shape:
                continue
            value = mean_iou(confusion_matrix(mine, ref, c))
            if np.isfinite(value):
                out[label][image_id] = round(value, 4)
    return {label: values for label, values in out.items() if values}


def manifests(run: Run) -> dict[str, dict[str, Any]]:
    """Every stage's manifest (``{}`` for a stage that has none yet)."""
    return {name: run.store(name).read_manifest() or {} for name in run.names}


def review(run: Run, manifests: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The images to look at first, without GT: per image, its lowest agreement (see
    :func:`agreement`) over every label stage and reference of the run; rows ``{image,
    disagreement (1 - that agreement), stage, against, agreements}``, most disagreed first."""
    rows: dict[str, dict[str, Any]] = {}
    for name in run.names:
        for against, values in (manifests.get(name) or {}).get("image_agreement", {}).items():
            for image_id, value in values.items():
                row = rows.setdefault(image_id, {"image": image_id, "disagreement": -1.0, "agreements": {}})
                row["agreements"][f"{name} vs {against}"] = value
                if 1.0 - value > row["disagreement"]:
                    row.update(disagreement=round(1.0 - value, 4), stage=name, against=against)
    return sorted(rows.values(), key=lambda r: (-r["disagreement"], r["image"]))

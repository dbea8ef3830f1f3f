"""``crf``: dense-CRF refinement of the latest label or probability map.

Input (``crf.input: auto``): the most refined upstream stage of the run:
``spml`` for ``method: spml``, else ``a2gnn`` (every label kind), else ``random_walk``
where it propagates CAMs (tags, points), else ``seeds`` (M_g). Hard labels become a unary with ``gt_prob`` on
the label (unknown pixels uniform, see :func:`models.crf.unary_from_labels`); probabilities are used as
-log p. Output: a full label map. Images run in parallel across worker processes.

``grabcut_refine`` (boxes): the CRF's labels then start one GrabCut per box
(:func:`models.grabcut.grabcut_refine`); the output is the refined map, and the CRF's own is
kept as the extra map ``dense_crf`` so the ladder shows what each step adds.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field, PositiveFloat

from models.crf import crf_from_labels, crf_from_probs
from models.grabcut import grabcut_refine
from models.scale import object_side
from models.seeds import labels_from_soft

from .base import STAGES, Output, StageContext, StageResult, StageSpec, run_items
from .methods import stage_runs
from .sections import InferenceCrfParams


# --------------------------------------------------------------------------- config section
class CrfConfig(InferenceCrfParams):
    """Dense CRF (Kraehenbuehl & Koltun) refinement of a label or probability map.

    ``grabcut_refine`` (box supervision, not the thesis): GrabCut per box started from the
    CRF's labels (:func:`models.grabcut.grabcut_refine`, ``box_seeds``' iterations, crop and
    minimum side); a box whose result overlaps its CRF pixels with IoU below
    ``grabcut_min_iou`` keeps the CRF's. Off by default (it is not the thesis).

    ``bilateral_scale`` (set: the rule; null: the absolute ``bilateral_sxy``): the bilateral
    kernel width follows the objects, ``sxy = bilateral_scale * s`` with ``s`` the image's
    object side (:func:`models.scale.object_side`: the median side of its boxes, else of the
    input map's objects)."""

    input: Literal["auto", "a2gnn", "random_walk", "seeds", "box_seeds"] = "auto"
    gt_prob: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.7
    grabcut_refine: bool = False
    grabcut_min_iou: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    bilateral_scale: PositiveFloat | None = None


VERSION = "1"
DENSE = "dense_crf"

# The refinement candidates, most refined first; `auto` takes the first one in the DAG.
CANDIDATES = ("spml", "a2gnn", "random_walk", "seeds", "box_seeds")


def _candidate(name: str, config) -> bool:
    spec = STAGES.get(name)
    if not stage_runs(spec, config):
        return False
    # The random walk replaces the seeds where it propagates CAMs (PSA's role: tags, points);
    # where it propagates the confident seeds (boxes, scribbles) it is the Table 3.4 baseline.
    return name != "random_walk" or config.random_walk.source == "cam"


def kernel_params(cfg: CrfConfig, image: np.ndarray, boxes, labels: np.ndarray | None) -> CrfConfig:
    """``cfg`` with the bilateral width of its rule for this image (``cfg`` itself without one)."""
    if cfg.bilateral_scale is None:
        return cfg
    side = object_side(image.shape[:2], boxes, labels)
    return cfg.model_copy(update={"bilateral_sxy": cfg.bilateral_scale * side})


def _crf_image(ctx: StageContext, image_id: str) -> dict:
    source, cfg = ctx.input(), ctx.section
    image = ctx.dataset.load_image(image_id)
    rule = cfg.bilateral_scale is not None
    # The boxes only where the kernel rule or the refinement reads them; the input's objects
    # only where the rule has no boxes to size the kernel by.
    reads_boxes = ctx.config.labels == "box" and (rule or _refines(ctx.config))
    boxes = ctx.dataset.load_weak(image_id).boxes if reads_boxes else ()
    if source.kind == "soft":
        probs, class_ids = source.read_soft(image_id)
        params = kernel_params(cfg, image, boxes, labels_from_soft(probs, class_ids) if rule and not boxes else None)
        labels = labels_from_soft(crf_from_probs(image, probs.astype(np.float32), params), class_ids)
    else:
        given = source.read_label(image_id)
        labels = crf_from_labels(image, given, kernel_params(cfg, image, boxes, given), cfg.gt_prob)
    if _refines(ctx.config):
        ctx.out.write_label(image_id, labels, DENSE)
        gc = ctx.config.box_seeds  # in the fingerprint through box_seeds upstream
        labels = grabcut_refine(
            image,
            labels,
            boxes,
            gc.iterations,
            gc.crop_margin,
            gc.min_box_side,
            seed=ctx.config.seed,
            min_iou=cfg.grabcut_min_iou,
        )
    ctx.out.write_label(image_id, labels)
    return {}


def _refines(config) -> bool:
    return config.crf.grabcut_refine and config.labels == "box"


def run(ctx: StageContext) -> StageResult:
    result = run_items(ctx, _crf_image, desc="dense CRF")
    result.info["input"] = ctx.input().stage
    return result


def inputs(config) -> list[str]:
    if config.crf.input != "auto":
        return [config.crf.input]
    for name in CANDIDATES:
        if _candidate(name, config):
            return [name]
    raise ValueError(f"crf: no input stage for labels '{config.labels}'")


SPEC = STAGES.register(
    StageSpec(
        name="crf",
        section=CrfConfig,
        run=run,
        inputs=inputs,
        output=Output.LABEL,
        version=VERSION,
        variants=lambda config: [DENSE] if _refines(config) else [],
        reads=("dataset", "labels", "seed"),
    )
)

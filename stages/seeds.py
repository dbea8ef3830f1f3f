"""``seeds``: the seed label maps of every label kind (thesis Sect. 3.2, 3.3.2, 3.6.1;
the rules, Eq. 3.1-3.5 and Ch. 2 Eq. 2.6-2.7, are :mod:`models.seeds`).

Main output M_g (the A²GNN node labels): M_B (``box_seeds``) for boxes without CAMs, Eq. 3.5
with CAMs; M'_I for tags; M_S / M_P for scribbles / points. Extra maps with CAMs: ``M_I``,
``M_I_reliable``, ``M_F`` (boxes) and ``affinity``: the labels the affinity CNN trains on
(M_g for boxes and tags; for scribbles M_S where known, else M'_I; for points M'_I).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field

from models.seeds import (
    confident_box_seeds,
    expand_superpixels,
    fuse_box_cam,
    labels_from_soft,
    merge_seeds,
    reliable_from_probs,
    superpixels,
)

from .base import STAGES, DataError, Output, StageContext, StageResult, StageSpec, WeakLabels, run_items
from .methods import in_pipeline
from .routing import cam_enabled
from .sections import DenseCrfParams, Section, SlicConfig
from .sparse import sparse_labels


# --------------------------------------------------------------------------- config section
class SeedsConfig(Section):
    """Seed maps: M_I, M'_I, M_F (Eq. 3.4), M_g (Eq. 3.5), M_S / M_P (superpixel expansion)."""

    reliable_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4
    crf_agreement: bool = True
    crf: DenseCrfParams = Field(default_factory=DenseCrfParams)
    superpixels: SlicConfig = Field(default_factory=SlicConfig)


VERSION = "1"


def variants(config) -> list[str]:
    """The extra maps written beside M_g, per label kind."""
    if not cam_enabled(config):
        return []
    extra = {"box": ["M_F"], "scribble": ["affinity"], "point": ["affinity"]}
    return ["M_I", "M_I_reliable", *extra.get(config.labels, [])]


def seed_maps(
    labels: str,
    cfg,
    image: np.ndarray,
    weak: WeakLabels,
    cam: tuple[np.ndarray, np.ndarray] | None = None,
    m_b: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(M_g, the extra maps) of one image. ``cfg``: the ``seeds`` section; ``cam``: the CAM
    probabilities and class ids (None without CAMs); ``m_b``: GrabCut's M_B (boxes); ``labels``:
    the run's label kind."""
    maps: dict[str, np.ndarray] = {}
    if cam is not None:
        probs, class_ids = cam[0].astype(np.float32), cam[1]
        maps["M_I"] = labels_from_soft(probs, class_ids)
        maps["M_I_reliable"] = reliable_from_probs(
            image, probs, class_ids, cfg.reliable_ratio, cfg.crf if cfg.crf_agreement else None
        )
    if labels == "box":
        if cam is None:
            return m_b, maps
        maps["M_F"], from_box = fuse_box_cam(m_b, maps["M_I"], weak.boxes)
        return confident_box_seeds(maps["M_F"], from_box, maps["M_I_reliable"]), maps
    if labels == "tags":
        return maps["M_I_reliable"], maps
    sparse = sparse_labels(weak, labels, image.shape[:2])
    if sparse.shape != image.shape[:2]:
        raise ValueError(f"the {labels} map is {sparse.shape[::-1]} but the image is {image.shape[1::-1]}")
    m_g = expand_superpixels(
        sparse, superpixels(image, cfg.superpixels.n_segments, cfg.superpixels.compactness, cfg.superpixels.sigma)
    )
    if cam is not None:
        # scribbles: M_S over M'_I; points: M'_I alone (Sect. 3.6.1)
        maps["affinity"] = merge_seeds(m_g, maps["M_I_reliable"]) if labels == "scribble" else maps["M_I_reliable"]
    return m_g, maps


def _seeds_of_image(ctx: StageContext, image_id: str) -> dict[str, Any]:
    config = ctx.config
    cam = ctx.input("cam").read_soft(image_id) if cam_enabled(config) else None
    m_b = ctx.input("box_seeds").read_label(image_id) if config.labels == "box" else None
    try:
        m_g, maps = seed_maps(
            config.labels, ctx.section, ctx.dataset.load_image(image_id), ctx.dataset.load_weak(image_id), cam, m_b
        )
    except ValueError as err:
        raise DataError(ctx.dataset.image_path(image_id), str(err)) from None
    for name in variants(config):
        ctx.out.write_label(image_id, maps[name], variant=name)
    ctx.out.write_label(image_id, m_g)
    return {}


def run(ctx: StageContext) -> StageResult:
    return run_items(ctx, _seeds_of_image, desc="seeds")


def inputs(config) -> list[str]:
    out = ["box_seeds"] if config.labels == "box" else []
    return out + (["cam"] if cam_enabled(config) else [])


def resolve(config) -> None:
    """Tags into the pipeline need CAMs (their seeds are M'_I)."""
    if in_pipeline(config) and config.labels == "tags" and not config.cam.enabled:
        raise ValueError("labels 'tags' need CAMs: cam.enabled must be true")


SPEC = STAGES.register(
    StageSpec(
        name="seeds",
        resolve=resolve,
        section=SeedsConfig,
        run=run,
        inputs=inputs,
        output=Output.LABEL,
        version=VERSION,
        variants=variants,
        reads=("dataset", "weak", "labels"),
    )
)

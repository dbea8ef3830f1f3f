"""``random_walk``: PSA / IRN propagation over each image's graph (thesis Sect. 3.4, Table 3.4 "RW").

Per image: the source scores M (C classes) are averaged onto the stride-8 grid, propagated
``M' = M T^(2^logt)`` with ``T`` the column-normalised ``A^beta`` of the stored graph
(:func:`models.graph.random_walk`, sparse, O(N K) memory), upsampled bilinearly to the
image, and divided by their sum over classes. Stored as a float16 soft map whose argmax is
the label map (a pixel no class reaches gets uniform scores, hence background).

Sources (``random_walk.source``; ``auto`` is resolved by the labels when the config loads):

- ``cam`` (tags, points; PSA): the CAM of each tagged class, background ``(1 - max_c)^alpha``
  with the random walk's own ``alpha`` (16, as PSA), classes ``[0, tags...]``.
- ``seeds`` (boxes, scribbles): the seed map M_g one-hot, unknown pixels contributing
  nothing, so labels flow from the confident seeds into the unknown region; classes
  ``[0] + those present``. With ``keep_seeds`` (default) the known pixels keep their seed
  (one-hot) and only the unknown ones take the walk's scores: the stride-8 walk blurs
  labels across object edges (on the horses it lost 13 points of seed-pixel accuracy), and
  a propagation step must only add to what it was given.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field, PositiveFloat

from models.cam import with_background
from models.graph import keep_known, propagate, seed_scores

from .base import STAGES, Output, StageContext, StageResult, StageSpec, run_items
from .methods import in_pipeline
from .sections import Section


# --------------------------------------------------------------------------- config section
class RandomWalkConfig(Section):
    """PSA random walk: M T^(2^logt), T = column-normalised A^beta (defaults as PSA's code).

    ``source``: what is propagated. ``cam``: the CAM foreground with background
    ``(1 - max)^alpha`` (PSA; the default for tags and points); ``seeds``: the seed map M_g,
    one-hot on known pixels and zero on unknown ones (the default for boxes and scribbles,
    whose seeds are the better start); ``auto`` picks by supervision. ``keep_seeds`` (seeds
    source only): the known seed pixels keep their label and only the unknown ones take the
    walk's (label propagation with clamped labels), so the walk can only add to its seeds.
    """

    beta: PositiveFloat = 8.0
    logt: Annotated[int, Field(ge=0, le=12)] = 8
    alpha: PositiveFloat = 16.0
    source: Literal["auto", "cam", "seeds"] = "auto"
    keep_seeds: bool = True


VERSION = "2"


def _walk_image(ctx: StageContext, image_id: str) -> dict:
    cfg, source = ctx.section, ctx.config.random_walk.source
    if source == "cam":
        cam, class_ids = ctx.input("cam").read_soft(image_id)  # its own background is recomputed at alpha
        scores = with_background(cam[1:].astype(np.float32), cfg.alpha)
    else:
        scores, class_ids = seed_scores(ctx.input("seeds").read_label(image_id))
    probs = propagate(ctx.input("graph").read_arrays(image_id), scores, cfg.beta, cfg.logt, ctx.device)
    if source == "seeds" and cfg.keep_seeds:
        probs = keep_known(probs, scores)
    ctx.out.write_soft(image_id, probs, class_ids)
    return {}


def run(ctx: StageContext) -> StageResult:
    result = run_items(ctx, _walk_image, desc="random walk")
    result.info["source"] = ctx.config.random_walk.source
    return result


def inputs(config) -> list[str]:
    return ["graph", config.random_walk.source]


def resolve(config) -> None:
    """``source: auto``: the CAMs for tags and points when CAMs run, else the seeds; a CAM
    source needs CAMs."""
    rw = config.random_walk
    if rw.source == "cam" and not config.cam.enabled:
        raise ValueError("random_walk.source 'cam' needs CAMs: cam.enabled must be true")
    if rw.source == "auto":
        tags_or_points = in_pipeline(config) and config.labels in ("tags", "point")
        rw.source = "cam" if tags_or_points and config.cam.enabled else "seeds"


SPEC = STAGES.register(
    StageSpec(
        name="random_walk",
        resolve=resolve,
        section=RandomWalkConfig,
        run=run,
        inputs=inputs,
        output=Output.SOFT,
        version=VERSION,
        parallel=False,
        reads=("dataset", "labels"),
    )
)

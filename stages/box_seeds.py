"""``box_seeds``: GrabCut seed labels from object boxes (thesis Sect. 3.2, Eq. 3.2-3.3).

M_B of Eq. 3.3 (:func:`models.grabcut.grabcut_seeds`): outside every box background, inside
box B_k class L_k where GrabCut calls the pixel foreground, unknown (255) elsewhere in the box.

``inside_background: background`` writes the filled map below as M_B itself: GrabCut's
background inside a box becomes background seeds instead of unknown (not the thesis; for
from-scratch features, which cannot tell the background inside a box from the object).

Extra map ``grabcut_filled``: the same GrabCut with every unknown pixel taken as background,
i.e. what one call of OpenCV's GrabCut per box gives a user with no pipeline at all. It is
the reference row of every box run's ladder: a later stage earns its place by beating it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from models.grabcut import grabcut_filled, grabcut_seeds

from .base import STAGES, Output, StageContext, StageResult, StageSpec, run_items
from .sections import Section


# --------------------------------------------------------------------------- config section
class BoxSeedsConfig(Section):
    """GrabCut seeds from boxes (thesis Eq. 3.2-3.3). ``inside_background``: what GrabCut's
    background inside a box becomes: ``unknown`` (Eq. 3.2, 255; the thesis, where ImageNet
    features tell background inside a box from the object) or ``background`` (the
    "GrabCut filled" map; for from-scratch features, see the box ladder in docs/results.md)."""

    iterations: PositiveInt = 5
    inside_background: Literal["unknown", "background"] = "unknown"
    crop_margin: Annotated[float, Field(ge=0.0)] | None = 0.5
    min_box_side: Annotated[int, Field(ge=2)] = 4


VERSION = "2"
FILLED = "grabcut_filled"


def _grabcut_image(ctx: StageContext, image_id: str) -> dict:
    image = ctx.dataset.load_image(image_id)
    weak = ctx.dataset.load_weak(image_id)
    cfg = ctx.section
    labels = grabcut_seeds(image, weak.boxes, cfg.iterations, cfg.crop_margin, cfg.min_box_side, seed=ctx.config.seed)
    filled = grabcut_filled(labels)
    ctx.out.write_label(image_id, filled, FILLED)
    ctx.out.write_label(image_id, filled if cfg.inside_background == "background" else labels)
    return {"boxes": len(weak.boxes)}


def run(ctx: StageContext) -> StageResult:
    return run_items(ctx, _grabcut_image, desc="GrabCut seeds")


SPEC = STAGES.register(
    StageSpec(
        name="box_seeds",
        section=BoxSeedsConfig,
        run=run,
        inputs=lambda config: [],
        labels=("box",),
        output=Output.LABEL,
        version=VERSION,
        variants=lambda config: [FILLED],
        reads=("dataset", "weak", "seed"),
    )
)

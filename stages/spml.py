"""``spml``: SPML's pseudo-labels of the train split (the released ``pseudo_softmaxrw_crf`` up to
its CRF, which the ``crf`` stage applies): the trained embedding and softmax classifier
(``spml_train``) on the whole image, the classes the image's weak labels or seeds name, and the
random walk on the embedding (:func:`models.spml.embedding_walk`); with ``keep_seeds`` (ours, off
by default) the seeds' known pixels keep their label, as the ``random_walk`` stage's option. Stored
as a soft map over those classes (the ``crf`` stage reads it as -log p)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat

from models.graph import keep_known
from models.spml import embedding_walk
from models.seeds import classes_of

from .base import STAGES, Output, StageContext, StageResult, StageSpec
from .sections import Section
from .spml_train import load_trained
from .training import infer_items


# --------------------------------------------------------------------------- config section
class SpmlConfig(Section):
    """SPML's pseudo-labels of the train split (the released ``pseudo_softmaxrw_crf``): the
    softmax classifier's probabilities on the stride-8 grid, each class divided by its maximum,
    classes the image's weak labels do not name set to 0, then propagated by a random walk on the
    embedding, T = colnorm(exp(``gamma`` (e_i . e_j - 1))^``beta``) (5, 20) squared ``logt`` (6)
    times; the ``crf`` stage follows. ``keep_seeds`` (ours; the released code has no such step):
    the seeds' known pixels keep their label and the walk only fills the rest, as
    ``random_walk.keep_seeds``."""

    beta: PositiveFloat = 20.0
    gamma: PositiveFloat = 5.0
    logt: Annotated[int, Field(ge=0)] = 6
    keep_seeds: bool = False


VERSION = "1"


def _spml_image(ctx: StageContext, image_id: str, model: torch.nn.Module) -> dict:
    cfg = ctx.section
    image = ctx.dataset.load_image(image_id)
    seeds = ctx.input("seeds").read_label(image_id)
    class_ids = classes_of(seeds, ctx.dataset.load_weak(image_id))
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float().to(ctx.device)
    with torch.no_grad():
        emb = model.embedding(x)
        logits = model.classifier(F.normalize(emb, dim=1))
    probs = embedding_walk(
        emb[0], logits[0], torch.from_numpy(class_ids).to(ctx.device), image.shape[:2], cfg.beta, cfg.gamma, cfg.logt
    )
    probs = probs.cpu().numpy()
    if cfg.keep_seeds:
        probs = keep_known(probs, (seeds[None] == class_ids[:, None, None]).astype(np.float32))
    ctx.out.write_soft(image_id, probs, class_ids)
    return {}


def run(ctx: StageContext) -> StageResult:
    return infer_items(
        ctx, load_trained(ctx.input("spml_train").read_model(), ctx.device), _spml_image, "SPML pseudo-labels"
    )


SPEC = STAGES.register(
    StageSpec(
        name="spml",
        section=SpmlConfig,
        run=run,
        inputs=lambda config: ["spml_train", "seeds"],
        output=Output.SOFT,
        version=VERSION,
        parallel=False,
        reads=("dataset", "weak"),
    )
)

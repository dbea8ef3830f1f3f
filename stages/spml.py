"""``spml``: SPML's pseudo-labels of the train split (the released ``pseudo_softmaxrw_crf`` up to
its CRF, which the ``crf`` stage applies): the trained embedding and softmax classifier
(``spml_train``) on the whole image, the classes the image's weak labels or seeds name, and the
random walk on the embedding (:func:`models.spml.embedding_walk`); with ``keep_seeds`` (ours, off
by default) the seeds' known pixels keep their label, as the ``random_walk`` stage's option. Stored
as a soft map over those classes (the ``crf`` stage reads it as -log p)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.graph import keep_known
from models.spml import embedding_walk
from models.transductive import classes_of

from .base import STAGES, StageContext, StageResult, StageSpec
from .spml_train import load_trained
from .training import infer_items

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
        run=run,
        inputs=lambda config: ["spml_train", "seeds"],
        methods=("spml",),
        output="soft",
        version=VERSION,
        parallel=False,
        reads=("dataset", "weak"),
    )
)

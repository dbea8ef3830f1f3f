"""``spml_train``: SPML's pixel embedding trained on the ``seeds`` stage's labels (Ke et al.
ICLR 2021, Sect. 3-4), with any kind of weak label (the seeds are scribbles / points expanded,
box or CAM seeds).

Per step, on a batch of augmented crops (:func:`stages.training.crop_batch`, with each image's
SLIC regions through the same geometry):

1. :class:`models.spml_net.SpmlNet`: the raw embedding on the stride-4 grid and the softmax
   classifier's logits on its detached, normalised copy;
2. segments (:func:`models.spml.make_batch`): spherical k-means of each crop's embedding with
   location, split by the seeds' label (IGNORE = unlabelled) and the SLIC region;
3. L = w_C (CE of the classifier + L_C) + w_O L_O + w_I L_V + w_A L_C^ (SPML Eq. 4 with the
   released classifier term), the C and O terms against the batch's segments and the memory
   bank's (the prototypes, labels and tags of the last ``memory_batches`` batches, detached);
   the bank is checkpointed, so a killed run resumes exactly.

Tags for the O term: the classes the image's weak labels or seeds name
(:func:`models.seeds.classes_of`), background left out. SGD (new layers at
``head_lr_mult`` x), warm-up then poly.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt

from models.seeds import classes_of, superpixels
from models.segmentation import SpmlNet
from models.spml import (
    Memory,
    co_occurrence_loss,
    feature_affinity_loss,
    image_similarity_loss,
    make_batch,
    segment_prototypes,
    semantic_annotation_loss,
)
from models.types import IGNORE

from .base import STAGES, StageContext, StageResult
from .sections import SgdTrainConfig, SlicConfig
from .training import (
    TINY_STEPS,
    crop_batch,
    resnet_weights_on_disk,
    save_trained,
    sgd,
    train_loop,
    trained_model,
    trained_result,
    training_spec,
)


# --------------------------------------------------------------------------- config section
class SpmlTrainConfig(SgdTrainConfig):
    """SPML's pixel embedding (Ke et al. ICLR 2021; defaults: the released VOC scripts,
    ``bashscripts/voc12``), trained on the ``seeds`` stage's labels (the semantic annotation: the
    scribbles / points / CAM seeds; unknown pixels unlabelled) with the pixel-to-segment loss of
    :mod:`models.spml`. ``method: spml`` runs it beside the A²GNN pipeline; ``spml`` labels the
    train split and the ``crf`` stage reads it where ``crf.input`` is ``auto``. ResNet-``depth`` at output stride 8 +
    PSP pooling into ``channels`` + 1x1 to ``dim`` (64). Segments: spherical k-means on a
    ``clusters`` x ``clusters`` start grid (6: 36 segments an image), ``kmeans_iterations`` (10),
    split by label and by SLIC regions (``superpixels``; SPML: HED + gPb-owt-ucm). Concentrations
    and weights of the four terms (the released box / tag values: 6 / 8 / 16, 0.3 / 0.3 / 0.1;
    scribbles 6 / 12 / 16 with 1 / 0.5 / 0.1, ``configs/*scribble*``); ``weight_affinity`` 0
    (SPML uses C^ for DensePose points only). Memory bank of ``memory_batches`` (2) earlier
    batches. The softmax classifier trains beside it on the detached embedding (its CE inside
    the C term's weight, as released). SGD lr 3e-3 (new layers 10x), momentum 0.9, weight decay
    5e-4, poly 0.9 after a 100-step linear warm-up, batch 4, crop 512, 30k steps; flip and
    rescale in ``scale_range`` (ours: the released range lives in its data code, not printed)."""

    depth: Literal[18, 34, 50, 101] = 101
    channels: PositiveInt = 512
    dim: PositiveInt = 64
    clusters: PositiveInt = 6
    kmeans_iterations: PositiveInt = 10
    superpixels: SlicConfig = Field(default_factory=SlicConfig)
    kappa_annotation: PositiveFloat = 6.0
    kappa_occurrence: PositiveFloat = 8.0
    kappa_image: PositiveFloat = 16.0
    kappa_affinity: PositiveFloat = 6.0
    weight_annotation: Annotated[float, Field(ge=0.0)] = 0.3
    weight_occurrence: Annotated[float, Field(ge=0.0)] = 0.3
    weight_image: Annotated[float, Field(ge=0.0)] = 0.1
    weight_affinity: Annotated[float, Field(ge=0.0)] = 0.0
    memory_batches: Annotated[int, Field(ge=0)] = 2
    batch_size: PositiveInt = 4
    iterations: PositiveInt | None = 30000
    lr: PositiveFloat = 3e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    warmup_iterations: Annotated[int, Field(ge=0)] = 100
    warmup_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    checkpoint_every: PositiveInt = 1000


VERSION = "1"
TERMS = ("ce", "annotation", "occurrence", "image", "affinity")


def build_model(arch: dict[str, Any]) -> SpmlNet:
    return SpmlNet(arch["depth"], arch["num_classes"], arch.get("weights", "none"), arch["channels"], arch["dim"])


def load_trained(state: dict[str, Any], device: str) -> SpmlNet:
    """The trained network from a ``model.pt`` state, in eval mode on ``device``."""
    return trained_model(state, build_model, device)


def to_grid(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) integer maps -> (N, h, w) by nearest sampling (labels, regions, masks)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0].long()


def spml_objective(
    emb: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    regions: torch.Tensor,
    real: torch.Tensor,
    tags: torch.Tensor,
    cfg,
    num_classes: int,
    memory: Memory | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SPML Eq. 4 on a batch: ``emb`` / ``logits`` on the grid, crop-size ``labels`` (IGNORE =
    unlabelled), ``regions`` and ``real``, ``tags`` (B, K-1) bool. Returns the weighted terms
    (with ``loss``) and the batch's prototypes / labels / tags for the memory bank. Terms with
    weight 0 are left out."""
    size = tuple(emb.shape[-2:])
    grid_labels = to_grid(labels, size)
    grid_labels = torch.where(grid_labels == IGNORE, torch.full_like(grid_labels, num_classes), grid_labels)
    batch = make_batch(
        emb,
        grid_labels,
        to_grid(regions, size),
        tags,
        (cfg.clusters, cfg.clusters),
        cfg.kmeans_iterations,
        to_grid(real, size).bool(),
    )
    protos = segment_prototypes(batch.emb, batch.seg, len(batch.seg_image))
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, labels, ignore_index=IGNORE) if (labels != IGNORE).any() else up.sum() * 0
    terms = {"ce": cfg.weight_annotation * ce}
    if cfg.weight_annotation > 0:
        terms["annotation"] = cfg.weight_annotation * semantic_annotation_loss(
            batch, protos, num_classes, cfg.kappa_annotation, memory
        )
    if cfg.weight_occurrence > 0:
        terms["occurrence"] = cfg.weight_occurrence * co_occurrence_loss(batch, protos, cfg.kappa_occurrence, memory)
    if cfg.weight_image > 0:
        terms["image"] = cfg.weight_image * image_similarity_loss(batch, cfg.kappa_image)
    if cfg.weight_affinity > 0:
        terms["affinity"] = cfg.weight_affinity * feature_affinity_loss(batch, protos, num_classes, cfg.kappa_affinity)
    terms["loss"] = sum(terms.values())
    bank = {"protos": protos.detach(), "label": batch.seg_label, "tags": batch.tags[batch.seg_image]}
    return terms, bank


def image_tags(ctx: StageContext, image_id: str, seeds: np.ndarray) -> np.ndarray:
    """(K-1,) bool: the foreground classes the image's weak labels or ``seeds`` name."""
    named = classes_of(seeds, ctx.dataset.load_weak(image_id))
    out = np.zeros(ctx.dataset.num_classes - 1, bool)
    out[named[(named >= 1) & (named < ctx.dataset.num_classes)] - 1] = True
    return out


def run(ctx: StageContext) -> StageResult:
    cfg, ids = ctx.section, sorted(ctx.ids)
    if not ids:
        raise ValueError("spml_train: the train split is empty")
    k = ctx.dataset.num_classes
    seeds_of = functools.lru_cache(maxsize=4096)(lambda i: ctx.input("seeds").read_label(ids[i]))
    tags = np.stack([image_tags(ctx, image_id, seeds_of(i)) for i, image_id in enumerate(ids)])
    arch = {"depth": cfg.depth, "num_classes": k, "weights": cfg.weights, "channels": cfg.channels, "dim": cfg.dim}
    torch.manual_seed(ctx.config.seed)
    model = build_model(arch).to(ctx.device)
    opt, base_lrs = sgd(model, cfg)
    curves: dict[str, list[float]] = {t: [] for t in TERMS}
    bank: dict[str, Any] = {"entries": []}  # checkpointed by train_loop

    @functools.lru_cache(maxsize=4096)
    def regions_of(i: int) -> np.ndarray:
        sp = cfg.superpixels
        return superpixels(ctx.dataset.load_image(ids[i]), sp.n_segments, sp.compactness, sp.sigma).astype(np.uint16)

    def step_fn(picks: np.ndarray, step: int) -> torch.Tensor:
        x, y, real, regions = crop_batch(
            ctx, ids, picks, step, lambda i, image: seeds_of(i), extra_for=lambda i, image: regions_of(i)
        )
        emb, logits = model.forward_train(x)
        entries = bank["entries"]
        memory = None
        if entries:
            memory = Memory(
                *(torch.cat([e[key].to(ctx.device) for e in entries]) for key in ("protos", "label", "tags"))
            )
        terms, new = spml_objective(
            emb.float(), logits.float(), y, regions, real, torch.from_numpy(tags[picks]).to(ctx.device), cfg, k, memory
        )
        if cfg.memory_batches:
            bank["entries"] = (entries + [{key: v.cpu() for key, v in new.items()}])[-cfg.memory_batches :]
        for t in TERMS:
            if t in terms:
                curves[t].append(float(terms[t].detach()))
        return terms["loss"]

    info = train_loop(ctx, model, opt, base_lrs, len(ids), step_fn, extra=bank)
    save_trained(ctx, model, info, arch=arch)
    model = opt = None  # free them before release()
    return trained_result(
        ctx,
        info,
        images=len(ids),
        terms=[t for t in TERMS if curves[t]],
        **{f"{t}_last": round(float(np.mean(v[-10:])), 5) for t, v in curves.items() if v},
    )


SPEC = STAGES.register(
    training_spec(
        name="spml_train",
        tiny={
            **TINY_STEPS,
            "depth": 18,
            "channels": 16,
            "dim": 8,
            "clusters": 2,
            "kmeans_iterations": 2,
            "warmup_iterations": 0,
        },
        section=SpmlTrainConfig,
        run=run,
        inputs=lambda config: ["seeds"],
        version=VERSION,
        preflight=resnet_weights_on_disk("spml_train"),
        reads=("dataset", "weak", "seed"),
    )
)

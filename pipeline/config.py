"""Run configuration: a pydantic v2 schema, YAML files and ``--set a.b=c`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key and the
file. Each stage reads only its own section (its *config slice*); the slice is part of the
stage's fingerprint, so changing it recomputes that stage and everything downstream.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from models.params import CrfParams, DfrTerms
from stages.base import safe_name
from stages.methods import LABEL_KINDS, METHODS, OLD_SUPERVISION, check_pair


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- datasets
class DatasetSection(Section):
    """What every dataset kind shares: the working image size. ``max_side``: the input guard
    (``oversize``). ``min_side``: an image whose shorter side is below it is upscaled
    (bilinear; GT and weak labels follow) so the stride-8 grid of the affinity net, graph and
    A2GNN has enough nodes (a 200x150 horse gives 25x19); every stage then works, and writes,
    at that working size. ``null``: images are used at their own size (VOC-size data)."""

    max_side: Annotated[int, Field(ge=32)] = 2048
    oversize: Literal["downscale", "fail"] = "downscale"  # an image whose longer side is above max_side
    min_side: Annotated[int, Field(ge=8)] | None = None


class DemoDataset(DatasetSection):
    """The project's own synthetic dataset (see ``pipeline/demo.py``)."""

    kind: Literal["demo"] = "demo"
    num_train: PositiveInt = 32
    num_val: PositiveInt = 12
    height: Annotated[int, Field(ge=48)] = 120
    width: Annotated[int, Field(ge=48)] = 160
    seed: int = 0


class MasksDataset(DatasetSection):
    """A folder of images and a folder of GT masks with the same file stems."""

    kind: Literal["masks"] = "masks"
    root: str
    images: str = "images"
    masks: str = "masks"
    threshold: Annotated[int, Field(ge=1, le=255)] | None = 128
    class_names: list[str] = ["background", "object"]
    class_map: dict[int, int] | None = None
    resize: Literal["error", "image_to_mask"] = "error"
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    split_seed: int = 0
    train_list: str | None = None  # split lists (ids, one a line; relative to root): replace val_fraction
    val_list: str | None = None
    weak_dir: str | None = None
    limit: PositiveInt | None = None


class VocDataset(DatasetSection):
    """A VOCdevkit-style folder (``.../VOCdevkit/VOC2012`` or your own): ``JPEGImages``
    (``.jpg`` or ``.png``), ``Annotations`` XML boxes, optional ``ImageSets/Segmentation``
    lists (absent: every annotated image is train, val is empty), optional GT PNGs.
    ``class_names``: the classes, background first (default VOC's 20 and their aliases)."""

    kind: Literal["voc"] = "voc"
    root: str
    class_names: list[str] | None = None
    train_split: str = "train"
    val_split: str = "val"
    gt_dir: Literal["auto", "SegmentationClassAug", "SegmentationClass", "none"] = "auto"
    scribbles: str | None = None
    scribble_width: PositiveInt = 3
    points: str | None = None
    limit: PositiveInt | None = None


class CocoDataset(DatasetSection):
    """An image folder and a COCO instances JSON per split (paths relative to ``root``):
    categories with any ids -> class ids 1..K by id; boxes -> box supervision, categories
    present -> tags; masks (polygons or RLE), where given, -> GT (``iscrowd`` ignored).
    ``points``: the project's points JSON (``{image id: [{x, y, cls}]}``, ``cls`` a class id
    or category name); ``scribbles``: a folder of scribble PNGs (class ids, 255 elsewhere).
    Without them, points and scribbles are synthesized from the masks (when there are any)."""

    kind: Literal["coco"] = "coco"
    root: str
    images: str = "images"
    train_json: str
    val_json: str | None = None
    points: str | None = None
    scribbles: str | None = None
    limit: PositiveInt | None = None


DatasetConfig = Annotated[DemoDataset | MasksDataset | VocDataset | CocoDataset, Field(discriminator="kind")]


class WeakConfig(Section):
    """How ``wsss prepare`` (and on-the-fly synthesis) turns GT masks into weak labels."""

    seed: int = 0
    min_object_area: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.001
    scribble_coverage: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.03
    scribble_length: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6
    scribble_background: bool = True
    background_points: Annotated[int, Field(ge=0)] = 0


# --------------------------------------------------------------------------- stages
class BoxSeedsConfig(Section):
    """GrabCut seeds from boxes (thesis Eq. 3.2-3.3). ``inside_background``: what GrabCut's
    background inside a box becomes: ``unknown`` (Eq. 3.2, 255; the thesis, where ImageNet
    features tell background inside a box from the object) or ``background`` (the
    "GrabCut filled" map; for from-scratch features, see the README's box ladder)."""

    iterations: PositiveInt = 5
    inside_background: Literal["unknown", "background"] = "unknown"
    crop_margin: Annotated[float, Field(ge=0.0)] | None = 0.5
    min_box_side: Annotated[int, Field(ge=2)] = 4


class DenseCrfParams(CrfParams, Section):
    """Dense CRF kernels (defaults: PSA's ``crf_inference``, which A2GNN's seeds follow)."""


class InferenceCrfParams(DenseCrfParams):
    """Dense CRF at inference: the released A²GNN inference parameters (its ``crf_inference``
    call on the propagated probabilities), which are sharper than PSA's seed CRF."""

    gaussian_sxy: PositiveFloat = 2.0
    bilateral_sxy: PositiveFloat = 50.0
    bilateral_srgb: PositiveFloat = 5.0


class CrfConfig(InferenceCrfParams):
    """Dense CRF (Kraehenbuehl & Koltun) refinement of a label or probability map.

    ``grabcut_refine`` (box supervision, not the thesis): GrabCut per box started from the
    CRF's labels (:func:`models.grabcut.grabcut_refine`, ``box_seeds``' iterations, crop and
    minimum side); a box whose result overlaps its CRF pixels with IoU below
    ``grabcut_min_iou`` keeps the CRF's. Off by default: +2.5 points on the horses, none on
    CamVid (README, box ladder)."""

    input: Literal["auto", "a2gnn", "random_walk", "seeds", "box_seeds"] = "auto"
    gt_prob: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.7
    grabcut_refine: bool = False
    grabcut_min_iou: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5


class SgdConfig(Section):
    """What every SGD training stage shares: backbone weights, batches, poly-decayed SGD,
    crops, checkpoints. Subclasses change the defaults to their stage's released settings."""

    weights: str = "none"  # none | imagenet | /path/to/state_dict.pth
    batch_size: PositiveInt = 16
    epochs: PositiveInt = 5
    lr: PositiveFloat = 0.1
    head_lr_mult: PositiveFloat = 10.0
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    poly_power: PositiveFloat = 0.9
    crop: Annotated[int, Field(ge=32)] = 512
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 1.5)
    checkpoint_every: PositiveInt = 100


class SgdTrainConfig(SgdConfig):
    """An SGD training stage on a dilated ResNet of ``depth``."""

    depth: Literal[18, 34, 50, 101] = 50


class CamTrainConfig(SgdTrainConfig):
    """Multi-label classifier for CAMs (dilated ResNet + GAP + bias-free 1x1 classifier);
    defaults as IRN's classifier."""

    output_stride: Literal[8, 16] = 16


class CamConfig(Section):
    """CAM inference (multi-scale + flip) and its background score (1 - max_c CAM)^alpha."""

    enabled: bool = True
    scales: list[PositiveFloat] = [0.5, 1.0, 1.5, 2.0]
    flip: bool = True
    alpha: PositiveFloat = 4.0


class SlicConfig(Section):
    """SLIC superpixels (scikit-image) for expanding scribbles and points."""

    n_segments: PositiveInt = 400
    compactness: PositiveFloat = 10.0
    sigma: Annotated[float, Field(ge=0.0)] = 1.0


class SeedsConfig(Section):
    """Seed maps: M_I, M'_I, M_F (Eq. 3.4), M_g (Eq. 3.5), M_S / M_P (superpixel expansion)."""

    reliable_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4
    crf_agreement: bool = True
    crf: DenseCrfParams = Field(default_factory=DenseCrfParams)
    superpixels: SlicConfig = Field(default_factory=SlicConfig)


class AffinityTrainConfig(SgdTrainConfig):
    """Affinity CNN (thesis Sect. 3.3.3): dilated ResNet (stride 8) -> F_A, trained with
    L_Aff = L_Ac + reg_weight * L_Ar on the seeds' affinity map; defaults as the released code."""

    radius: Annotated[int, Field(ge=1, le=12)] | None = None  # None: 4 for boxes, 5 otherwise (released code)
    neighbourhood: Literal["disk", "square"] = "disk"
    batch_size: PositiveInt = 4
    epochs: PositiveInt = 8
    lr: PositiveFloat = 0.01
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    crop: Annotated[int, Field(ge=32)] = 448
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.3)
    sigma_xy: PositiveFloat = 6.0
    sigma_rgb: PositiveFloat = 0.1
    reg_weight: Annotated[float, Field(ge=0.0)] = 3.0


class GraphConfig(Section):
    """Image -> graph (Eq. 3.14-3.15): edges within the affinity radius where D > threshold.
    Node features (~20 MB per VOC image for ResNet-50) are stored only on request;
    otherwise they are recomputed from the affinity checkpoint downstream."""

    threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 1e-3
    store_features: bool = False


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


A2GNN_RELEASED = {
    "box": {"epochs": 150, "lr": 0.035, "reg_weight": 0.01},
    "other": {"epochs": 50, "lr": 0.03, "reg_weight": 0.3},
}
"""The released A²GNN schedules (``train_infer_A2GNN_{box,others}.py``): epochs per phase, lr, lambda_1."""


class A2gnnConfig(Section):
    """Per-image A²GNN (thesis Sect. 3.3.4-3.3.5). Left out (``null``): the released value
    for the supervision (:data:`A2GNN_RELEASED`), filled in when the config is loaded.
    ``mp``, ``consistency`` and ``box_constraint`` apply to boxes only (off otherwise).

    ``path``: how the affinity attention layer runs: ``grid`` (tiled, the fast exact path;
    several images at once, ``batch``), ``edges`` (PyG message passing) or ``dense`` (the
    released N x N form); the GCN / GAT / AGNN baselines always run on edge lists. ``consistency_threshold``: seeds
    less similar (cosine) to their box's prototype are dropped; 0 as released. ``consistency_similarity``:
    ``centred`` compares mean-centred features (the check acts, as the thesis describes), ``raw`` the released
    cosine of non-negative features (>= 0, so at threshold 0 it never removes a seed).
    ``keep_seeds``: the pixels still seeds after the consistency check keep their label and
    A²GNN fills the rest (:func:`models.transductive.keep_seeds`; not the thesis; the horses
    config turns it on, README); ``seed_weight`` w: those pixels get ``w onehot + (1 - w) P``
    (1: hard; from 0.5 the seed still wins the argmax and the CRF keeps A²GNN's confidence). ``box_constraint``
    (boxes): a class keeps probability only inside its own boxes (:func:`models.boxes.restrict_to_boxes`; not
    in the thesis, which applies the box prior to the seeds only;
    measured gain on horses and CamVid, README).
    """

    layer: Literal["a2gnn", "gcn", "gat", "agnn"] = "a2gnn"
    path: Literal["grid", "edges", "dense"] = "grid"
    tile: PositiveInt = 8
    batch: PositiveInt = 8
    beta: Annotated[float, Field(ge=0.0)] = 10.0
    negative: Literal["drop", "keep"] = "drop"
    hidden: PositiveInt = 256
    layers: PositiveInt = 3
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    epochs: PositiveInt | None = None  # per phase
    lr: PositiveFloat | None = None
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    reg_weight: Annotated[float, Field(ge=0.0)] | None = None  # lambda_1
    reg_radius: PositiveInt = 5
    sigma_xy: PositiveFloat = 6.0
    sigma_rgb: PositiveFloat = 0.1
    mp: bool = True
    consistency: bool = True
    consistency_threshold: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.0
    consistency_similarity: Literal["centred", "raw"] = "centred"
    rw_weight: Annotated[float, Field(ge=0.0)] = 3.0  # tags and points: (P + w P_rw) / (1 + w)
    box_constraint: bool = True
    keep_seeds: bool = False
    seed_weight: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0


SegArch = Literal["deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"]


class FinalTrainConfig(SgdConfig):
    """The segmentation model trained on the pseudo-labels (thesis Sect. 3.5): torchvision
    DeepLabV3, SGD (momentum 0.9) with poly decay, the head at 10x the backbone's rate,
    random scale / flip / crop, 255 ignored; mixed precision on CUDA (``amp``).

    ``labels``: ``pseudo`` (the ``input`` stage's labels) or ``gt`` (the fully supervised
    upper bound of Table 3.1, same settings). ``iterations`` (steps) overrides ``epochs``.
    ``reg_weight`` > 0 adds the relaxed dense-CRF (Potts) loss of Tang et al. on a local
    window of ``reg_radius`` at ``reg_scale`` x the crop, kernel on position (``reg_sigma_xy``
    pixels at that scale) and ImageNet-normalised RGB (``reg_sigma_rgb``).
    """

    arch: SegArch = "deeplabv3_resnet50"
    labels: Literal["pseudo", "gt"] = "pseudo"
    input: Literal["crf", "a2gnn", "random_walk", "seeds"] = "crf"
    batch_size: PositiveInt = 10
    iterations: PositiveInt | None = 20000
    lr: PositiveFloat = 0.007
    crop: Annotated[int, Field(ge=32)] = 321
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 1.5)
    checkpoint_every: PositiveInt = 500
    amp: bool = True
    reg_weight: Annotated[float, Field(ge=0.0)] = 0.0
    reg_radius: PositiveInt = 5
    reg_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    reg_sigma_xy: PositiveFloat = 6.0
    reg_sigma_rgb: PositiveFloat = 0.1


class FinalEvalConfig(Section):
    """Val-split inference of the final model: ``scales`` (1.0 = single scale; the thesis'
    multi-scale set is 0.5-1.75) with optional ``flip``, softmax averaged at image size;
    the ``crf`` map (dense CRF post-processing, Table 3.1's "w/ CRF" column) when
    ``use_crf``."""

    scales: list[PositiveFloat] = [1.0]
    flip: bool = False
    use_crf: bool = True
    crf: InferenceCrfParams = Field(default_factory=InferenceCrfParams)


class InstancesConfig(Section):
    """Box-supervised instance masks (Sect. 3.4): in each box, the pixels of the box's class
    in the ``crf`` labels become that instance. Scored with mask AP at ``iou_thresholds``."""

    iou_thresholds: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = [0.5, 0.7, 0.75]


class InstanceTrainConfig(Section):
    """Mask R-CNN (torchvision ``maskrcnn_resnet50_fpn``) trained on the ``instances`` masks,
    the thesis' box-supervised instance model (Sect. 3.4). Off by default: it needs
    torchvision's compiled RoIAlign / NMS (a CUDA or complete torchvision). SGD with poly
    decay, horizontal flip; torchvision's own resize to ``min_size``."""

    enabled: bool = False
    weights: str = "none"  # ResNet-50 backbone: none | imagenet | path
    batch_size: PositiveInt = 4
    epochs: PositiveInt = 12
    iterations: PositiveInt | None = None
    lr: PositiveFloat = 0.02
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    poly_power: PositiveFloat = 0.9
    min_size: PositiveInt = 800
    checkpoint_every: PositiveInt = 500


SwinArch = Literal["swin_t", "swin_s", "swin_b", "swin_mini"]


class DfrTrainConfig(DfrTerms, Section):
    """The single-stage DFR network trained on scribbles (DFR Sect. 3, 4.2; thesis Ch. 4).

    Swin ``backbone`` (``swin_t`` default, ``swin_b`` as the paper, ``swin_mini`` CPU-sized
    for the demo) + UperNet fusion of ``fusion_stages`` (Table 6) into ``channels``; semantic
    head and feature consistency head (``feature_dim`` = d = 128). Eq. 1:
    ``L = L_pce + lambda_dfr L_dfr + lambda_feat (L_fd + L_fr)``; the switches give Table 4
    and 5 and the baselines: pCE only (``dfr: false, fd: false, fr: false``) and pCE + Potts
    of Tang et al. (``kernel_feature: false, fd: false, fr: false``). Pairs: a square
    window of ``radius`` on the stride-4 grid; kernel sigmas ``sigma_xy`` (grid cells),
    ``sigma_rgb`` (ImageNet-normalised RGB), ``sigma_feat``; confident labels at ``gamma``.

    AdamW (lr 3e-5, weight decay 0.01 of Sect. 4.2; none on norms, biases and position
    tables), linear warm-up of ``warmup_iterations`` from ``warmup_ratio`` x lr, then poly
    decay (power 1, mmseg); random rescale in ``scale_range``, flip, photometric distortion,
    ``crop``; mixed precision on CUDA. It trains on the run's ``labels`` (scribble or point).
    """

    backbone: SwinArch = "swin_t"
    weights: str = "none"  # none | imagenet | /path/to/torchvision_swin_state_dict.pth
    fusion_stages: list[Annotated[int, Field(ge=1, le=4)]] = [1, 2, 3, 4]
    channels: PositiveInt = 512
    feature_dim: PositiveInt = 128
    batch_size: PositiveInt = 16
    iterations: PositiveInt = 40000
    lr: PositiveFloat = 3e-5
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    poly_power: PositiveFloat = 1.0
    warmup_iterations: Annotated[int, Field(ge=0)] = 1500
    warmup_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-6
    crop: Annotated[int, Field(ge=32)] = 512
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)
    photometric: bool = True
    checkpoint_every: PositiveInt = 1000
    amp: bool = True


class DfrEvalConfig(Section):
    """Val-split inference of the DFR network (no feature head): ``scales`` (the paper's
    multi-scale set is 0.5-1.75) and ``flip``, softmax averaged at image size."""

    scales: list[PositiveFloat] = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    flip: bool = True


class BlpsegTrainConfig(Section):
    """The single-stage BLPSeg network trained on scribbles (BLPSeg Sect. III-IV; defaults are
    the paper's VOC settings). ``backbone`` ``resnet101`` (ImageNet weights in the paper;
    ``resnet18/34/50`` or a Swin name too) + UperNet fusion into ``channels`` (256, released),
    segmentation and scribble heads. ``lam``: the local aggregation module with ``sigma`` (6)
    on a window of ``radius`` stride-4 cells (18 = 3 sigma: the Gaussian is below 1.1% beyond)
    over a ``low_dim`` low-level embedding. ``blp``: the BL loss with ``gamma`` (2); off, the
    segmentation head gets plain partial CE (gamma 0: the ablation's baseline). WCE of the
    scribble head with ``unlabelled_weight`` (0.02) for the extra class. ``normalize``:
    ``printed`` (WCE / N, BL / N_seg, BLPSeg Eq. 1, 9) or ``released`` (the authors' code).
    Self-training from step ``self_training_from`` (10k; null: off): the segmentation head's
    own argmax over the image's scribbled classes where it is above ``self_training_threshold``
    (0.9, the released value; the paper says "sharpened into one-hot form"), scribbles kept.
    AdamW lr 3e-4 (the paper; the released config has 3e-5), weight decay 0.01, poly 0.9;
    40 epochs of batch 10 (``iterations`` overrides), random rescale 0.75-1.25, flip, crop
    384; mixed precision on CUDA."""

    backbone: str = "resnet101"
    weights: str = "none"  # none | imagenet | path (the backbone's torchvision state dict)
    channels: PositiveInt = 256
    low_dim: PositiveInt = 256
    lam: bool = True
    sigma: PositiveFloat = 6.0
    radius: PositiveInt = 18
    blp: bool = True
    gamma: Annotated[float, Field(ge=0.0)] = 2.0
    unlabelled_weight: Annotated[float, Field(ge=0.0)] = 0.02
    normalize: Literal["printed", "released"] = "printed"
    self_training_from: Annotated[int, Field(ge=0)] | None = 10000
    self_training_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    batch_size: PositiveInt = 10
    epochs: PositiveInt = 40
    iterations: PositiveInt | None = None
    lr: PositiveFloat = 3e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    poly_power: PositiveFloat = 0.9
    crop: Annotated[int, Field(ge=32)] = 384
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.75, 1.25)
    photometric: bool = True
    checkpoint_every: PositiveInt = 1000
    amp: bool = True

    @field_validator("backbone")
    @classmethod
    def _check_backbone(cls, value: str) -> str:
        known = ("resnet18", "resnet34", "resnet50", "resnet101", *SwinArch.__args__)
        if value not in known:
            raise ValueError(f"unknown backbone {value!r} (known: {', '.join(known)})")
        return value


class BlpsegEvalConfig(Section):
    """Val-split inference of the BLPSeg network (the LAM output; the scribble head is
    dropped): single scale as the paper's ablations; its state-of-the-art tables use scales
    0.5-1.25 (released) with flips."""

    scales: list[PositiveFloat] = [1.0]
    flip: bool = False


class RrmTrainConfig(SgdTrainConfig):
    """The single-stage RRM network trained from image tags (thesis Ch. 2; defaults are the
    thesis' VOC settings): a dilated ResNet of ``depth`` at stride 8 (the thesis: ResNet-38)
    shared by the classification branch and the segmentation branch (local sub-branch of
    ``local_channels``, two 3x3 convolutions of dilation ``local_dilation`` (12), R-FAM of
    ``attention_channels``; ``reweight: false`` = plain attention,
    Table 2.5). Loss Eq. 2.14-2.15: L_class + L_ce + ``lambda_energy`` L_energy + L_BCD, each
    switchable (``energy``, ``bcd``); ``ce``: L_ce as printed (Eq. 2.16, one CE over the reliable
    pixels) or as released (background and foreground CE averaged apart). Reliable labels online
    every step (Eq. 2.1-2.7): CAMs of the crop at ``cam_scales`` averaged, background
    ``(1 - max)^gamma`` (4), dense CRF with ``crf`` (PSA's values, "[18]"), the top ``reliable_ratio`` (40%) of
    each class where the CRF agrees; the CRFs of a batch run in ``crf_workers`` processes (0: one per core).
    The
    energy loss: sigma_d 100, sigma_r 15 (printed) on a square window of ``energy_radius`` at
    ``energy_scale`` x the crop (the released code's 0.5). ``cls_only_fraction``: the first
    share of the steps trains the classification branch alone (the released code: 0.3; the
    thesis is silent; labels from an untrained classifier are noise; 1: classification only, the plain
    CAM network, RRM's baseline). SGD lr 1e-3, weight
    decay 5e-4, the classifier at ``head_lr_mult`` x (as released), poly 0.9; rescale 0.7-1.3, flip, crop 321,
    batch 8, 40k iterations."""

    depth: Literal[18, 34, 50, 101] = 50
    local_channels: PositiveInt = 512
    local_dilation: PositiveInt = 12
    attention_channels: PositiveInt = 256
    reweight: bool = True
    lambda_energy: Annotated[float, Field(ge=0.0)] = 1.0
    ce: Literal["printed", "released"] = "released"
    energy: bool = True
    bcd: bool = True
    sigma_d: PositiveFloat = 100.0
    sigma_r: PositiveFloat = 15.0
    energy_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    energy_radius: PositiveInt = 5
    cam_scales: list[PositiveFloat] = [0.5, 1.0, 1.5, 2.0]
    gamma: PositiveFloat = 4.0
    reliable_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4
    crf: DenseCrfParams = Field(default_factory=DenseCrfParams)
    crf_workers: Annotated[int, Field(ge=0)] = 0
    cls_only_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    batch_size: PositiveInt = 8
    iterations: PositiveInt | None = 40000
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    crop: Annotated[int, Field(ge=32)] = 321
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.3)
    checkpoint_every: PositiveInt = 1000


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


class FewshotTrainConfig(SgdTrainConfig):
    """The few-shot method (``method: scl``; thesis Ch. 5, SCL): 1-shot episodes of the
    training classes on the train split. Classes: ``classes`` (null: every class but 0) shuffled
    by ``fold_seed`` and dealt into ``folds``; fold ``fold``'s classes are held out for the
    ``fewshot_eval`` episodes (val split), the rest train, with ``train_classes`` (never held
    out: e.g. the stuff classes when the folds are the thing classes). An image serves a class
    when it holds at least ``min_pixels`` of it. SclNet (:mod:`models.fewshot`): ResNet-``depth`` at stride 8
    (CANet: ResNet-50 from ImageNet), stage-2 + stage-3 features reduced to ``channels``; ``sgm``:
    the self-guided module (off: the CANet-style base). ``prior``: PFENet's prior mask in the query
    FPM (the thesis' SCL (PFENet) base; off: CANet's). ``held_out_pixels``: what the training
    masks make of the held-out classes' pixels, ``background`` (OSLSM / CANet: they are not the
    episode's class) or ``ignore`` (255: the network is never taught that a novel class is
    background). SGD lr 2.5e-3, momentum 0.9, weight decay 5e-4, poly 0.9, batch 4 episodes,
    rescale, flip and crop 321 of support and query each."""

    classes: list[int] | None = None
    train_classes: list[int] = []
    folds: Annotated[int, Field(ge=2)] = 4
    fold: Annotated[int, Field(ge=0)] = 0
    fold_seed: int = 0
    min_pixels: Annotated[int, Field(ge=1)] = 2 * 32 * 32
    channels: PositiveInt = 256
    sgm: bool = True
    prior: bool = False
    held_out_pixels: Literal["background", "ignore"] = "background"
    batch_size: PositiveInt = 4
    iterations: PositiveInt | None = 20000
    lr: PositiveFloat = 2.5e-3
    head_lr_mult: PositiveFloat = 1.0
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    crop: Annotated[int, Field(ge=32)] = 321
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.3)
    checkpoint_every: PositiveInt = 1000

    @model_validator(mode="after")
    def _check_fold(self) -> FewshotTrainConfig:
        if self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} is not one of the {self.folds} folds (0..{self.folds - 1})")
        return self


class FewshotEvalConfig(Section):
    """Test episodes of the held-out fold's classes on the val split, drawn with ``seed``:
    ``episodes`` per shot count in ``shots``; each has distinct support and query images. K > 1
    fuses the 1-shot model's predictions by the cross-guided module (Eq. 5.15-5.17). Scores as the
    thesis: the mean over classes of each class's IoU accumulated over its episodes, and FB-IoU;
    the prototype-only baseline (masked average pooling + cosine on the same encoder) beside it.
    Images at ``size`` on their short side (null: as they are)."""

    episodes: PositiveInt = 1000
    shots: list[PositiveInt] = [1, 5]
    seed: int = 0
    size: PositiveInt | None = None


class RrmEvalConfig(Section):
    """Val-split inference of the RRM network: the segmentation branch (softmax over ``scales``
    and ``flip``), then the dense CRF post-processing of the thesis (``crf``; the thesis cites
    DSRG's defaults, not printed: PSA's values here); the map without CRF and the plain
    CAM + CRF labels of the same network's classification branch (Eq. 2.5, the baseline RRM
    must beat) are written beside it."""

    scales: list[PositiveFloat] = [1.0]
    flip: bool = False
    crf_post: bool = True
    crf: DenseCrfParams = Field(default_factory=DenseCrfParams)


class RrmLabelsConfig(RrmEvalConfig):
    """Train-split inference of the RRM network (``rrm_labels``: its pseudo-labels, the
    thesis' two-step use): the same keys as ``rrm_eval``, the segmentation branch given the
    image's tags as the main map."""


class DaskConfig(Section):
    """``task_runner: dask``: Prefect's ``DaskTaskRunner`` on a Dask cluster. ``address``: an
    existing scheduler (``tcp://host:8786``; its workers must see the dataset and
    ``output_root`` at the same paths: a shared filesystem); absent, a local cluster of
    ``n_workers`` processes with ``threads_per_worker`` threads each is started for the run.
    ``resources`` (e.g. ``{GPU: 1}``): what a training stage's task asks for, so it runs on a
    worker started with them (``dask worker ... --resources GPU=1``); a local cluster gives
    each of its workers these resources."""

    address: str | None = None
    n_workers: PositiveInt = 2
    threads_per_worker: PositiveInt = 1
    resources: dict[str, PositiveFloat] = {}
    connect_timeout: PositiveFloat = 60.0  # seconds to wait for the first worker of an existing cluster


class Config(Section):
    """A whole run. Defaults are the built-in demo (boxes into the A²GNN pipeline on synthetic data).

    ``labels``: what the user has (``box | scribble | point | tags | masks``; null: the
    method's first); ``method``: what runs on them (:data:`stages.methods.METHODS`)."""

    run: str = "demo"
    output_root: str = "artifacts"
    labels: Literal[LABEL_KINDS] | None = None  # type: ignore[valid-type]
    method: str = "a2gnn"
    seed: int = 0
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    workers: Annotated[int, Field(ge=0)] = 0
    shard_size: PositiveInt = 16
    engine: Literal["prefect", "local"] = "prefect"
    task_runner: Literal["thread", "process", "dask"] = "thread"
    # torch threads in every process that runs stage code; 0: all cores in a single process,
    # cores / workers in each process-pool worker, the worker's OMP_NUM_THREADS under Dask
    threads: Annotated[int, Field(ge=0)] = 0
    lock: Literal["wait", "refuse"] = "wait"  # a stage another run is computing: wait for it, or stop
    min_usable: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # share of a training stage's images that must be usable
    # stage -> one line: why its figure can stay at or under its baseline on this data; the
    # quality ladder of `wsss demo` prints it beside such a figure
    notes: dict[str, str] = Field(default_factory=dict)
    dataset: DatasetConfig = Field(default_factory=DemoDataset)
    weak: WeakConfig = Field(default_factory=WeakConfig)
    box_seeds: BoxSeedsConfig = Field(default_factory=BoxSeedsConfig)
    cam_train: CamTrainConfig = Field(default_factory=CamTrainConfig)
    cam: CamConfig = Field(default_factory=CamConfig)
    seeds: SeedsConfig = Field(default_factory=SeedsConfig)
    affinity_train: AffinityTrainConfig = Field(default_factory=AffinityTrainConfig)
    graph: GraphConfig = Field(default_factory=GraphConfig)
    random_walk: RandomWalkConfig = Field(default_factory=RandomWalkConfig)
    a2gnn: A2gnnConfig = Field(default_factory=A2gnnConfig)
    crf: CrfConfig = Field(default_factory=CrfConfig)
    final_train: FinalTrainConfig = Field(default_factory=FinalTrainConfig)
    final_eval: FinalEvalConfig = Field(default_factory=FinalEvalConfig)
    instances: InstancesConfig = Field(default_factory=InstancesConfig)
    instance_train: InstanceTrainConfig = Field(default_factory=InstanceTrainConfig)
    dfr_train: DfrTrainConfig = Field(default_factory=DfrTrainConfig)
    dfr_eval: DfrEvalConfig = Field(default_factory=DfrEvalConfig)
    blpseg_train: BlpsegTrainConfig = Field(default_factory=BlpsegTrainConfig)
    blpseg_eval: BlpsegEvalConfig = Field(default_factory=BlpsegEvalConfig)
    rrm_train: RrmTrainConfig = Field(default_factory=RrmTrainConfig)
    rrm_eval: RrmEvalConfig = Field(default_factory=RrmEvalConfig)
    rrm_labels: RrmLabelsConfig = Field(default_factory=RrmLabelsConfig)
    spml_train: SpmlTrainConfig = Field(default_factory=SpmlTrainConfig)
    spml: SpmlConfig = Field(default_factory=SpmlConfig)
    fewshot_train: FewshotTrainConfig = Field(default_factory=FewshotTrainConfig)
    fewshot_eval: FewshotEvalConfig = Field(default_factory=FewshotEvalConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)

    @field_validator("run")
    @classmethod
    def _check_run(cls, value: str) -> str:
        return safe_name(value, "run name")

    @model_validator(mode="after")
    def _resolve(self) -> Config:
        """Check the (labels, method) pair and fill the defaults that follow from it, so the
        saved ``config.yaml`` is what ran: the labels (the method's first kind), what the
        random walk propagates (CAMs for tags and points with CAMs, else the seeds), the
        affinity radius (4 for boxes, 5 otherwise, as released) and A²GNN's schedule
        (:data:`A2GNN_RELEASED`), its box-only terms off for other labels, and edge lists
        for the torch_geometric baselines."""
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r} (known: {', '.join(METHODS.names())})")
        if self.labels is None:
            self.labels = METHODS.get(self.method).labels[0]
        try:
            check_pair(self.labels, self.method)
        except ValueError as err:
            raise ValueError(f"labels: {err}") from None
        pipeline = "a2gnn" in METHODS.get(self.method).family()
        if pipeline and self.labels == "tags" and not self.cam.enabled:
            raise ValueError("labels 'tags' need CAMs: cam.enabled must be true")
        if self.random_walk.source == "cam" and not self.cam.enabled:
            raise ValueError("random_walk.source 'cam' needs CAMs: cam.enabled must be true")
        box = self.labels == "box"
        if self.random_walk.source == "auto":
            tags_or_points = pipeline and self.labels in ("tags", "point")
            self.random_walk.source = "cam" if tags_or_points and self.cam.enabled else "seeds"
        if self.affinity_train.radius is None:
            self.affinity_train.radius = 4 if box else 5
        a2gnn = self.a2gnn
        for key, value in A2GNN_RELEASED["box" if box else "other"].items():
            if getattr(a2gnn, key) is None:
                setattr(a2gnn, key, value)
        if not box:
            a2gnn.mp = a2gnn.consistency = a2gnn.box_constraint = False
        if a2gnn.layer != "a2gnn":
            a2gnn.path = "edges"
        return self

    def run_dir(self) -> Path:
        return Path(self.output_root) / self.run

    def section(self, name: str) -> dict[str, Any]:
        """The JSON-able config slice of a stage (or ``dataset``/``weak``)."""
        value = getattr(self, name, None)
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else {}


# --------------------------------------------------------------------------- loading
def _set_dotted(data: dict[str, Any], dotted: str, raw: str, source: str) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"{source}: bad override key '{dotted}'")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def parse_overrides(items: list[str] | None) -> list[tuple[str, str]]:
    """``["a.b=1", ...]`` -> ``[("a.b", "1"), ...]``."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. crf.iterations=5)")
        key, value = item.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out


def _format_errors(err: ValidationError, source: str, overridden: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        if len(parts) > 1 and parts[0] == "dataset" and parts[1] in ("demo", "masks", "voc"):
            parts.pop(1)  # the discriminator tag pydantic inserts; the key is dataset.<field>
        loc = ".".join(parts)
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        value = "" if e["type"] == "extra_forbidden" or not loc else f" (got {e.get('input')!r})"
        origin = f" (from --set {loc}={overridden[loc]})" if loc in overridden else ""
        lines.append(f"{source}: {loc}: {msg}{value}{origin}" if loc else f"{source}: {msg}")  # whole-config checks
    return "\n".join(lines)


# Keys that moved: (section or None for the top level, key) -> what to write instead.
MOVED = {
    (None, "task"): "method: scl (for task: fewshot)",
    ("spml_train", "enabled"): "method: spml",
    ("dfr_train", "labels"): "the top-level labels: (scribble or point)",
    ("blpseg_train", "labels"): "the top-level labels: (scribble or point)",
}


def _check_moved_keys(data: dict[str, Any], source: str) -> None:
    """One line for a key of an older config: what replaced it."""
    if "supervision" in data:
        old = data["supervision"]
        instead = OLD_SUPERVISION.get(str(old), "labels: and method:")
        raise ConfigError(
            f"{source}: supervision: was split into labels: (what you have) and method: (what runs); "
            f"for supervision: {old} write {instead}"
        )
    for (section, key), instead in MOVED.items():
        node = data if section is None else data.get(section)
        if isinstance(node, dict) and key in node:
            where = key if section is None else f"{section}.{key}"
            raise ConfigError(f"{source}: {where}: this key is gone; write {instead}")


def config_from_dict(data: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None) -> Config:
    data = (
        expand_bases(copy.deepcopy(data or {}), Path.cwd(), source)
        if BASE_KEY in (data or {})
        else copy.deepcopy(data or {})
    )
    pairs = parse_overrides(overrides)
    for key, value in pairs:
        _set_dotted(data, key, value, f"{source} (--set {key}={value})")
    _check_moved_keys(data, source)
    if isinstance(data.get("dataset"), dict):
        data["dataset"].setdefault("kind", "demo")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, dict(pairs))) from None


BASE_KEY = "_base_"  # a config file (or a list of them) this one is written over
DELETE_KEY = "_delete_"  # in a mapping: replace the base's mapping instead of merging into it


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, recursively; anything else
    (lists included) replaces, as does a mapping with ``_delete_: true`` (mmseg's rule)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict):
            start = out.get(key) if isinstance(out.get(key), dict) and not value.get(DELETE_KEY) else {}
            out[key] = merge_config(start, {k: v for k, v in value.items() if k != DELETE_KEY})
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_mapping(path: Path, mentioned_by: str | None) -> dict[str, Any]:
    where = f"{mentioned_by}: {BASE_KEY}: {path}" if mentioned_by else str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a text (UTF-8) file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    return data


def expand_bases(data: dict[str, Any], here: Path, source: str, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``data`` with its ``_base_`` files (one path or a list, relative to the folder
    ``here``) merged in order under it, each base expanded the same way first."""
    bases = data.get(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{source}: {BASE_KEY}: expected a file name or a list of them")
    merged: dict[str, Any] = {}
    for name in bases:
        path = (here / name).resolve()
        if path in chain:
            raise ConfigError(
                f"{source}: {BASE_KEY}: {name} includes itself (through {' -> '.join(p.name for p in chain)})"
            )
        base = _read_mapping(path, source)
        merged = merge_config(merged, expand_bases(base, path.parent, str(path), chain + (path,)))
    return merge_config(merged, {k: v for k, v in data.items() if k != BASE_KEY})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file stands for: its bases merged, its own keys on top."""
    path = Path(path)
    return expand_bases(_read_mapping(path, None), path.resolve().parent, str(path), (path.resolve(),))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (``None``: the built-in demo) with its bases, apply overrides, validate."""
    if path is None:
        return config_from_dict({}, "<built-in demo>", overrides)
    return config_from_dict(read_config_file(path), str(path), overrides)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

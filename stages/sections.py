"""The config sections' shared parts: the :class:`Section` base (unknown keys are errors,
assignments validated) and the blocks several stages' sections are built from. Each stage
defines its own section next to its code (``StageSpec.section``); ``pipeline.config``
composes the run's config from the registered stages. No torch here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from models.params import CrfParams


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DenseCrfParams(CrfParams, Section):
    """Dense CRF kernels (defaults: PSA's ``crf_inference``, which A2GNN's seeds follow)."""


class InferenceCrfParams(DenseCrfParams):
    """Dense CRF at inference: the released A²GNN inference parameters (its ``crf_inference``
    call on the propagated probabilities), which are sharper than PSA's seed CRF."""

    gaussian_sxy: PositiveFloat = 2.0
    bilateral_sxy: PositiveFloat = 50.0
    bilateral_srgb: PositiveFloat = 5.0


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


class SlicConfig(Section):
    """SLIC superpixels (scikit-image) for expanding scribbles and points."""

    n_segments: PositiveInt = 400
    compactness: PositiveFloat = 10.0
    sigma: Annotated[float, Field(ge=0.0)] = 1.0


SwinArch = Literal["swin_t", "swin_s", "swin_b", "swin_mini"]


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

"""Validated hyper-parameter sets read by the numerics in :mod:`models`.

The config sections that set them (``pipeline.config``) are subclasses, so a section is
passed to the numerics as it is and every field and default lives here once. No torch.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt


class CrfParams(BaseModel):
    """The kernels of Kraehenbuehl & Koltun's dense CRF (defaults: PSA's ``crf_inference``,
    which A2GNN's seeds follow). Config sections that set a CRF are subclasses of this."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    gaussian_sxy: PositiveFloat = 3.0
    gaussian_compat: PositiveFloat = 3.0
    bilateral_sxy: PositiveFloat = 80.0
    bilateral_srgb: PositiveFloat = 13.0
    bilateral_compat: PositiveFloat = 10.0
    iterations: PositiveInt = 10


class DfrTerms(BaseModel):
    """Which terms of DFR Eq. 1 are on, and their hyper-parameters (DFR Sect. 4.2 defaults).

    ``dfr``: L_dfr on the segmentation head (off = pCE only); ``kernel_xy`` /
    ``kernel_rgb`` / ``kernel_feature``: the three factors of K (DFR Eq. 6, Table 5);
    ``fd`` / ``fr``: the feature-head losses (Table 4). pCE + Potts (Tang et al.) = ``dfr``
    with ``kernel_feature``, ``fd`` and ``fr`` off. The ``dfr_train`` config section is a
    subclass, so the loss reads the validated config itself.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dfr: bool = True
    kernel_xy: bool = True
    kernel_rgb: bool = True
    kernel_feature: bool = True
    fd: bool = True
    fr: bool = True
    radius: PositiveInt = 5
    sigma_xy: PositiveFloat = 6.0
    sigma_rgb: PositiveFloat = 0.5
    sigma_feat: PositiveFloat = 50.0
    gamma: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.98
    lambda_dfr: Annotated[float, Field(ge=0.0)] = 1e-2
    lambda_feat: Annotated[float, Field(ge=0.0)] = 1e-3

    @property
    def uses_features(self) -> bool:
        """Whether the feature consistency head takes part (Table 5: without the deep-feature
        term the whole head is removed)."""
        return (self.dfr and self.kernel_feature) or self.fd or self.fr

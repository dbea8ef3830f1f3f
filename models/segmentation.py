"""The segmentation models: DeepLabV3 trained on pseudo-labels (thesis Sect. 3.4-3.5) and
the single-stage DFR network trained on scribbles (DFR paper Sect. 3, 4.2).

:class:`DeepLab` wraps torchvision's DeepLabV3 (ASPP head, output stride 8 for ResNets,
16 for MobileNetV3) behind one interface: ``forward`` takes 0..255 RGB and returns logits
at the input size; :meth:`DeepLab.param_groups` splits backbone and head so the head can
train at 10x the backbone's learning rate (DeepLab's convention).

``weights`` applies to the backbone only (the head is always new): ``none``, ``imagenet``
(torchvision's ImageNet file from the torch hub cache; never downloaded) or a path. As
with :class:`models.backbones.ResNetBackbone`, a pretrained backbone keeps its BatchNorm
statistics frozen.

:class:`DfrNet`: Swin backbone (:class:`models.backbones.SwinBackbone`) -> UperNet fusion
(:class:`UperFusion`: pyramid pooling on the deepest stage + FPN over the chosen stages,
concatenated at stride 4 and fused by a 3x3 conv) -> one shared map feeding the semantic
head (dropout 0.1 + 1x1 conv -> P) and the feature consistency head (1x1 conv + ReLU -> F,
d = 128).

:class:`BlpNet` (BLPSeg Fig. 4, Sect. IV-B): a backbone (ResNet as the paper, or Swin) ->
the same :class:`UperFusion` -> two heads of two "1x1 conv + BN + ReLU" layers and a
classifier: segmentation (K) and scribble (K+1, the extra "unlabelled" class; fed the fused
map without gradient, as released, so only the segmentation loss trains the trunk). The
segmentation logits are locally aggregated (:func:`models.blpseg.lam`) by a low-level
embedding of the image (4x4 conv, stride 4, + LayerNorm) on the stride-4 grid.

One network per module: :mod:`models.deeplab`, :mod:`models.dfr_net`, :mod:`models.blp_net`,
:mod:`models.rrm_net`, :mod:`models.spml_net` (shared fusion: :mod:`models.uper`); this module
holds the multi-scale + flip inference they share and names them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .backbones import (
    multiscale_sum,
)
from .blp_net import BlpNet, LowLevelEmbed  # noqa: F401 (re-exported)
from .deeplab import ARCHS, DeepLab  # noqa: F401 (re-exported)
from .dfr_net import DfrNet  # noqa: F401 (re-exported)
from .rrm_net import RrmNet  # noqa: F401 (re-exported)
from .spml_net import SpmlNet  # noqa: F401 (re-exported)
from .uper import UperFusion  # noqa: F401 (re-exported)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    image: np.ndarray,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Class probabilities (C, H, W) float32 of an RGB uint8 image: the softmax averaged over
    ``scales`` (and their horizontal flips), each resized bilinearly to the image."""
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float().to(device)
    total = multiscale_sum(lambda batch: torch.softmax(model(batch).float(), 1), x, scales, flip)
    return (total / (len(scales) * (2 if flip else 1))).cpu().numpy().astype(np.float32)

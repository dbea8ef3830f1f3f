"""The single-stage BLPSeg network (BLPSeg Sect. III): backbone + UperNet fusion, scribble head,
segmentation head through the local aggregation module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import (
    ResNetBackbone,
    SwinBackbone,
    normalize,
)
from .blpseg import lam
from .dfr_net import DfrNet
from .uper import UperFusion, two_layer_head


class LowLevelEmbed(nn.Module):
    """f of BLPSeg Eq. 5: a 4x4 conv with stride 4 and LayerNorm over channels (the stride-4 grid)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = images.shape[-2:]
        x = self.proj(F.pad(images, (0, -w % 4, 0, -h % 4)))
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class BlpNet(nn.Module):
    """The BLPSeg network (BLPSeg Fig. 4): ``backbone`` ``resnet18/50/101`` (output stride 32,
    as the released UperNet) or a Swin name; LAM with ``sigma`` and window ``radius`` on the
    stride-4 grid (``lam: false`` leaves it out, the ablation's baseline)."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        weights: str = "none",
        channels: int = 256,
        low_dim: int = 64,
        sigma: float = 6.0,
        radius: int = 18,
        use_lam: bool = True,
    ) -> None:
        super().__init__()
        if backbone.startswith("resnet"):
            self.backbone = ResNetBackbone(int(backbone[6:]), 32, weights)
        else:
            self.backbone = SwinBackbone(backbone, weights)
        self.fusion = UperFusion(self.backbone.channels, (1, 2, 3, 4), channels)
        self.seg_head = two_layer_head(channels, num_classes)
        self.scribble_head = two_layer_head(channels, num_classes + 1)
        self.embed = LowLevelEmbed(low_dim) if use_lam else None
        self.sigma, self.radius, self.num_classes = sigma, radius, num_classes

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) 0..255 -> (segmentation logits after LAM, scribble logits), both on the
        stride-4 grid."""
        x = normalize(images)
        shared = self.fusion(self.backbone(x))
        seg = self.seg_head(shared)
        if self.embed is not None:
            seg = lam(seg, self.embed(x, tuple(seg.shape[-2:])), self.sigma, self.radius)
        return seg, self.scribble_head(shared.detach())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Inference: segmentation logits (after LAM) at the input size."""
        seg, _ = self.forward_train(images)
        return F.interpolate(seg, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return DfrNet.param_groups(self)

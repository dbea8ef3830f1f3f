"""The single-stage DFR network (DFR Sect. 3): Swin + UperNet fusion, semantic head and
feature consistency head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import (
    SwinBackbone,
    normalize,
)
from .uper import UperFusion


class DfrNet(nn.Module):
    """The DFR network (Fig. 1-2): Swin -> :class:`UperFusion` -> shared map X;
    ``P = softmax(conv1x1(dropout(X)))`` (semantic head), ``F = ReLU(conv1x1(X))``, d =
    ``feature_dim`` channels (feature consistency head, training only)."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        weights: str = "none",
        stages: Sequence[int] = (1, 2, 3, 4),
        channels: int = 512,
        feature_dim: int = 128,
        feature_head: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = SwinBackbone(backbone, weights)
        self.fusion = UperFusion(self.backbone.channels, stages, channels)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))
        self.feature_head = nn.Sequential(nn.Conv2d(channels, feature_dim, 1), nn.ReLU()) if feature_head else None
        self.num_classes = num_classes

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 3, H, W) 0..255 -> (logits, F) on the stride-4 grid (F is None without the head)."""
        shared = self.fusion(self.backbone(normalize(images)))
        feats = self.feature_head(shared) if self.feature_head is not None else None
        return self.classifier(shared), feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Inference (no feature head): logits (N, C, H, W), bilinear from the grid."""
        logits = self.classifier(self.fusion(self.backbone(normalize(images))))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decayed, not decayed): norms, biases and Swin's relative position tables get no
        weight decay (mmseg's Swin recipe)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or "relative_position_bias_table" in name or "norm" in name
            (no_decay if skip else decay).append(p)
        return decay, no_decay

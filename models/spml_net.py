"""SPML's embedding network (Ke et al.): dilated ResNet + PSP pooling + a 1x1 to the embedding,
and the softmax classifier beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import (
    ResNetBackbone,
    normalize,
)
from .uper import UperFusion


class SpmlNet(nn.Module):
    """SPML's embedding network (the released ``resnet_pspnet``): a ResNet of ``depth`` at output
    stride 8, PSPNet's pyramid pooling on its last stage (:class:`UperFusion` over stage 4 alone:
    PPM + 3x3 bottleneck, resized to the stride-4 grid, the released 2x upsampling) and a 1x1
    convolution to ``dim`` channels (64 on VOC): the pixel embedding e (normalised by its users).
    Beside it the softmax classifier (released ``segsort_softmax``): 3x3 conv to 2 ``dim`` + BN +
    ReLU + dropout 0.75 + 1x1 to K on the *detached*, normalised embedding, so it never trains
    the embedding."""

    def __init__(self, depth: int, num_classes: int, weights: str = "none", channels: int = 512, dim: int = 64) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(depth, 8, weights)
        self.fusion = UperFusion(self.backbone.channels, (4,), channels)
        self.embed = nn.Conv2d(channels, dim, 1)
        self.classifier = nn.Sequential(
            nn.Conv2d(dim, 2 * dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * dim),
            nn.ReLU(inplace=True),
            nn.Dropout(0.75),
            nn.Conv2d(2 * dim, num_classes, 1),
        )
        self.num_classes = num_classes

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) 0..255 -> raw embedding (N, dim, H/4, W/4)."""
        return self.embed(self.fusion(self.backbone(normalize(images))))

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw embedding, classifier logits on the detached normalised embedding), both on the
        stride-4 grid."""
        emb = self.embedding(images)
        return emb, self.classifier(F.normalize(emb.detach(), dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Inference: the classifier's logits at the input size."""
        logits = self.classifier(F.normalize(self.embedding(images), dim=1))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, new layers): the released rates are 1x and 10x."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]

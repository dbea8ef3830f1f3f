"""torchvision's DeepLabV3 as the final segmentation model (thesis Sect. 3.5), its ASPP taps
that can only read padding skipped (:mod:`models.dilated`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import (
    WeightsError,
    freeze_batchnorm,
    load_state,
    normalize,
)
from .dilated import prune_dead_taps
from .tvcompat import load_torchvision

# arch -> (torchvision builder, ImageNet classifier whose weights seed the backbone, key prefix
# of the classifier's backbone in its own state dict)
ARCHS = {
    "deeplabv3_resnet50": ("deeplabv3_resnet50", "resnet50", ""),
    "deeplabv3_resnet101": ("deeplabv3_resnet101", "resnet101", ""),
    "deeplabv3_mobilenet_v3_large": ("deeplabv3_mobilenet_v3_large", "mobilenet_v3_large", "features."),
}


class DeepLab(nn.Module):
    """torchvision DeepLabV3 (no auxiliary head): ``logits = up(head(backbone(norm(x))))``."""

    def __init__(self, arch: str, num_classes: int, weights: str = "none") -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown segmentation arch '{arch}' (known: {', '.join(ARCHS)})")
        builder, classifier, prefix = ARCHS[arch]
        net = getattr(load_torchvision().models.segmentation, builder)(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )
        state = load_state(weights, classifier)
        if state is not None:
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            missing, unexpected = net.backbone.load_state_dict(state, strict=False)
            if missing:
                raise WeightsError(
                    f"weights '{weights}' do not fit the {classifier} backbone of {arch}: missing {missing[:4]}"
                )
        prune_dead_taps(net)  # ASPP's rates exceed the head's grid on small crops
        self.backbone, self.head = net.backbone, net.classifier
        self.arch, self.num_classes = arch, num_classes
        self.pretrained = state is not None
        if not self.pretrained:
            # torchvision's MobileNetV3 uses BatchNorm momentum 0.01, tuned for long ImageNet
            # runs; a short run from scratch then evaluates with near-initial running
            # statistics (all background on the demo). PyTorch's default 0.1 tracks them.
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.1

    def train(self, mode: bool = True) -> DeepLab:
        super().train(mode)
        if self.pretrained:
            freeze_batchnorm(self.backbone)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in 0..255 -> (N, C, H, W) logits (bilinear from the head's stride)."""
        feats = self.backbone(normalize(images))["out"]
        return F.interpolate(self.head(feats), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head): the head trains at ``head_lr_mult`` x the backbone's rate."""
        return (
            [p for p in self.backbone.parameters() if p.requires_grad],
            [p for p in self.head.parameters() if p.requires_grad],
        )

"""The RRM network (thesis Ch. 2): a dilated ResNet shared by the classification branch and the
local and global segmentation sub-branches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import (
    ResNetBackbone,
    normalize,
)


class RrmNet(nn.Module):
    """The RRM network (thesis Fig. 2.1, Sect. 2.3.1): a dilated ResNet of ``depth`` at output
    stride 8 (the thesis: ResNet-38 with dilated last blocks) shared by

    - the classification branch: GAP + bias-free 1x1 over the K-1 foreground classes, whose
      weights also give the CAMs (Eq. 2.1);
    - the local sub-branch: two 3x3 convolutions of dilation 12 (``local_channels`` = 512, then
      K), P_l, its hidden map F_l;
    - the global sub-branch: :class:`models.rrm.RFAM` (``attention_channels`` = 256) then two
      3x3 convolutions (256, K), P_g; F_g is the R-FAM output.

    Segmentation logits ``(P_l + P_g) / 2`` (Eq. 2.13, softmax taken by the losses) and the
    BCD features F_m = concat(F_l, F_g) (Eq. 2.22)."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        weights: str = "none",
        local_channels: int = 512,
        attention_channels: int = 256,
        reweight: bool = True,
        dilation: int = 12,
    ) -> None:
        super().__init__()
        from .rrm import RFAM

        self.backbone = ResNetBackbone(depth, 8, weights)
        c = self.backbone.channels[-1]
        self.classifier = nn.Conv2d(c, num_classes - 1, 1, bias=False)
        self.local1 = nn.Conv2d(c, local_channels, 3, padding=dilation, dilation=dilation)
        self.local2 = nn.Conv2d(local_channels, num_classes, 3, padding=dilation, dilation=dilation)
        self.rfam = RFAM(c, attention_channels, reweight)
        self.global1 = nn.Conv2d(self.rfam.out_channels, attention_channels, 3, padding=1, bias=False)
        self.global2 = nn.Conv2d(attention_channels, num_classes, 3, padding=1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform new layers, as released."""
        for m in (self.classifier, self.local1, self.local2, self.global1, self.global2):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(normalize(images))[-1]

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        """ReLU'd class activation maps (N, K-1, h, w) at stride 8 (Eq. 2.1)."""
        return F.relu(self.classifier(self.features(images)))

    def heads(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output from the backbone map ``f``: class ``logits`` (N, K-1) (GAP then the
        1x1, = the mean of the un-rectified CAM), ``cam`` (ReLU), segmentation ``seg`` (N, K, h, w)
        and BCD ``feats`` F_m."""
        seg, f_l, f_g = self.segment(f)
        act = self.classifier(f)
        return {"logits": act.mean((2, 3)), "cam": F.relu(act), "seg": seg, "feats": torch.cat([f_l, f_g], 1)}

    def segment(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(segmentation logits (P_l + P_g) / 2, F_l, F_g) of the backbone map ``f``."""
        f_l = F.relu(self.local1(f))
        f_g = self.rfam(f)
        return (self.local2(f_l) + self.global2(F.relu(self.global1(f_g)))) / 2, f_l, f_g

    def forward_train(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) 0..255 -> :meth:`heads` of its backbone map."""
        return self.heads(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Inference: segmentation logits at the input size (the classification branch unused)."""
        seg = self.segment(self.features(images))[0]
        return F.interpolate(seg, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(everything else, the classifier): as released, only the classifier is a
        "from-scratch" layer at ``head_lr_mult`` x the rate; the segmentation branch trains at
        the backbone's rate."""
        head = list(self.classifier.parameters())
        ids = {id(p) for p in head}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in ids], head

"""The UperNet fusion (PPM on the deepest chosen stage + FPN over the others, at stride 4) and
the small heads the single-stage networks share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """mmseg's ConvModule: conv (no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class UperFusion(nn.Module):
    """UperNet's feature fusion (Xiao et al. 2018, as mmseg's ``UPerHead`` up to
    ``fpn_bottleneck``) over the backbone stages in ``stages`` (1-based, Table 6 of DFR):

    ``L_top = conv3x3([x_top, up(conv1x1(pool_s(x_top))) for s in pool_scales])`` (PPM),
    ``L_k = conv1x1(x_k) + up(L_{k+1})`` top-down, ``O_k = conv3x3(L_k)`` (``O_top = L_top``),
    ``out = conv3x3(concat_k up(O_k))`` at the shallowest chosen stage, then resized to the
    stride-4 grid of stage 1 so every choice yields the same map size.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        stages: Sequence[int] = (1, 2, 3, 4),
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        self.stages = sorted(set(stages))
        if not self.stages or not set(self.stages) <= {1, 2, 3, 4}:
            raise ValueError(f"fusion stages must be a non-empty subset of 1-4, got {list(stages)}")
        cins = [in_channels[s - 1] for s in self.stages]
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(p), conv_bn_relu(cins[-1], channels, 1)) for p in pool_scales
        )
        self.ppm_bottleneck = conv_bn_relu(cins[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in cins[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in cins[:-1])
        self.bottleneck = conv_bn_relu(len(cins) * channels, channels, 3)
        self.channels = channels

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        xs = [feats[s - 1] for s in self.stages]
        top = xs[-1]
        pooled = [F.interpolate(m(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for m in self.ppm]
        levels = [conv(x) for conv, x in zip(self.laterals, xs[:-1])] + [
            self.ppm_bottleneck(torch.cat([top, *pooled], 1))
        ]
        for k in range(len(levels) - 1, 0, -1):
            levels[k - 1] = levels[k - 1] + F.interpolate(
                levels[k], size=levels[k - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.bottleneck(
            torch.cat(
                [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]], 1
            )
        )
        grid = feats[0].shape[-2:]
        return (
            fused if fused.shape[-2:] == grid else F.interpolate(fused, size=grid, mode="bilinear", align_corners=False)
        )


def two_layer_head(channels: int, out: int) -> nn.Sequential:
    """BLPSeg's heads: two "1x1 conv + BN + ReLU" layers, then a 1x1 classifier to ``out``."""
    return nn.Sequential(
        conv_bn_relu(channels, channels, 1), conv_bn_relu(channels, channels, 1), nn.Conv2d(channels, out, 1)
    )

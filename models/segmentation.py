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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import tvcompat  # noqa: F401  (before torchvision: CPU-only torch)
import torchvision  # noqa: E402
from torch import nn

from .backbones import (
    ResNetBackbone,
    SwinBackbone,
    WeightsError,
    freeze_batchnorm,
    load_state,
    multiscale_sum,
    normalize,
)
from .blpseg import lam
from .dilated import prune_dead_taps

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
        net = getattr(torchvision.models.segmentation, builder)(
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


def two_layer_head(channels: int, out: int) -> nn.Sequential:
    """BLPSeg's heads: two "1x1 conv + BN + ReLU" layers, then a 1x1 classifier to ``out``."""
    return nn.Sequential(
        conv_bn_relu(channels, channels, 1), conv_bn_relu(channels, channels, 1), nn.Conv2d(channels, out, 1)
    )


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

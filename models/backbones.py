"""Feature extractors: torchvision ResNets with dilated last stages.

``weights``: ``none`` (random init), ``imagenet`` (torchvision's IMAGENET1K_V1 file, read
from the torch hub cache, never downloaded: a missing file is a :class:`WeightsError`
telling the user where to put it), or a path to a state dict (a plain ``state_dict``, or a
checkpoint with a ``state_dict``/``model`` entry; ``fc.*`` keys are ignored).

Dilation follows DeepLab: a stage that would halve the resolution keeps it instead and
its 3x3 convolutions get dilation ``d`` (padding ``d``), so the receptive field grows as if
it had been strided::

    output_stride 32: strides 2,2,2 in layer2..4   (plain ResNet)
    output_stride 16: layer4 dilation 2
    output_stride  8: layer3 dilation 2, layer4 dilation 4
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from torch import nn

from .tvcompat import load_torchvision

DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class WeightsError(FileNotFoundError):
    """Pretrained weights were asked for but are not on disk (nothing is downloaded)."""


def _imagenet_file(arch: str) -> tuple[Path, str]:
    enum = load_torchvision().models.get_model_weights(arch)
    url = enum.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def weights_path(weights: str, arch: str) -> Path | None:
    """The file ``weights`` names (``none`` -> None); a :class:`WeightsError` if it is not
    on disk. Never downloads."""
    if weights == "none":
        return None
    if weights == "imagenet":
        path, url = _imagenet_file(arch)
        if not path.is_file():
            raise WeightsError(
                f"ImageNet weights for {arch} are not in the torch hub cache ({path}); this project never "
                f"downloads at run time. Fetch {url} into that folder (or set TORCH_HOME), pass a file with "
                f"weights: /path/to/{os.path.basename(url)}, or use weights: none"
            )
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found (weights: none | imagenet | <path>)")
    return path


def load_state(weights: str, arch: str) -> dict[str, torch.Tensor] | None:
    """The state dict ``weights`` names (``none`` -> None); never downloads."""
    path = weights_path(weights, arch)
    if path is None:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling problem is a bad file
        raise WeightsError(f"{path}: not a readable torch state dict ({err})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 stage with dilated 3x3 convolutions."""
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride == (2, 2):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


class ResNetBackbone(nn.Module):
    """ResNet stem + 4 stages; ``forward`` returns the outputs of the stages.

    ``channels[k]`` is the width of stage k+1's output (64/128/256/512 for depth 18/34,
    x4 for 50/101); ``output_stride`` is the stride of the last one.
    """

    def __init__(self, depth: int = 50, output_stride: int = 16, weights: str = "none") -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        arch = DEPTHS[depth]
        net = getattr(load_torchvision().models, arch)(weights=None)
        state = load_state(weights, arch)
        if state is not None:
            missing, unexpected = net.load_state_dict(state, strict=False)
            if [k for k in missing if not k.startswith("fc.")] or unexpected:
                raise WeightsError(
                    f"weights '{weights}' do not fit {arch}: missing {missing[:4]}, unexpected {unexpected[:4]}"
                )
        if output_stride <= 16:
            _dilate(net.layer4, 2 if output_stride == 16 else 4)
        if output_stride == 8:
            _dilate(net.layer3, 2)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        width = 1 if depth < 50 else 4
        self.channels = [64 * width, 128 * width, 256 * width, 512 * width]
        self.output_stride = output_stride
        self.pretrained = state is not None

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Pretrained backbones keep their BatchNorm statistics frozen in training."""
        super().train(mode)
        if self.pretrained:
            freeze_batchnorm(self)
        return self

    def forward(self, x: torch.Tensor, stages: int = 4) -> list[torch.Tensor]:
        """The outputs of the first ``stages`` stages (a network that reads no later one skips
        its cost)."""
        out = []
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[:stages]:
            x = layer(x)
            out.append(x)
        return out


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8/float RGB (N, 3, H, W) in 0..255 -> ImageNet-normalised float."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode with frozen affine parameters (pretrained backbones:
    the statistics of a small batch of crops would only damage the ImageNet ones)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def multiscale_sum(
    fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scales: Sequence[float], flip: bool
) -> torch.Tensor:
    """``sum_s sum_f up(fn(f(resize_s(x))))``: ``fn`` maps (B, 3, h, w) images to (B, K, h', w')
    maps; each scale (and its horizontal flip, flipped back) is resized bilinearly to the
    (1, 3, H, W) ``image``'s size and summed into one (K, H, W) map."""
    h, w = image.shape[-2:]
    total = None
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        xs = F.interpolate(image, size=size, mode="bilinear", align_corners=False) if s != 1.0 else image
        maps = fn(torch.cat([xs, xs.flip(-1)]) if flip else xs)
        maps = maps[0:1] + maps[1:2].flip(-1) if flip else maps
        up = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[0]
        total = up if total is None else total + up
    return total


# --------------------------------------------------------------------------- Swin
# name -> (torchvision builder whose ImageNet file seeds it, or None for the demo-only size)
SWINS = {"swin_t": "swin_t", "swin_s": "swin_s", "swin_b": "swin_b", "swin_mini": None}


def swin_weights_path(arch: str, weights: str) -> Path | None:
    """:func:`weights_path` for a Swin of :data:`SWINS`; the demo-sized one has no
    pretrained weights, so anything but ``none`` is a :class:`WeightsError`."""
    if arch not in SWINS:
        raise ValueError(f"unknown Swin '{arch}' (known: {', '.join(SWINS)})")
    if SWINS[arch] is None:
        if weights != "none":
            raise WeightsError(
                f"{arch} is a demo-sized Swin without pretrained weights; use weights: none or swin_t / swin_s / swin_b"
            )
        return None
    return weights_path(weights, SWINS[arch])


class SwinBackbone(nn.Module):
    """torchvision Swin Transformer as a 4-stage feature extractor (strides 4, 8, 16, 32),
    each stage's output layer-normalised and returned NCHW, as mmseg's Swin for UperNet.

    ``arch``: ``swin_t`` / ``swin_s`` / ``swin_b`` (torchvision's, ImageNet-1k weights from
    the hub cache with ``weights: imagenet``; a path must hold a torchvision-layout Swin
    state dict) or ``swin_mini`` (embed 32, depths 2-2-2-2, heads 1-2-4-8: a CPU-sized
    variant for the demo and tests, ``weights: none`` only). Inputs of any size: the patch
    merging pads odd sides.
    """

    def __init__(self, arch: str = "swin_t", weights: str = "none") -> None:
        super().__init__()
        swin_weights_path(arch, weights)
        if SWINS[arch] is None:
            SwinTransformer = load_torchvision().models.swin_transformer.SwinTransformer

            net, state = (
                SwinTransformer([4, 4], 32, [2, 2, 2, 2], [1, 2, 4, 8], [7, 7], stochastic_depth_prob=0.1),
                None,
            )
        else:
            net = getattr(load_torchvision().models, arch)(weights=None)
            state = load_state(weights, arch)
            if state is not None:
                missing, _ = net.load_state_dict(state, strict=False)
                if [k for k in missing if not k.startswith(("head.", "norm."))]:
                    raise WeightsError(f"weights '{weights}' do not fit torchvision's {arch}: missing {missing[:4]}")
        self.features = net.features
        first = net.features[0][0].out_channels
        self.channels = [first, first * 2, first * 4, first * 8]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)
        self.pretrained = state is not None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) normalised images -> 4 maps (N, C_k, ~H/2^(k+2), ~W/2^(k+2))."""
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 2 == 1:  # features = [embed, stage1, merge, stage2, merge, stage3, merge, stage4]
                outs.append(self.norms[i // 2](x).permute(0, 3, 1, 2).contiguous())
        return outs

"""Multi-label classifier and class activation maps (thesis Sect. 3.2 / Ch. 2, Eq. 2.1-2.4).

The classifier is a dilated ResNet, global average pooling and a bias-free 1x1
convolution over the foreground classes, trained with the multi-label soft-margin loss.
Because pooling and the classifier are both linear, the logit of class c is the mean of
its activation map::

    y_c = GAP(w_c^T F) ,    CAM_c(x) = ReLU(w_c^T F(x))                    (Eq. 2.1)

Inference (``multiscale_cam``) sums the CAMs of every scale s and its horizontal flip,
each upsampled bilinearly to the image size, then normalises each class by its max::

    M_c = sum_{s, flip} RS(CAM_c(I_s)) ,   P_c = M_c / max(M_c)             (Eq. 2.2-2.3)

and the background score is ``P_bg = (1 - max_c P_c)^alpha`` (Eq. 2.4).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ResNetBackbone, multiscale_sum, normalize


class CamNet(nn.Module):
    """Dilated ResNet + GAP + bias-free 1x1 classifier over ``num_fg`` foreground classes:
    the class scores and CAMs of Eq. 2.1."""

    def __init__(self, num_fg: int, depth: int = 50, output_stride: int = 16, weights: str = "none") -> None:
        super().__init__()
        self.backbone = ResNetBackbone(depth, output_stride, weights)
        self.classifier = nn.Conv2d(self.backbone.channels[-1], num_fg, 1, bias=False)
        self.num_fg = num_fg
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.classifier.weight)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(normalize(images))[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_fg) of RGB images in 0..255."""
        f = self.features(images)
        return self.classifier(f.mean((2, 3), keepdim=True)).flatten(1)

    def cam(self, images: torch.Tensor) -> torch.Tensor:
        """ReLU'd activation maps (N, num_fg, h, w) at the backbone's output stride."""
        return F.relu(self.classifier(self.features(images)))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, new-head parameters): the head gets the larger rate."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return backbone, list(self.classifier.parameters())


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label soft-margin loss: mean_c -[y_c log s(x_c) + (1-y_c) log s(-x_c)]."""
    return F.multilabel_soft_margin_loss(logits, targets)


@torch.no_grad()
def multiscale_cam(
    model: CamNet,
    image: np.ndarray,
    classes: Sequence[int],
    scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    flip: bool = True,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Normalised CAMs (K, H, W) float32 of the foreground ``classes`` (0-based among the
    foreground, i.e. class id - 1) for an RGB uint8 image (Eq. 2.2-2.3)."""
    h, w = image.shape[:2]
    k = len(classes)
    if k == 0:
        return np.zeros((0, h, w), np.float32)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float().to(device)
    idx = torch.as_tensor(list(classes), device=device)
    total = multiscale_sum(lambda batch: model.cam(batch)[:, idx], x, scales, flip)
    peak = total.flatten(1).max(1).values.clamp_min(1e-5)
    return (total / peak[:, None, None]).cpu().numpy().astype(np.float32)


def with_background(cams: np.ndarray, alpha: float) -> np.ndarray:
    """Stack ``P_bg = (1 - max_c P_c)^alpha`` (Eq. 2.4) in front of the (K, H, W) CAMs."""
    if cams.shape[0] == 0:
        return np.ones((1, *cams.shape[1:]), np.float32)
    bg = np.power(1.0 - cams.max(0), alpha)[None]
    return np.concatenate([bg, cams]).astype(np.float32)

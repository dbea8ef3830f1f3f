"""Dilated convolutions that skip the taps which can only read padding.

A stride-1, "same"-padded convolution with kernel ``k`` (odd, centre ``c = (k-1)/2``) and
dilation ``d`` computes, along each axis of length ``n``::

    y[i] = sum_j w[j] * x[i + (j - c) * d]        (x = 0 outside 0..n-1)

Tap ``j`` reads a real pixel for some ``i`` only if ``|j - c| * d <= n - 1``. With
``m = min(c, (n - 1) // d)`` the taps ``c-m .. c+m`` with padding ``m * d`` give the same
``y`` (the others multiply zeros, and their gradient is exactly zero either way). DeepLab's
ASPP rates 12/24/36 on the 8x8 map of a 128-pixel crop at output stride 16 are the case
that matters: every tap but the centre is dead, and the 3x3 convolution is a 1x1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def live_taps(kernel: int, dilation: int, size: int) -> int:
    """``m``: the taps ``c-m .. c+m`` of one axis that can read a pixel of a ``size``-long axis."""
    return min((kernel - 1) // 2, (size - 1) // dilation)


class LiveTapConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` (stride 1, same padding, odd kernel) that convolves with the
    live taps only: ``conv(x, w[:, :, c-mh:c+mh+1, c-mw:c+mw+1], padding=(mh*dh, mw*dw))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        mh, mw = live_taps(kh, dh, x.shape[-2]), live_taps(kw, dw, x.shape[-1])
        ch, cw = (kh - 1) // 2, (kw - 1) // 2
        if (mh, mw) == (ch, cw):
            return super().forward(x)
        weight = self.weight[:, :, ch - mh : ch + mh + 1, cw - mw : cw + mw + 1]
        return F.conv2d(x, weight, self.bias, 1, (mh * dh, mw * dw), self.dilation, self.groups)


def _prunable(m: nn.Module) -> bool:
    """A plain dilated Conv2d with stride 1, zero "same" padding and an odd kernel."""
    if type(m) is not nn.Conv2d:
        return False
    (kh, kw), (dh, dw) = m.kernel_size, m.dilation
    return (
        m.stride == (1, 1)
        and m.padding_mode == "zeros"
        and max(dh, dw) > 1
        and kh % 2 == 1
        and kw % 2 == 1
        and m.padding == (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    )


def prune_dead_taps(module: nn.Module) -> None:
    """Swap every prunable dilated :class:`~torch.nn.Conv2d` under ``module`` for a
    :class:`LiveTapConv2d` sharing its parameters (state-dict keys unchanged)."""
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if _prunable(child):
                new = LiveTapConv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    1,
                    child.padding,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                new.weight, new.bias = child.weight, child.bias
                setattr(parent, name, new)

"""Training-time augmentation shared by the training stages: random rescale, horizontal
flip, random crop (padded with the ImageNet mean colour, which normalises to 0, and with
255 = ignore in label maps). Every random choice comes from the ``rng`` passed in, so a
training step is reproducible from (seed, step) and a resumed run sees the same crops.
"""

from __future__ import annotations

import cv2
import numpy as np

from .base import IGNORE

PAD_RGB = (124, 116, 104)  # ImageNet mean in 0..255


def rescale(image: np.ndarray, scale: float, labels: tuple[np.ndarray, ...] = ()) -> tuple[np.ndarray, tuple]:
    """Bilinear image, nearest labels, both to round(size * scale)."""
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image, labels
    out = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return out, tuple(cv2.resize(lab, size, interpolation=cv2.INTER_NEAREST) for lab in labels)


def random_crop(
    image: np.ndarray, crop: int, rng: np.random.Generator, labels: tuple[np.ndarray, ...] = ()
) -> tuple[np.ndarray, tuple]:
    """A crop x crop window; a side shorter than ``crop`` is placed at a random offset in a
    padded canvas (as IRN/PSA do), so every crop has the same size."""
    h, w = image.shape[:2]
    ch, cw = min(crop, h), min(crop, w)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    dy = int(rng.integers(0, crop - ch + 1))
    dx = int(rng.integers(0, crop - cw + 1))
    img = np.empty((crop, crop, 3), np.uint8)
    img[:] = PAD_RGB
    img[dy : dy + ch, dx : dx + cw] = image[top : top + ch, left : left + cw]
    outs = []
    for lab in labels:
        o = np.full((crop, crop), IGNORE, lab.dtype)
        o[dy : dy + ch, dx : dx + cw] = lab[top : top + ch, left : left + cw]
        outs.append(o)
    return img, tuple(outs)


def scale_flip_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[float, float],
    crop: int,
    labels: tuple[np.ndarray, ...] = (),
) -> tuple[np.ndarray, tuple]:
    """Random rescale in ``scale_range``, horizontal flip with p=0.5, random crop."""
    image, labels = rescale(image, float(rng.uniform(*scale_range)), labels)
    if rng.random() < 0.5:
        image = image[:, ::-1]
        labels = tuple(lab[:, ::-1] for lab in labels)
    return random_crop(np.ascontiguousarray(image), crop, rng, tuple(np.ascontiguousarray(lab) for lab in labels))


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on an RGB uint8 image, each part with p = 0.5:
    brightness + U(-32, 32); contrast x U(0.5, 1.5), before or after (p = 0.5) saturation
    x U(0.5, 1.5) and hue + U{-18..17} (OpenCV's 0-179 hue), in HSV; clipped to 0..255."""

    def maybe(fn) -> None:
        nonlocal img
        if rng.integers(2):
            img = fn(img)

    img = image.astype(np.float32)
    maybe(lambda x: x + rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        maybe(lambda x: x * rng.uniform(0.5, 1.5))
    hsv = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    if rng.integers(2):
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
    if rng.integers(2):
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 18)) % 180
    img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if not contrast_first:
        maybe(lambda x: x * rng.uniform(0.5, 1.5))
    return np.clip(img, 0, 255).astype(np.uint8)


def step_rng(seed: int, step: int, index: int = 0) -> np.random.Generator:
    """The generator for one sample of one training step."""
    return np.random.default_rng([seed, step, index])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of one epoch (a function of seed and epoch only)."""
    return np.random.default_rng([seed, 1_000_003, epoch]).permutation(n)

"""The built-in synthetic dataset: deterministic per (seed, split, index), no files needed.

Three foreground classes that differ by shape, colour and texture:

- ``disc``  : ellipses, warm colours, radial shading;
- ``block`` : rotated rectangles, cool colours, stripes;
- ``star``  : five-pointed stars, green-yellow colours, dots;

1-3 objects per image, placed independently so they overlap (later ones occlude earlier
ones; the instance map keeps what is visible). Backgrounds are a smooth two-colour field
with clutter blobs whose colours are drawn from the whole colour range (so they can look
like objects), plus pixel noise: a colour threshold does not solve it (see the tests).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

CLASS_NAMES = ["background", "disc", "block", "star"]
VERSION = "2"  # bump when the generated images change: it is part of every demo fingerprint
_BASE_HUES = {1: (0, 25), 2: (100, 125), 3: (40, 70)}  # OpenCV hue range 0..179


def _hsv_colour(rng: np.random.Generator, hue: tuple[int, int] | None) -> np.ndarray:
    h = rng.integers(*hue) if hue else rng.integers(0, 180)
    s = rng.integers(110, 230)
    v = rng.integers(120, 240)
    hsv = np.uint8([[[h, s, v]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _star(cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        a = angle + k * np.pi / 5
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return np.round(pts).astype(np.int32)


def _shape_mask(cls: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    size = rng.uniform(0.28, 0.5) * min(h, w)
    cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
    angle = rng.uniform(0, 180)
    mask = np.zeros((h, w), np.uint8)
    if cls == 1:
        axes = (int(size * rng.uniform(0.45, 0.6)), int(size * rng.uniform(0.3, 0.5)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, angle, 0, 360, 1, -1)
    elif cls == 2:
        rect = ((cx, cy), (size * rng.uniform(0.8, 1.1), size * rng.uniform(0.4, 0.65)), angle)
        cv2.fillPoly(mask, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1)
    else:
        cv2.fillPoly(mask, [_star(cx, cy, size * 0.6, np.deg2rad(angle))], 1)
    return mask.astype(bool)


def _texture(cls: int, h: int, w: int, rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Multiplicative brightness pattern of one object class."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if cls == 1:
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean(), xs.mean()
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (np.sqrt(mask.sum() / np.pi) + 1e-6)
        return 1.15 - 0.45 * np.clip(r, 0, 1.2)
    if cls == 2:
        a = rng.uniform(0, np.pi)
        period = rng.uniform(5, 9)
        return 0.8 + 0.3 * (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0)
    period = int(rng.integers(5, 8))
    dots = ((yy.astype(int) % period) < 2) & ((xx.astype(int) % period) < 2)
    return np.where(dots, 0.55, 1.05)


def _lookalike_hue(rng: np.random.Generator) -> tuple[int, int] | None:
    """Half of the background colours come from an object class's hue range."""
    return _BASE_HUES[int(rng.integers(1, 4))] if rng.random() < 0.5 else None


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    c1, c2 = _hsv_colour(rng, _lookalike_hue(rng)) * 0.8, _hsv_colour(rng, None) * 0.8
    field = cv2.resize(rng.random((4, 5)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    field = np.clip(field, 0, 1)[..., None]
    img = c1 * field + c2 * (1 - field)
    for _ in range(int(rng.integers(2, 6))):  # clutter
        blob = np.zeros((h, w), np.uint8)
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(4, w // 6)), int(rng.integers(3, h // 6)))
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        img[blob.astype(bool)] = _hsv_colour(rng, _lookalike_hue(rng)) * rng.uniform(0.6, 1.0)
    return img


@functools.lru_cache(maxsize=512)
def generate(seed: int, split: str, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB uint8 image, semantic uint8 labels, instance ids uint8) of one demo image."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    h, w = height, width
    img = _background(h, w, rng)
    semantic = np.zeros((h, w), np.uint8)
    instance = np.zeros((h, w), np.uint8)
    n_objects = int(rng.integers(1, 4))
    for k in range(1, n_objects + 1):
        cls = int(rng.integers(1, 4))
        mask = _shape_mask(cls, h, w, rng)
        colour = _hsv_colour(rng, _BASE_HUES[cls])
        img[mask] = (colour * _texture(cls, h, w, rng, mask)[..., None])[mask]
        semantic[mask] = cls
        instance[mask] = k
    img = img + rng.normal(0, 16, img.shape)
    img = cv2.GaussianBlur(img.astype(np.float32), (3, 3), 0.6)
    return finish(img, semantic, instance, n_objects)


def finish(
    img: np.ndarray, semantic: np.ndarray, instance: np.ndarray, n_objects: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 image, semantic, instance ids) of a drawn image: instances 1..n re-numbered after
    occlusion, an object hidden almost entirely (under 1% of the image) made background (the
    last one drawn is whole, so every image keeps at least one object); read-only arrays."""
    h, w = semantic.shape
    out_inst = np.zeros_like(instance)
    next_id = 1
    for k in range(1, n_objects + 1):
        m = instance == k
        if m.sum() >= 0.01 * h * w:
            out_inst[m] = next_id
            next_id += 1
    semantic[out_inst == 0] = 0
    image = np.clip(img, 0, 255).astype(np.uint8)
    for arr in (image, semantic, out_inst):
        arr.setflags(write=False)
    return image, semantic, out_inst

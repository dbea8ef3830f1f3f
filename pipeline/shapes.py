"""The many-class synthetic dataset (``dataset.kind: shapes``): deterministic per (seed, split,
index), no files needed, made for few-shot episodes that must transfer to novel classes.

A class is one (shape family, texture family) pair, each pair used once, dealt to the class ids
by ``seed``, plus a colour distribution of its own (a hue centre and spread, saturation and
brightness bands) and a texture period and angle range:

- shape families: ellipse, rectangle, triangle, five-pointed star, cross, ring, hexagon,
  crescent;
- texture families: flat shading, stripes, checkerboard, dots, concentric rings, a speckle of
  seeded noise.

8 x 6 = 48 classes at most. The colour distributions are 48 too (12 hues 15 apart, each
with a low or high saturation and brightness band), dealt to the classes independently of the
pairs: two classes may share a shape, a texture or a hue, never all of them. Objects have two
parts, as real ones do: a body (the class's colour and texture) and a flat part of another
colour (the class's part colour: 6 hues on, the other band), the far side of the object along a
random direction; a single average of the object's features blends the two. Each image holds
2-3 objects of distinct classes (so a query always shows other classes beside the episode's
one), placed independently (later ones occlude earlier ones) over a smooth two-colour field
with clutter blobs of any colour and pixel noise, as the 3-class demo (:mod:`pipeline.demo`).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from .demo import finish

SHAPES = ("ellipse", "rectangle", "triangle", "star", "cross", "ring", "hexagon", "crescent")
TEXTURES = ("flat", "stripes", "checker", "dots", "rings", "speckle")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
SATURATIONS = ((70, 130), (170, 240))  # the colour bands: with 12 hues 15 apart, 48 distributions
VALUES = ((100, 150), (180, 240))
VERSION = "1"  # bump when the generated images change: it is part of every fingerprint


@functools.lru_cache(maxsize=64)
def classes(seed: int, num_classes: int) -> tuple[dict, ...]:
    """The appearance of each foreground class 1..num_classes (index 0 is class 1): its shape
    and texture family, hue centre / spread (OpenCV hue 0..179), saturation and value ranges,
    texture period range (pixels) and stripe angle."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"shapes: num_classes must be 1..{MAX_CLASSES}, not {num_classes}")
    rng = np.random.default_rng([seed, 48])
    pairs = rng.permutation(MAX_CLASSES)[:num_classes]
    colours = rng.permutation(MAX_CLASSES)[:num_classes]  # 12 hues x 2 saturations x 2 values
    out = []
    for p, col in zip(pairs, colours):
        hue, band = divmod(int(col), 4)
        part_hue, part_band = divmod((int(col) + 25) % MAX_CLASSES, 4)  # 6 hues (90 apart) and a band on
        period = float(rng.uniform(4.0, 9.0))
        out.append(
            {
                "shape": SHAPES[int(p) // len(TEXTURES)],
                "texture": TEXTURES[int(p) % len(TEXTURES)],
                "hue": hue * 15,
                "hue_spread": 5,
                "sat": SATURATIONS[band // 2],
                "val": VALUES[band % 2],
                "period": (period, period * 1.3),
                "angle": float(rng.uniform(0, np.pi)),
                "part": {
                    "hue": part_hue * 15,
                    "hue_spread": 5,
                    "sat": SATURATIONS[part_band // 2],
                    "val": VALUES[part_band % 2],
                },
            }
        )
    return tuple(out)


def class_names(num_classes: int) -> list[str]:
    """``background`` then ``c01`` .. ``cNN``: the names do not depend on the seed."""
    return ["background"] + [f"c{c:02d}" for c in range(1, num_classes + 1)]


def _colour(rng: np.random.Generator, spec: dict | None) -> np.ndarray:
    if spec is None:
        hsv = (rng.integers(0, 180), rng.integers(40, 230), rng.integers(60, 240))
    else:
        hue = (spec["hue"] + rng.integers(-spec["hue_spread"], spec["hue_spread"] + 1)) % 180
        hsv = (hue, rng.integers(*spec["sat"]), rng.integers(*spec["val"]))
    return cv2.cvtColor(np.uint8([[hsv]]), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> np.ndarray:
    n = len(radii)
    a = angle + np.arange(n) * 2 * np.pi / n
    return np.round(np.stack([cx + np.asarray(radii) * np.cos(a), cy + np.asarray(radii) * np.sin(a)], 1)).astype(
        np.int32
    )


def shape_mask(shape: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A filled shape of the family ``shape`` at a random place, size and angle (bool (h, w))."""
    r = rng.uniform(0.16, 0.26) * min(h, w)
    cx, cy = rng.uniform(0.22 * w, 0.78 * w), rng.uniform(0.22 * h, 0.78 * h)
    angle = rng.uniform(0, 2 * np.pi)
    deg = float(np.rad2deg(angle))
    mask = np.zeros((h, w), np.uint8)
    centre = (int(cx), int(cy))
    if shape == "ellipse":
        cv2.ellipse(mask, centre, (int(r), int(r * rng.uniform(0.55, 0.8))), deg, 0, 360, 1, -1)
    elif shape == "rectangle":
        rect = ((cx, cy), (2 * r, 2 * r * rng.uniform(0.45, 0.7)), deg)
        cv2.fillPoly(mask, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1)
    elif shape == "triangle":
        cv2.fillPoly(mask, [_polygon(cx, cy, [1.15 * r] * 3, angle)], 1)
    elif shape == "star":
        cv2.fillPoly(mask, [_polygon(cx, cy, [1.2 * r, 0.5 * r] * 5, angle)], 1)
    elif shape == "cross":
        for a in (deg, deg + 90):
            rect = ((cx, cy), (2.1 * r, 0.7 * r), a)
            cv2.fillPoly(mask, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1)
    elif shape == "ring":
        cv2.circle(mask, centre, int(r), 1, -1)
        cv2.circle(mask, centre, int(0.5 * r), 0, -1)
    elif shape == "hexagon":
        cv2.fillPoly(mask, [_polygon(cx, cy, [r] * 6, angle)], 1)
    else:  # crescent: a disc less a shifted disc
        cv2.circle(mask, centre, int(r), 1, -1)
        off = (int(cx + 0.55 * r * np.cos(angle)), int(cy + 0.55 * r * np.sin(angle)))
        cv2.circle(mask, off, int(0.85 * r), 0, -1)
    return mask.astype(bool)


def texture(spec: dict, h: int, w: int, rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """The multiplicative brightness pattern (h, w) of one object of class ``spec``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(*spec["period"])
    kind = spec["texture"]
    if kind == "flat":
        ys, xs = np.nonzero(mask)
        d = (xx - xs.mean()) * np.cos(spec["angle"]) + (yy - ys.mean()) * np.sin(spec["angle"])
        return 1.0 + 0.25 * np.clip(d / (np.sqrt(mask.sum()) + 1e-6), -1, 1)
    if kind == "stripes":
        a = spec["angle"] + rng.uniform(-0.3, 0.3)
        return 0.7 + 0.45 * (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0)
    if kind == "checker":
        p = max(2, int(round(period / 1.5)))
        return np.where(((yy.astype(int) // p) + (xx.astype(int) // p)) % 2 == 0, 0.65, 1.1)
    if kind == "dots":
        p = max(3, int(round(period)))
        dots = ((yy.astype(int) % p) < 2) & ((xx.astype(int) % p) < 2)
        return np.where(dots, 0.45, 1.05)
    if kind == "rings":
        ys, xs = np.nonzero(mask)
        r = np.sqrt((yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2)
        return 0.75 + 0.4 * (np.sin(r * 2 * np.pi / period) > 0)
    noise = cv2.resize(rng.random((h // 3 + 1, w // 3 + 1)).astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
    return 0.6 + 0.6 * noise


def part_of(mask: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The object's part: the ``fraction`` of its pixels farthest along a random direction
    from its centroid (bool (h, w))."""
    ys, xs = np.nonzero(mask)
    a = rng.uniform(0, 2 * np.pi)
    d = (xs - xs.mean()) * np.cos(a) + (ys - ys.mean()) * np.sin(a)
    far = d > np.quantile(d, 1.0 - fraction) if fraction > 0 else np.zeros(len(d), bool)
    part = np.zeros_like(mask)
    part[ys[far], xs[far]] = True
    return part


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    c1, c2 = _colour(rng, None) * 0.85, _colour(rng, None) * 0.85
    field = cv2.resize(rng.random((4, 4)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    field = np.clip(field, 0, 1)[..., None]
    img = c1 * field + c2 * (1 - field)
    for _ in range(int(rng.integers(2, 6))):  # clutter: blobs of any colour
        blob = np.zeros((h, w), np.uint8)
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(3, max(4, w // 7))), int(rng.integers(2, max(3, h // 7))))
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        img[blob.astype(bool)] = _colour(rng, None) * rng.uniform(0.6, 1.0)
    return img


@functools.lru_cache(maxsize=1024)
def generate(
    seed: int, num_classes: int, split: str, index: int, height: int, width: int, part_fraction: float = 0.3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB uint8 image, semantic uint8 labels, instance ids uint8) of one image; each object's
    part (``part_fraction`` of it, 0: none) is flat in its class's part colour."""
    specs = classes(seed, num_classes)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index, 48])
    h, w = height, width
    img = _background(h, w, rng)
    semantic = np.zeros((h, w), np.uint8)
    instance = np.zeros((h, w), np.uint8)
    picked = rng.choice(num_classes, min(num_classes, int(rng.integers(2, 4))), replace=False) + 1
    for k, cls in enumerate(picked, 1):
        spec = specs[cls - 1]
        mask = shape_mask(spec["shape"], h, w, rng)
        img[mask] = (_colour(rng, spec) * texture(spec, h, w, rng, mask)[..., None])[mask]
        part, colour = part_of(mask, part_fraction, rng), _colour(rng, spec["part"])  # drawn also at 0: one layout
        img[part] = colour
        semantic[mask] = cls
        instance[mask] = k
    img = img + rng.normal(0, 12, img.shape)
    img = cv2.GaussianBlur(img.astype(np.float32), (3, 3), 0.5)
    return finish(img, semantic, instance, len(picked))

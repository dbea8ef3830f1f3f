"""``wsss inspect``: one PNG panel per image (image, GT, the weak labels it trains from, every
stage's labels, named; for a graph stage, the edge weights of one pixel's node as a heat map
over the image)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stages.base import IGNORE, DataError, WeakLabels

from .store import voc_palette

_PALETTE = np.array(voc_palette(), np.uint8).reshape(256, 3)
_PALETTE[255] = (235, 235, 220)  # unknown: light, visibly different from background black
_WEAK_PALETTE = _PALETTE.copy()
_WEAK_PALETTE[0] = (255, 255, 255)  # background strokes over a dimmed image


def colourize(label: np.ndarray) -> np.ndarray:
    return _PALETTE[label]


def _tile(array: np.ndarray, title: str, height: int) -> Image.Image:
    img = Image.fromarray(array)
    if img.height != height:
        img = img.resize((max(1, round(img.width * height / img.height)), height), Image.NEAREST)
    tile = Image.new("RGB", (img.width, height + 16), (255, 255, 255))
    tile.paste(img, (0, 16))
    ImageDraw.Draw(tile).text((3, 2), title, fill=(0, 0, 0))
    return tile


def edge_heatmap(image: np.ndarray, graph: dict[str, np.ndarray], pixel: tuple[int, int],
                 stride: int = 8) -> np.ndarray:
    """The image dimmed, overlaid with E_ij of the node j under ``pixel`` (x, y) for every
    neighbour i (jet colours, 0 = no edge), the chosen cell outlined in white."""
    import cv2

    h, w = (int(v) for v in graph["grid"])
    x, y = pixel
    if not (0 <= x < image.shape[1] and 0 <= y < image.shape[0]):
        raise DataError("--pixel", f"({x}, {y}) is outside the {image.shape[1]}x{image.shape[0]} image")
    node = (y // stride) * w + x // stride
    src, dst = graph["edge_index"].astype(np.int64)
    heat = np.zeros(h * w, np.float32)
    into = dst == node
    heat[src[into]] = graph["weight"][into].astype(np.float32)
    heat = np.kron(heat.reshape(h, w), np.ones((stride, stride), np.float32))[:image.shape[0], :image.shape[1]]
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    mixed = np.where(heat[..., None] > 0, 0.35 * image + 0.65 * colour, 0.35 * image).astype(np.uint8)
    y0, x0 = (y // stride) * stride, (x // stride) * stride
    cv2.rectangle(mixed, (x0, y0), (x0 + stride - 1, y0 + stride - 1), (255, 255, 255), 1)
    return mixed


def weak_kind(config) -> str:
    """Which weak label the run trains from: box, scribble, point or image (tags)."""
    return config.dfr_train.labels if config.supervision == "dfr" else config.supervision


def weak_overlay(image: np.ndarray, weak: WeakLabels, kind: str) -> np.ndarray:
    """The image dimmed to 40 %, with the weak labels of ``kind`` in their class colours:
    box outlines (2 px), scribble strokes, points as 7x7 squares (background, black in the
    label palette, drawn white); tags have no pixels."""
    out = (0.4 * image).astype(np.uint8)
    if kind == "scribble" and weak.scribbles is not None:
        known = weak.scribbles != IGNORE
        out[known] = _WEAK_PALETTE[weak.scribbles[known]]
    elif kind == "point":
        for p in weak.points:
            out[max(p.y - 3, 0):p.y + 4, max(p.x - 3, 0):p.x + 4] = _WEAK_PALETTE[p.cls]
    elif kind == "box":
        for b in weak.boxes:
            colour = _WEAK_PALETTE[b.cls]
            out[b.y0:b.y1, b.x0:b.x0 + 2] = colour
            out[b.y0:b.y1, max(b.x1 - 2, b.x0):b.x1] = colour
            out[b.y0:b.y0 + 2, b.x0:b.x1] = colour
            out[max(b.y1 - 2, b.y0):b.y1, b.x0:b.x1] = colour
    return out


def inspect_panel(run, image_id: str, out: Path | None = None, pixel: tuple[int, int] | None = None) -> Path:
    """Compose the panel for ``image_id`` and write it; returns the PNG path. ``pixel``
    (x, y; default the image centre) picks the node whose edges a graph stage shows."""
    known = {i for name in run.names for i in run.ids(name)}
    if image_id not in known:
        raise DataError(run.dataset.name, f"unknown image id '{image_id}' (e.g. {sorted(known)[:3]})")
    image = run.dataset.load_image(image_id)
    h = max(image.shape[0], 96)
    tiles = [_tile(image, image_id, h)]
    gt = run.dataset.load_gt(image_id)
    if gt is not None:
        tiles.append(_tile(colourize(gt), "ground truth", h))
    if image_id in run.dataset.ids("train"):  # what the run learns from
        kind, weak = weak_kind(run.config), run.dataset.load_weak(image_id)
        title = {"box": "boxes", "scribble": "scribbles", "point": "points"}.get(kind) or "tags: " + ", ".join(
            run.dataset.class_names[t] for t in weak.tags)
        tiles.append(_tile(weak_overlay(image, weak, kind), title, h))
    for name in run.names:
        store = run.store(name)
        if store.kind == "arrays" and store.has(image_id):
            where = pixel or (image.shape[1] // 2, image.shape[0] // 2)
            heat = edge_heatmap(image, store.read_arrays(image_id), where)
            tiles.append(_tile(heat, f"{name}: edges of ({where[0]},{where[1]})", h))
        if store.kind not in ("label", "soft", "instances") or image_id not in run.ids(name):
            continue  # training stages have no per-image output; val images skip train stages
        for variant in [*run.spec(name).variants(run.config), None]:
            title = name if variant is None else f"{name}/{variant}"
            if store.has(image_id, variant):
                tiles.append(_tile(colourize(store.labels_of(image_id, variant)), title, h))
            else:
                blank = np.full((image.shape[0], image.shape[1], 3), 255, np.uint8)
                tiles.append(_tile(blank, f"{title} (not run)", h))
    panel = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), h + 16), (255, 255, 255))
    x = 0
    for t in tiles:
        panel.paste(t, (x, 0))
        x += t.width + 4
    path = out or run.run_dir / "inspect" / f"{image_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    panel.save(path)
    return path

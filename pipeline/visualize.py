"""``wsss inspect``: one PNG per image, a grid of titled panels (image, GT, the weak labels it
trains from, every stage's labels with its mIoU against GT where known; for a graph stage
the edge weights of one pixel's node as a heat map), a legend of the class colours below.
Unknown pixels (255) are hatched; instance maps use one colour per instance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.metrics import confusion_matrix, scores
from stages.base import IGNORE, DataError, WeakLabels

from .store import voc_palette

_PALETTE = np.array(voc_palette(), np.uint8).reshape(256, 3)
_PALETTE[255] = (235, 235, 220)  # unknown: light, visibly different from background black
_WEAK_PALETTE = _PALETTE.copy()
_WEAK_PALETTE[0] = (255, 255, 255)  # background strokes over a dimmed image


def colourize(label: np.ndarray) -> np.ndarray:
    return _PALETTE[label]


def hatch(rgb: np.ndarray, unknown: np.ndarray, period: int = 6) -> np.ndarray:
    """``rgb`` with the ``unknown`` pixels drawn as grey / white diagonal stripes."""
    ys, xs = np.indices(unknown.shape)
    stripes = np.where(((ys + xs) // (period // 2)) % 2 == 0, 150, 245).astype(np.uint8)
    out = rgb.copy()
    out[unknown] = stripes[unknown][:, None]
    return out


def label_image(label: np.ndarray) -> np.ndarray:
    """A label map in the class palette, unknown hatched."""
    return hatch(colourize(label), label == IGNORE)


def instance_image(instances: np.ndarray) -> np.ndarray:
    """An instance-id map, one colour per instance (hues spread by the golden ratio), black
    background, unknown hatched."""
    ids = np.arange(256)
    hue = (ids * 0.618034) % 1.0
    rgb = np.stack(
        [
            np.clip(np.abs(hue * 6 - 3) - 1, 0, 1),
            np.clip(2 - np.abs(hue * 6 - 2), 0, 1),
            np.clip(2 - np.abs(hue * 6 - 4), 0, 1),
        ],
        1,
    )
    table = (60 + 195 * rgb).astype(np.uint8)
    table[0] = 0
    return hatch(table[instances], instances == IGNORE)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile(array: np.ndarray, title: str, height: int) -> Image.Image:
    """The array scaled to ``height`` (nearest), on a white tile with the title above."""
    img = Image.fromarray(array)
    if img.height != height:
        img = img.resize((max(1, round(img.width * height / img.height)), height), Image.NEAREST)
    tile = Image.new("RGB", (img.width, height + _TITLE), (255, 255, 255))
    tile.paste(img, (0, _TITLE))
    ImageDraw.Draw(tile).text((3, 3), title, fill=(0, 0, 0), font=_font(14))
    return tile


_TITLE = 22


def legend(class_names: list[str], width: int) -> Image.Image:
    """Swatches of every class colour with its name, and the unknown hatch, wrapped to ``width``."""
    font = _font(14)
    entries = [(colourize(np.full((14, 14), k, np.uint8)), name) for k, name in enumerate(class_names)]
    entries.append((label_image(np.full((14, 14), IGNORE, np.uint8)), "unknown (255)"))
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [22 + int(draw_probe.textlength(name, font=font)) + 16 for _, name in entries]
    rows, x = 1, 0
    for w in widths:
        if x + w > width and x > 0:
            rows, x = rows + 1, 0
        x += w
    out = Image.new("RGB", (width, rows * 22 + 6), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = y = 0
    for (swatch, name), w in zip(entries, widths):
        if x + w > width and x > 0:
            x, y = 0, y + 22
        out.paste(Image.fromarray(swatch), (x + 4, y + 5))
        draw.rectangle((x + 3, y + 4, x + 18, y + 19), outline=(0, 0, 0))
        draw.text((x + 24, y + 4), name, fill=(0, 0, 0), font=font)
        x += w
    return out


def grid(tiles: list[Image.Image], columns: int, gap: int = 6) -> Image.Image:
    """Tiles in rows of ``columns``, each cell as wide as the widest tile."""
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = -(-len(tiles) // columns)
    out = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap), (255, 255, 255))
    for k, t in enumerate(tiles):
        out.paste(t, ((k % columns) * (cell_w + gap), (k // columns) * (cell_h + gap)))
    return out


def edge_heatmap(
    image: np.ndarray, graph: dict[str, np.ndarray], pixel: tuple[int, int], stride: int = 8
) -> np.ndarray:
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
    heat = np.kron(heat.reshape(h, w), np.ones((stride, stride), np.float32))[: image.shape[0], : image.shape[1]]
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    mixed = np.where(heat[..., None] > 0, 0.35 * image + 0.65 * colour, 0.35 * image).astype(np.uint8)
    y0, x0 = (y // stride) * stride, (x // stride) * stride
    cv2.rectangle(mixed, (x0, y0), (x0 + stride - 1, y0 + stride - 1), (255, 255, 255), 1)
    return mixed


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
            out[max(p.y - 3, 0) : p.y + 4, max(p.x - 3, 0) : p.x + 4] = _WEAK_PALETTE[p.cls]
    elif kind == "box":
        for b in weak.boxes:
            colour = _WEAK_PALETTE[b.cls]
            out[b.y0 : b.y1, b.x0 : b.x0 + 2] = colour
            out[b.y0 : b.y1, max(b.x1 - 2, b.x0) : b.x1] = colour
            out[b.y0 : b.y0 + 2, b.x0 : b.x1] = colour
            out[max(b.y1 - 2, b.y0) : b.y1, b.x0 : b.x1] = colour
    return out


def _miou(labels: np.ndarray, gt: np.ndarray | None, num_classes: int) -> str:
    if gt is None or labels.shape != gt.shape:
        return ""
    value = scores(confusion_matrix(labels, gt, num_classes))["miou"]
    return "" if value is None or np.isnan(value) else f"  mIoU {value:.3f}"


def inspect_panel(
    run, image_id: str, out: Path | None = None, pixel: tuple[int, int] | None = None, columns: int = 4
) -> Path:
    """Compose the grid for ``image_id`` and write it; returns the PNG path. ``pixel``
    (x, y; default the image centre) picks the node whose edges a graph stage shows."""
    known = {i for name in run.names for i in run.ids(name)}
    if image_id not in known:
        raise DataError(run.dataset.name, f"unknown image id '{image_id}' (e.g. {sorted(known)[:3]})")
    image = run.dataset.load_image(image_id)
    n_classes = run.dataset.num_classes
    h = max(image.shape[0], 200)
    panels: list[tuple[np.ndarray, str]] = [(image, image_id)]
    gt = run.dataset.load_gt(image_id)
    if gt is not None:
        panels.append((label_image(gt), "ground truth"))
    if image_id in run.dataset.ids("train"):  # what the run learns from
        kind, weak = run.config.labels, run.dataset.load_weak(image_id)
        title = {"box": "boxes", "scribble": "scribbles", "point": "points"}.get(kind) or "tags: " + ", ".join(
            run.dataset.class_names[t] for t in weak.tags
        )
        panels.append((weak_overlay(image, weak, kind), title))
    for name in run.names:
        store = run.store(name)
        if store.kind == "arrays" and store.has(image_id):
            where = pixel or (image.shape[1] // 2, image.shape[0] // 2)
            panels.append(
                (edge_heatmap(image, store.read_arrays(image_id), where), f"{name}: edges of ({where[0]},{where[1]})")
            )
        if store.kind not in ("label", "soft", "instances") or image_id not in run.ids(name):
            continue  # training stages have no per-image output; val images skip train stages
        for variant in [*run.spec(name).variants(run.config), None]:
            title = name if variant is None else f"{name}/{variant}"
            if not store.has(image_id, variant):
                panels.append((np.full((image.shape[0], image.shape[1], 3), 255, np.uint8), f"{title} (not run)"))
            elif store.kind == "instances":
                panels.append((instance_image(store.read_label(image_id, variant)), title))
            else:
                labels = store.labels_of(image_id, variant)
                panels.append((label_image(labels), title + _miou(labels, gt, n_classes)))
    tiles = [_tile(array, title, h) for array, title in panels]
    body = grid(tiles, min(columns, len(tiles)))
    key = legend(run.dataset.class_names, body.width)
    panel = Image.new("RGB", (body.width, body.height + key.height + 8), (255, 255, 255))
    panel.paste(body, (0, 0))
    panel.paste(key, (0, body.height + 8))
    path = out or run.run_dir / "inspect" / f"{image_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    panel.save(path)
    return path

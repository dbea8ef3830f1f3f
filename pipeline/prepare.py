"""``wsss prepare``: write synthesized weak labels to a folder the ``masks`` reader can load.

    OUT/boxes.json      {image_id: [[x0, y0, x1, y1, cls], ...]}   (half-open pixel boxes)
    OUT/points.json     {image_id: [{"x": .., "y": .., "cls": ..}, ...]}
    OUT/tags.json       {image_id: [cls, ...]}
    OUT/scribbles/<image_id>.png   VOC-palette PNG, 255 = no scribble
    OUT/summary.json    counts, scribble coverage, failures

Labels are the same as the on-the-fly synthesis (same seed, same function), so preparing
first only makes them inspectable and editable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from stages.base import DataError

from .runner import track
from .store import atomic_write, atomic_write_text, encode_label_png


def write_weak_labels(config, splits: list[str], out: Path) -> dict[str, Any]:
    """Every kind of weak label of ``config``'s dataset (whatever its labels read) for
    ``splits``, written to ``out``; returns the summary."""
    from .datasets import build_dataset

    dataset = build_dataset(config, all_weak=True)
    out = Path(out)
    (out / "scribbles").mkdir(parents=True, exist_ok=True)
    boxes, points, tags, failed = {}, {}, {}, {}
    scribbled = pixels = 0
    ids = [i for s in splits for i in dataset.ids(s)]
    for image_id in track(ids, "weak labels"):
        try:
            weak = dataset.load_weak(image_id)
        except DataError as err:
            failed[image_id] = str(err)
            continue
        boxes[image_id] = [[b.x0, b.y0, b.x1, b.y1, b.cls] for b in weak.boxes]
        points[image_id] = [{"x": p.x, "y": p.y, "cls": p.cls} for p in weak.points]
        tags[image_id] = list(weak.tags)
        if weak.scribbles is not None:
            data = encode_label_png(weak.scribbles)
            atomic_write(out / "scribbles" / f"{image_id}.png", lambda f, d=data: f.write(d))
            scribbled += int((weak.scribbles != 255).sum())
            pixels += weak.scribbles.size
    for name, obj in (("boxes", boxes), ("points", points), ("tags", tags)):
        atomic_write_text(out / f"{name}.json", json.dumps(obj))
    summary = {
        "out": str(out),
        "images": len(boxes),
        "failed": failed,
        "boxes": int(sum(len(v) for v in boxes.values())),
        "scribble_coverage": round(scribbled / pixels, 4) if pixels else None,
        "points": int(sum(len(v) for v in points.values())),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


__all__ = ["write_weak_labels"]

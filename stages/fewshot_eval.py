"""``fewshot_eval``: SCL's test episodes on the held-out classes (thesis Sect. 5.4).

For each shot count K in ``shots``, ``episodes`` episodes drawn from ``seed`` and K: a held-out
class, then K + 1 distinct val images holding at least ``min_pixels`` of it (K supports, one
query). K = 1 is the 1-shot model; K > 1 fuses its K predictions by the cross-guided module
(:func:`models.fewshot.cross_guided`, Eq. 5.15-5.17). Beside it, the prototype-only baseline on
the same encoder (:func:`models.fewshot.prototype_logits`: masked average pooling of each
support's foreground and background, cosine). Predictions are taken at the query's size.

Scores: per class, the foreground intersection and union summed over its episodes, then the
mean of those IoUs over the classes (``miou``, the thesis' metric); ``fb_iou`` the mean of the
foreground and background IoUs summed over every episode. The stage's ``model.pt`` holds the
per-episode records (what the store's completion check reads); the scores are its metrics.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import PositiveInt

from models.fewshot import cross_guided, prototype_logits
from models.types import IGNORE

from .augment import rescale
from .base import STAGES, Output, Scoring, StageContext, StageResult, StageSpec
from .fewshot_train import class_mask, fold_classes, images_of, load_trained
from .sections import Section
from .training import release


# --------------------------------------------------------------------------- config section
class FewshotEvalConfig(Section):
    """Test episodes of the held-out fold's classes on the val split, drawn with ``seed``:
    ``episodes`` per shot count in ``shots``; each has distinct support and query images. K > 1
    fuses the 1-shot model's predictions by the cross-guided module (Eq. 5.15-5.17). Scores as the
    thesis: the mean over classes of each class's IoU accumulated over its episodes, and FB-IoU;
    the prototype-only baseline (masked average pooling + cosine on the same encoder) beside it.
    Images at ``size`` on their short side (null: as they are)."""

    episodes: PositiveInt = 1000
    shots: list[PositiveInt] = [1, 5]
    seed: int = 0
    size: PositiveInt | None = None


VERSION = "1"


def episodes(pool: dict[int, list[str]], shots: int, n: int, seed: int) -> list[tuple[int, list[str], str]]:
    """``n`` episodes (class, K support ids, query id) from ``pool`` (class -> image ids) of the
    classes that have K + 1 images, drawn with ``(seed, shots)``."""
    classes = sorted(c for c, v in pool.items() if len(v) >= shots + 1)
    if not classes:
        raise ValueError(f"fewshot_eval: no held-out class has {shots + 1} val images")
    rng = np.random.default_rng([seed, shots])
    out = []
    for _ in range(n):
        c = classes[int(rng.integers(len(classes)))]
        picked = [pool[c][int(k)] for k in rng.choice(len(pool[c]), shots + 1, replace=False)]
        out.append((c, picked[:shots], picked[shots]))
    return out


class Scores:
    """Foreground intersection / union per class and the FB-IoU sums over episodes."""

    def __init__(self) -> None:
        self.per_class: dict[int, np.ndarray] = {}
        self.fb = np.zeros((2, 2))  # rows: background, foreground; columns: intersection, union

    def add(self, c: int, pred: np.ndarray, mask: np.ndarray) -> float:
        """Add one episode; returns its foreground IoU."""
        valid = mask != IGNORE
        for k in (0, 1):
            p, m = (pred == k) & valid, (mask == k) & valid
            self.fb[k] += ((p & m).sum(), (p | m).sum())
        acc = self.per_class.setdefault(c, np.zeros(2))
        p, m = (pred == 1) & valid, (mask == 1) & valid
        inter, union = float((p & m).sum()), float((p | m).sum())
        acc += (inter, union)
        return inter / union if union else 1.0

    def result(self) -> dict[str, Any]:
        ious = {str(c): float(v[0] / v[1]) if v[1] else 1.0 for c, v in sorted(self.per_class.items())}
        fb = self.fb[:, 0] / np.maximum(self.fb[:, 1], 1)
        return {"miou": float(np.mean(list(ious.values()))), "fb_iou": float(fb.mean()), "iou": ious}


def run(ctx: StageContext) -> StageResult:
    cfg, train_cfg = ctx.section, ctx.config.fewshot_train
    _, held = fold_classes(train_cfg, ctx.dataset.num_classes)
    pool = images_of(ctx, sorted(ctx.ids), held, train_cfg.min_pixels)
    model = load_trained(ctx.input("fewshot_train").read_model(), ctx.device)

    @functools.lru_cache(maxsize=512)
    def loaded(image_id: str) -> tuple[torch.Tensor, np.ndarray]:
        image, gt = ctx.dataset.load_image(image_id), ctx.dataset.load_gt(image_id)
        if cfg.size is not None:
            image, (gt,) = rescale(image, cfg.size / min(gt.shape), (gt,))
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().to(ctx.device), gt

    @functools.lru_cache(maxsize=512)
    def encoded(image_id: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model.encode(loaded(image_id)[0])

    def mask_of(image_id: str, c: int) -> torch.Tensor:
        return torch.from_numpy(class_mask(loaded(image_id)[1], c))[None].to(ctx.device)

    def up(logits: torch.Tensor, image_id: str) -> torch.Tensor:
        return F.interpolate(logits, size=loaded(image_id)[1].shape, mode="bilinear", align_corners=False)[0]

    metrics: dict[str, Any] = {}
    records = []
    with torch.no_grad():
        for k in cfg.shots:
            scl, proto = Scores(), Scores()
            for c, supports, query in episodes(pool, k, cfg.episodes, cfg.seed):
                vectors = [model.support_vectors(encoded(s)[0], mask_of(s, c)) for s in supports]

                def logits_of(j: int, image_id: str, supports=supports, c=c, vectors=vectors) -> torch.Tensor:
                    (f, h), s = encoded(image_id), supports[j]
                    prior = model.prior_of(h, encoded(s)[1], mask_of(s, c))
                    return up(model.query_logits(f, vectors[j]["a"], vectors[j]["b"], prior), image_id)

                if k == 1:
                    pred = logits_of(0, query).argmax(0)
                else:
                    pred = cross_guided(logits_of, supports, [mask_of(s, c)[0] for s in supports], query).argmax(0)
                mask = class_mask(loaded(query)[1], c)
                base = prototype_logits(
                    [encoded(s)[0] for s in supports], [mask_of(s, c) for s in supports], encoded(query)[0]
                )
                records.append(
                    {
                        "shots": k,
                        "class": c,
                        "supports": supports,
                        "query": query,
                        "iou": scl.add(c, pred.cpu().numpy(), mask),
                        "prototype_iou": proto.add(c, up(base, query).argmax(0).cpu().numpy(), mask),
                    }
                )
            metrics[f"{k}shot"] = scl.result()
            metrics[f"{k}shot_prototype"] = proto.result()
    ctx.out.write_model({"episodes": records, "held_out": held})
    model = None  # free it before release()
    release(ctx.device)
    return StageResult(
        info={
            "held_out": held,
            "episodes": cfg.episodes,
            "shots": list(cfg.shots),
            "val_images": {str(c): len(v) for c, v in pool.items()},
        },
        metrics=metrics,
    )


SPEC = STAGES.register(
    StageSpec(
        name="fewshot_eval",
        tiny={"episodes": 4, "shots": [1, 2]},
        section=FewshotEvalConfig,
        run=run,
        inputs=lambda config: ["fewshot_train"],
        output=Output.MODEL,
        scores=Scoring.EPISODES,
        version=VERSION,
        split="val",
        per_image=False,
        parallel=False,
        reads=("dataset",),
    )
)

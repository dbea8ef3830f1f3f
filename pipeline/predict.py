"""``wsss predict``: the trained segmentation model of a run on new images.

The model is the run's ``final_train`` (or, for a single-stage branch, its network:
``dfr_train``, ``blpseg_train``) for the current config. Each image is brought to the working size the model
was trained at (``dataset.min_side`` / ``max_side``, :func:`pipeline.datasets.working_size`), run with
the config's eval settings (``final_eval``: scales, flip, dense CRF; ``dfr_eval`` /
``blpseg_eval``: scales, flip), and its labels are written at the image's own size as ``OUT/<stem>.png`` (palette
PNG, pixel = class id). An unreadable image is reported and skipped.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.crf import crf_from_probs
from models.seeds import labels_from_soft
from models.segmentation import predict_probs
from stages.base import DataError, progress_bar
from stages.methods import METHODS

from .datasets import IMAGE_EXTS, read_image, working_size
from .dag import resolve_device
from .store import encode_label_png

log = logging.getLogger("wsss.predict")


class PredictError(ValueError):
    """No trained model, or no images to run it on."""


def model_stage(config) -> str:
    """The stage of the run's trained model (its method's ``model``: ``final_train``, ``dfr_train``, ...)."""
    return METHODS.get(config.method).model


def eval_section(config):
    """The inference settings of the model's stage (``final_eval``, ``dfr_eval``, ...)."""
    return getattr(config, METHODS.get(config.method).evaluation)


def predict_labels(model, image: np.ndarray, config, device: str) -> np.ndarray:
    """(H, W) uint8 labels of one RGB image at its own size, per the config's eval section."""
    h, w = image.shape[:2]
    target = working_size(w, h, config.dataset)
    work = (
        image
        if target is None
        else cv2.resize(image, target[1][::-1], interpolation=cv2.INTER_AREA if target[0] < 1 else cv2.INTER_LINEAR)
    )
    cfg = eval_section(config)
    probs = predict_probs(model, work, cfg.scales, cfg.flip, device)
    if getattr(cfg, "use_crf", False):
        probs = crf_from_probs(work, probs, cfg.crf)
    labels = labels_from_soft(probs)
    return labels if target is None else cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)


def predict(run, images: Path, out: Path) -> dict[str, Any]:
    """Label every image in ``images`` (not recursive) into ``out``; returns a summary."""
    stage = model_stage(run.config)
    store = run.store(stage)
    if not store.has_model():
        raise PredictError(
            f"no trained {stage} model for this config (looked in {store.model_path}); run "
            f"`wsss run CONFIG --until {stage}` first"
        )
    images = Path(images)
    if not images.is_dir():
        raise PredictError(f"{images}: image folder not found")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise PredictError(f"{images}: no images ({', '.join(IMAGE_EXTS)})")
    load_trained = importlib.import_module(f"stages.{stage}").load_trained
    device = resolve_device(run.config.device)
    model = load_trained(store.read_model(), device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done, failed = 0, {}
    with progress_bar() as bar:
        task = bar.add_task(f"predict ({stage})", total=len(files))
        for path in files:
            try:
                labels = predict_labels(model, read_image(path), run.config, device)
                (out / f"{path.stem}.png").write_bytes(encode_label_png(labels))
                done += 1
            except DataError as err:
                failed[path.name] = str(err)
                log.warning("%s", err)
            bar.advance(task)
    return {"model": stage, "fingerprint": store.fingerprint, "written": done, "failed": failed, "out": str(out)}

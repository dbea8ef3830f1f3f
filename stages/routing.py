"""Routing and supervision-dependent defaults, in one place: which stages run and what they
read, decided from the config alone. Stages import these rules from here, never from
another stage module.
"""
from __future__ import annotations

from typing import Any

from models.affinity import window_offsets

STRIDE = 8
"""Output stride of the affinity net: graph nodes, the random walk and A²GNN live on this grid."""

A2GNN_BOX_DEFAULTS = {"epochs": 150, "lr": 0.035, "reg_weight": 0.01}
A2GNN_OTHER_DEFAULTS = {"epochs": 50, "lr": 0.03, "reg_weight": 0.3}


def cam_enabled(config) -> bool:
    """Whether the CAM stages run (tags need them; one-class data cannot localise with them)."""
    return config.cam.enabled


def source_of(config) -> str:
    """What the random walk propagates: ``cam`` (tags, points with CAMs) or ``seeds``."""
    source = config.random_walk.source
    if source == "auto":
        use_cam = config.supervision in ("image", "point") and cam_enabled(config)
        return "cam" if use_cam else "seeds"
    return source


def affinity_map(config) -> str | None:
    """Which ``seeds`` map the affinity CNN trains on (None: the main map M_g)."""
    if config.supervision in ("scribble", "point") and cam_enabled(config):
        return "affinity"
    return None


def radius_of(config) -> int:
    """The affinity window radius: 4 for boxes, 5 otherwise (the released settings)."""
    r = config.affinity_train.radius
    return r if r is not None else (4 if config.supervision == "box" else 5)


def offsets_of(config) -> list[tuple[int, int]]:
    """The window offsets of the affinity net, hence of the graph's edges."""
    return window_offsets(radius_of(config), config.affinity_train.neighbourhood)


def a2gnn_settings(config) -> Any:
    """The ``a2gnn`` section with the supervision's released defaults filled in (``None``
    fields: boxes 150 + 150 epochs, lr 0.035, lambda_1 0.01; others 50 + 50, 0.03, 0.3) and
    the box-only terms off for other supervisions."""
    cfg = config.a2gnn
    box = config.supervision == "box"
    fill = {k: v for k, v in (A2GNN_BOX_DEFAULTS if box else A2GNN_OTHER_DEFAULTS).items() if getattr(cfg, k) is None}
    if not box:
        fill.update(mp=False, consistency=False, box_constraint=False)
    if cfg.layer != "a2gnn":
        fill.update(path="edges")  # the torch_geometric baselines run on edge lists
    return cfg.model_copy(update=fill)


def fuses_random_walk(config) -> bool:
    """Tags and points: A²GNN's output is fused with the random walk's (Sect. 3.6.1)."""
    return config.supervision in ("image", "point") and config.a2gnn.rw_weight > 0

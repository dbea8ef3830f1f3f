"""Routing, in one place: which stages run and what they read, decided from the config
alone. Stages import these rules from here, never from another stage module. (The
label-dependent defaults, the random walk's source included, are filled when the
config loads: ``Config._resolve``.)
"""

from __future__ import annotations

from models.affinity import window_offsets


def cam_enabled(config) -> bool:
    """Whether the CAM stages run (tags need them; one-class data cannot localise with them)."""
    return config.cam.enabled


def affinity_map(config) -> str | None:
    """Which ``seeds`` map the affinity CNN trains on (None: the main map M_g)."""
    if config.labels in ("scribble", "point") and cam_enabled(config):
        return "affinity"
    return None


def offsets_of(config) -> list[tuple[int, int]]:
    """The window offsets of the affinity net, hence of the graph's edges."""
    return window_offsets(config.affinity_train.radius, config.affinity_train.neighbourhood)


def fuses_random_walk(config) -> bool:
    """Tags and points: A²GNN's output is fused with the random walk's (Sect. 3.6.1)."""
    return config.labels in ("tags", "point") and config.a2gnn.rw_weight > 0

"""One module per stage; :func:`load_all` imports them, and each registers itself in
``STAGES`` (see :mod:`stages.base`). The package itself imports nothing heavy, so the CLI
starts without torch; the DAG order comes from the stages' declared inputs
(:func:`pipeline.runner.build_dag`), not from the order of ``MODULES``.
"""

from __future__ import annotations

import importlib

MODULES = (
    "box_seeds",
    "cam_train",
    "cam",
    "seeds",
    "affinity_train",
    "graph",
    "random_walk",
    "a2gnn",
    "crf",
    "final_train",
    "final_eval",
    "instances",
    "instance_train",
    "dfr_train",
    "dfr_eval",
    "blpseg_train",
    "blpseg_eval",
    "rrm_train",
    "rrm_eval",
    "rrm_labels",
    "spml_train",
    "spml",
    "fewshot_train",
    "fewshot_eval",
)


def load_all() -> None:
    """Import every stage module (each registers its :class:`stages.base.StageSpec`)."""
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")

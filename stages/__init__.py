"""One module per stage, each registering its :class:`stages.base.StageSpec` in ``STAGES``
when imported. The methods (:mod:`stages.methods`) list their stages; :func:`load_all`
imports the built-in module of each one not registered yet. The package itself imports
nothing heavy, so the CLI starts without torch; the DAG order comes from the stages'
declared inputs (:func:`pipeline.runner.build_dag`), ties broken by registration order.
"""

from __future__ import annotations

import importlib


def load_all() -> None:
    """Register every stage a registered method lists: ``stages.<name>`` for the built-in
    ones; a plugin's module (``imports:``) registers its own before this runs."""
    from .base import STAGES
    from .methods import METHODS

    for method in METHODS.names():
        for name in METHODS.get(method).stages:
            if name not in STAGES:
                try:
                    importlib.import_module(f"{__name__}.{name}")
                except ModuleNotFoundError as err:
                    if err.name != f"{__name__}.{name}":
                        raise
                    raise KeyError(f"method '{method}' lists stage '{name}', which no module registers") from None

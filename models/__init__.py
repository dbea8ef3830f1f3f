"""Torch modules, losses and numerics. No file IO, no Prefect, no config parsing.

Importing this package first makes torchvision importable on a CPU-only torch
(see :mod:`models.tvcompat`).
"""
from . import tvcompat  # noqa: F401  (must run before any torchvision import)

"""Torch modules, losses and numerics. No file IO, no Prefect, no config parsing.

Modules that import torchvision import :mod:`models.tvcompat` first (it makes torchvision
importable on a CPU-only torch); :mod:`models.types` loads without torch.
"""

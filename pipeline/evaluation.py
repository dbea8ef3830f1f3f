"""Scoring against GT: the numerics live in :mod:`models.metrics` (stages use them too)."""
from models.metrics import confusion_matrix, evaluate, scores

__all__ = ["confusion_matrix", "evaluate", "scores"]

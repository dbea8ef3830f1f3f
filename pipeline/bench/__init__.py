"""``wsss bench NAME``: speed and peak memory of one stage's work at VOC size.

Each case runs in a fresh child process (forked from :mod:`pipeline.processes`' server), so
its peak resident memory (``ru_maxrss``) is its own; on CUDA the peak allocated GPU memory
is reported too. Inputs are synthetic images from the demo generator at the requested size (500x375 by default,
a typical VOC image) with their synthesized weak labels, so no dataset is needed. Models have random
weights: speed and memory do not depend on what the weights are.

One module per method's measurements (:mod:`.a2gnn`, :mod:`.segmentation`, :mod:`.rrm`,
:mod:`.spml`), and of the orchestration (:mod:`.orchestration`, :mod:`.scale_out`, :mod:`.inputs`); importing the
package registers them all in ``BENCHES``.
"""

from __future__ import annotations

from . import a2gnn, fewshot, inputs, orchestration, rrm, scale_out, segmentation, spml  # noqa: F401 (they register their benchmarks)
from .core import BENCHES, Case, in_child, measured, tiny_training  # noqa: F401 (the public names)

ORCHESTRATION = ("orchestration", "scale_out", "stamps")
"""The benchmarks of the pipeline's own work; every other one is named after the stage it measures."""

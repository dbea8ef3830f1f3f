"""torchvision on a CPU-only torch: make ``import torchvision`` work.

torchvision 0.28.0 is published as a CUDA build only. On a CPU-only torch its compiled
extension (``torchvision/_C.so``) fails to load, and ``torchvision/_meta_registrations.py``
then calls ``torch.library.register_fake("torchvision::nms")`` on an operator that was
never defined, so ``import torchvision`` raises ``operator torchvision::nms does not
exist``. Only ``nms`` and ``qnms`` are registered unconditionally; every other op is
guarded by ``torchvision.extension._has_ops()``.

:func:`ensure` (run on import of this module) first tries to load the compiled extension.
If that works, nothing else happens. If not, it defines the two operator schemas with
:mod:`torch.library` (pure Python, no compiler) and gives them kernels that raise a clear
error. Models and transforms then work; features that need the compiled ops (NMS,
RoIAlign, Mask R-CNN, deformable convolution) report that they need a complete
torchvision (a CUDA build of torch with its matching torchvision, or a CPU torchvision
that matches the installed torch).

Import this module before torchvision, or take torchvision from :func:`load_torchvision`
(imported on first use: commands that build no network, such as ``wsss status``, never pay
its import).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from types import ModuleType

import torch

NEEDS_COMPILED_OPS = (
    "this feature needs torchvision's compiled operators (NMS, RoIAlign, ...), which did not "
    "load: the installed torchvision does not match this torch build (torchvision 0.28.0 is a "
    "CUDA build; this torch is CPU-only). Install a complete torchvision for this torch, or run "
    "on a CUDA machine."
)

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_state: dict[str, object] = {"compiled_ops": None, "lib": None}


def _try_load_extension() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, RuntimeError):
            return False
    return False


def _unavailable(*args: object, **kwargs: object) -> torch.Tensor:
    raise RuntimeError(NEEDS_COMPILED_OPS)


def ensure() -> bool:
    """Make ``import torchvision`` safe. Returns True when the compiled ops are available."""
    if _state["compiled_ops"] is not None:
        return bool(_state["compiled_ops"])
    ok = _try_load_extension()
    if not ok:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in _SCHEMAS.items():
            if not _op_exists(name):
                lib.define(schema)
                lib.impl(name, _unavailable, "CompositeExplicitAutograd")
        _state["lib"] = lib  # keep the registrations alive
    _state["compiled_ops"] = ok
    return ok


def _op_exists(name: str) -> bool:
    try:
        torch._C._get_schema(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def has_compiled_ops() -> bool:
    """True when torchvision's compiled operators loaded (NMS, RoIAlign, ... work)."""
    return ensure()


def require_compiled_ops(feature: str) -> None:
    """Raise a clear error naming ``feature`` when torchvision's compiled ops are missing."""
    if not ensure():
        raise RuntimeError(f"{feature}: {NEEDS_COMPILED_OPS}")


def load_torchvision() -> ModuleType:
    """``torchvision``, importable here because :func:`ensure` ran when this module loaded."""
    import torchvision

    return torchvision


ensure()

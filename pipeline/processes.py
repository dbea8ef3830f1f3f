"""Child processes (stage workers, bench cases) start from one forkserver that has imported
torch and the stages once, so a child costs a fork, not a fresh ``import torch`` (and a
bench case does not time its own first imports).

The forkserver imports and runs nothing else (no Prefect, no torch thread pool): its
children start as clean as spawned ones.
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.context import BaseContext

# tvcompat before torchvision: on CPU-only torch it stubs torchvision's compiled ops.
PRELOAD = ["numpy", "cv2", "models.tvcompat", "torchvision", "stages", "pipeline.bench"]


def forkserver() -> BaseContext:
    """The forkserver context, its server preloading :data:`PRELOAD`."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def stop_temporary_server() -> None:
    """Stop the temporary Prefect server this process started, if any. Prefect stops it at
    exit, but a multiprocessing child (a bench case) leaves through ``os._exit``, past the
    exit handlers, and its server would run on until the command ends."""
    server = sys.modules.get("prefect.server.api.server")  # loaded only where a server was started
    for instance in list(getattr(getattr(server, "SubprocessASGIServer", None), "_instances", {}).values()):
        instance.stop()

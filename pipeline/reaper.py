"""The watchdog that ends a command's processes when the command dies, ``kill -9`` included.

``wsss`` marks its environment with a session id (:data:`SESSION_KEY`) before it starts any
child, so every process it starts, and theirs (the forkserver and the pool workers, the
resource tracker, Prefect's temporary server, Dask workers), carries the mark. This script
runs beside the command (:func:`start`), checks every :data:`POLL_S` whether its parent is
still alive (one ``getppid`` call), and once it is gone kills every process with the mark.
A SIGKILLed parent cannot clean up after itself; this does it in well under a second.

Run as a script, it imports nothing but ``psutil``, so it costs a bare interpreter.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid

import psutil

SESSION_KEY = "WSSS_SESSION"
POLL_S = 0.2


def start() -> subprocess.Popen | None:
    """Mark this process's environment with a fresh session id and start the watchdog for it
    (None where it cannot start: the command runs on without it)."""
    marker = uuid.uuid4().hex
    os.environ[SESSION_KEY] = marker
    try:
        return subprocess.Popen(
            [sys.executable, __file__, str(os.getpid()), marker],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C at the terminal reaches the command, not the watchdog
        )
    except OSError:
        return None


def marked(marker: str, me: int) -> list[psutil.Process]:
    """The processes (other than ``me``) whose environment carries ``marker``."""
    out = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(SESSION_KEY) == marker:
                out.append(proc)
    return out


def reap(marker: str, me: int, rounds: int = 3) -> int:
    """Kill the marked processes (a dying pool may start one more: up to ``rounds`` passes);
    returns how many were killed."""
    killed = 0
    for _ in range(rounds):
        found = marked(marker, me)
        if not found:
            break
        for proc in found:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
        psutil.wait_procs(found, timeout=1.0)
    return killed


def watch(parent: int, marker: str) -> None:
    """Wait for ``parent`` to end (normally or killed), then :func:`reap` what it left."""
    while os.getppid() == parent:
        time.sleep(POLL_S)
    reap(marker, os.getpid())


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])

"""The runner's errors: a run that cannot go on, a stage in which every image failed."""

from __future__ import annotations

import errno
from typing import Any

from stages.base import STORAGE_ERRNOS

WRITE_ERRNOS = STORAGE_ERRNOS | {errno.EACCES, errno.EPERM}
"""The errors of a disk refusing a write: full, over quota, read-only, no permission."""


class PipelineError(RuntimeError):
    """A run that cannot go on, with a message for the user (missing upstream, dead worker)."""


class StageFailed(PipelineError):
    """A stage in which every image failed (downstream stages cannot run)."""

    def __init__(self, name: str, failures: dict[str, str]) -> None:
        self.name, self.failures = name, failures
        first = "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        super().__init__(f"{name}: every image failed, e.g. {first}{more}")

    def __reduce__(self) -> tuple[Any, tuple[str, dict[str, str]]]:
        return type(self), (self.name, self.failures)


class CannotWrite(PipelineError):
    """The disk refused a write (full, over quota, read-only, no permission): the run stops,
    every finished item stays (atomic writes), and the same command resumes once it can write."""

    def __init__(self, err: OSError) -> None:
        self.path = err.filename or "the artifacts folder"
        super().__init__(
            f"cannot write at {self.path}: {err.strerror or err}; nothing finished is lost: "
            "free space or fix the permissions, then run the same command again"
        )


def cannot_write(err: BaseException) -> CannotWrite | None:
    """``err`` as the one-line :class:`CannotWrite` where it is the disk refusing a write."""
    if isinstance(err, CannotWrite):
        return err
    return CannotWrite(err) if isinstance(err, OSError) and err.errno in WRITE_ERRNOS else None

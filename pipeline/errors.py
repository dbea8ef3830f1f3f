"""The runner's errors: a run that cannot go on, a stage in which every image failed."""

from __future__ import annotations

from typing import Any


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

"""A run: a config bound to its dataset, its DAG (the registered stages of its method that take
its labels, ordered by their inputs) and every stage's fingerprint; which stages a command
selects; where a stage runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import stages
from stages.base import STAGES, StageSpec
from stages.methods import stage_runs

from .config import ConfigError, RunConfig, config_from_dict
from .datasets import build_dataset
from .fingerprints import fingerprint_payload, shared_reads
from .store import StageStore, fingerprint


stages.load_all()


def environment(device: str) -> dict[str, Any]:
    """Where a stage last ran. Trained stages are bit-reproducible for one environment; another
    torch build, processor (model or vendor: :func:`cpu_model`), instruction set (AVX2 vs AVX512
    kernels), thread count or GPU changes float rounding, and a from-scratch network then ends
    a point or two away."""
    import platform

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def cpu_model() -> str:
    """The processor's model name: MKL picks its matrix kernels by processor (vendor and
    instruction set), so the same torch build rounds MKL-backed ops (linear, bmm) apart on
    another CPU, while oneDNN's convolutions agree."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Run:
    """A config bound to its dataset, its DAG and every stage's fingerprint."""

    config: RunConfig
    dataset: Any
    dag: list[StageSpec]
    fingerprints: dict[str, str] = field(default_factory=dict)
    upstream: dict[str, list[str]] = field(default_factory=dict)
    stamp_cache: dict[str, dict[str, str]] | None = None  # split -> input stamps, while a command runs

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.dag]

    def spec(self, name: str) -> StageSpec:
        if name not in self.names:
            raise ConfigError(
                f"stage '{name}' is not part of this run ({self.config.labels} "
                f"-> {self.config.method}: {', '.join(self.names)})"
            )
        return STAGES.get(name)

    def store(self, name: str) -> StageStore:
        return StageStore(self.run_dir, name, self.fingerprints[name], self.spec(name).output)

    def ids(self, name: str) -> list[str]:
        return self.dataset.ids(self.spec(name).split)

    def config_json(self) -> str:
        return self.config.model_dump_json()

    def downstream(self, name: str) -> list[str]:
        out, frontier = [], {name}
        for s in self.dag:
            if frontier & set(self.upstream[s.name]):
                out.append(s.name)
                frontier.add(s.name)
        return out


def build_dag(config: RunConfig) -> tuple[list[StageSpec], dict[str, list[str]]]:
    """The registered stages of the config's method and labels, ordered from their
    declared inputs (a topological order; ties keep registration order)."""
    specs = {name: STAGES.get(name) for name in STAGES.names()}
    upstream = {name: spec.inputs(config) for name, spec in specs.items() if stage_runs(spec, config)}
    if not upstream:
        raise ConfigError(
            f"no stage is implemented yet for method '{config.method}' on labels '{config.labels}' "
            f"(registered: {', '.join(STAGES.names())})"
        )
    for name, inputs in upstream.items():
        missing = [u for u in inputs if u not in upstream]
        if missing:
            raise ConfigError(
                f"stage '{name}' needs {missing}, which do not run for labels "
                f"'{config.labels}' and method '{config.method}'"
            )
    order: list[str] = []
    while len(order) < len(upstream):
        ready = [n for n in upstream if n not in order and all(u in order for u in upstream[n])]
        if not ready:
            cycle = sorted(n for n in upstream if n not in order)
            raise ConfigError(f"the stages {cycle} depend on each other in a cycle")
        order.append(ready[0])
    return [specs[n] for n in order], upstream


def mermaid(run: Run) -> str:
    """The run's DAG as a Mermaid flowchart: one ``upstream --> stage`` line per declared
    input, in DAG order; a stage with no edge stands on its own line."""
    lines = ["flowchart LR"]
    linked = {u for s in run.names for u in run.upstream[s]} | {s for s in run.names if run.upstream[s]}
    for name in run.names:
        lines += [f"  {u} --> {name}" for u in run.upstream[name]]
        if name not in linked:
            lines.append(f"  {name}")
    return "\n".join(lines)


def make_run(config: RunConfig) -> Run:
    """Bind a config to its dataset (errors here stop before any work) and fingerprints."""
    unknown = sorted(set(config.notes) - set(STAGES.names()))
    if unknown:
        raise ConfigError(f"notes: '{unknown[0]}' is not a stage (stages: {', '.join(STAGES.names())})")
    dataset = build_dataset(config)
    dag, upstream = build_dag(config)
    for spec in dag:
        if spec.preflight is not None:
            try:
                spec.preflight(config)
            except (OSError, ValueError) as err:
                raise ConfigError(f"{spec.name}: {err}") from None
    run = Run(config, dataset, dag, upstream=upstream)
    reads = shared_reads(config, dataset)
    for spec in dag:
        run.fingerprints[spec.name] = fingerprint(
            fingerprint_payload(config, spec, reads, {u: run.fingerprints[u] for u in upstream[spec.name]})
        )
    return run


@functools.lru_cache(maxsize=8)
def run_from_json(config_json: str) -> Run:
    """Rebuild a run inside a task (cached per process)."""
    return make_run(config_from_dict(json.loads(config_json), "<task config>"))


def select(run: Run, only: list[str] | None = None, start: str | None = None, until: str | None = None) -> list[str]:
    """The stages to run, in DAG order: ``--only`` wins; else the span ``--from``..``--until``."""
    names = run.names
    for n in [*(only or []), start, until]:
        if n is not None:
            run.spec(n)
    if only:
        return [n for n in names if n in only]
    lo = names.index(start) if start else 0
    hi = names.index(until) if until else len(names) - 1
    if lo > hi:
        raise ConfigError(f"--from {start} comes after --until {until} in the DAG ({' -> '.join(names)})")
    return names[lo : hi + 1]


def forced(run: Run, force: list[str] | None) -> set[str]:
    """``--force S`` recomputes S and, since its outputs change, everything downstream of it."""
    out: set[str] = set()
    for name in force or []:
        run.spec(name)
        out |= {name, *run.downstream(name)}
    return out

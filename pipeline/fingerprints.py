"""What a stage's fingerprint hashes: its name, code version, config section, split, the top-level
fields it declares it reads, and its upstream fingerprints; and the top-level fields that never
change a result.
"""

from __future__ import annotations

from typing import Any

from stages.base import StageSpec

from .config import RunConfig
from .store import fingerprint


# Top-level config fields that never change a result: they say where and how a run executes.
# Every other top-level field is a stage's own section or one of the fields a stage declares
# in ``StageSpec.reads`` (dataset, weak, seed, labels), which enter its fingerprint.
RESULT_NEUTRAL = {
    "run": "names the run folder",
    "output_root": "where run folders live",
    "device": "cpu / cuda: the same computation (float rounding aside, as recorded in the manifest's environment)",
    "workers": "how many processes share the per-image work",
    "shard_size": "how the per-image work is split into tasks",
    "engine": "prefect or local: the same stage functions",
    "task_runner": "how Prefect schedules the shards",
    "threads": "torch threads per process (float rounding aside, as recorded in the manifest's environment)",
    "dask": "where the Dask task runner's workers are",
    "lock": "what a second run does while another computes a stage",
    "min_usable": "when a training stage refuses to start; it never changes which images it uses",
    "notes": "lines the quality ladder prints beside a figure",
    "imports": "which modules register more methods and stages (each stage's results are in its own fingerprint)",
}


def shared_reads(config: RunConfig, dataset: Any) -> dict[str, Any]:
    """The values of the top-level fields a stage may declare in ``StageSpec.reads``:
    the dataset description, the weak-label settings with the content hash of the weak-label
    files the dataset reads, the seed and the label kind."""
    return {
        "dataset": dataset.fingerprint(),
        "seed": config.seed,
        "labels": config.labels,
        "weak": fingerprint({"settings": config.weak.model_dump(mode="json"), "files": dataset.weak_fingerprint()}),
    }


def fingerprint_payload(config: RunConfig, spec: StageSpec, reads: dict[str, Any], upstream: dict[str, str]) -> dict:
    """What a stage's fingerprint hashes: its name, code version, config section, split,
    the top-level fields it reads and its upstream fingerprints."""
    return {
        "stage": spec.name,
        "version": spec.version,
        "config": config.section(spec.name),
        "split": spec.split,
        "reads": {k: reads[k] for k in spec.reads},
        "upstream": upstream,
    }

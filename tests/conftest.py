"""Shared fixtures. Prefect runs against a throw-away home; the real-data tests need
``../shared/data`` beside the checkout and fail, naming the path, when it is absent."""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="wsss-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parent.parent
HORSES = ROOT.parent / "shared" / "data" / "weizmann_horse"


@pytest.fixture(scope="session")
def horses() -> Path:
    if not (HORSES / "rgb").is_dir():
        pytest.fail(f"the Weizmann horses are missing at {HORSES}: the tests need ../shared beside the checkout")
    return HORSES


# Training stages sized to run in seconds (quality tests use configs/demo.yaml's settings).
TINY_TRAINING = {
    "cam_train": {"depth": 18, "crop": 48, "batch_size": 3, "epochs": 1, "checkpoint_every": 1000},
    "cam": {"scales": [1.0]},
    "affinity_train": {"depth": 18, "crop": 48, "batch_size": 3, "epochs": 1, "checkpoint_every": 1000},
    "a2gnn": {"epochs": 2, "hidden": 16},
}


def demo_config(tmp_path: Path, **overrides):
    """A small demo run config in ``tmp_path`` (local engine, one worker); ``a__b=v`` sets a.b."""
    from pipeline.config import config_from_dict

    data = {"run": "t", "output_root": str(tmp_path / "artifacts"), "engine": "local", "workers": 1,
            "dataset": {"kind": "demo", "num_train": 6, "num_val": 2}, **copy.deepcopy(TINY_TRAINING)}
    for key, value in overrides.items():
        node = data
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_dict(data, "<test>")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield

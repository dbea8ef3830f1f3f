"""The Prefect flow (one harness for the session): mapped shards, manifests, artifacts."""

from pipeline.flow import run_prefect
from pipeline.runner import make_run, shards

from .conftest import demo_config


def test_shards_cover_every_id_once(tmp_path):
    run = make_run(demo_config(tmp_path, shard_size=4, cam__enabled=False))
    ids = [str(i) for i in range(10)]
    parts = shards(run, "box_seeds", ids)
    assert [len(s) for s in parts] == [4, 4, 2] and sum(parts, []) == ids


def test_flow_runs_stages_over_shards_and_publishes_metrics(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client

    # crf of the seeds: the quality floor below is about the flow, not the 2-epoch A²GNN
    run = make_run(demo_config(tmp_path, engine="prefect", shard_size=2, dataset__num_train=5, crf__input="seeds"))
    out = run_prefect(run, run.names, set())
    assert out["box_seeds"]["status"] == "complete" and out["crf"]["counts"]["done"] == 5
    assert out["a2gnn"]["counts"]["done"] == 5
    assert out["crf"]["metrics"]["miou"] > 0.7

    async def keys_and_names():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}, {t.name for t in await client.read_task_runs()}

    import asyncio

    keys, task_runs = asyncio.run(keys_and_names())
    assert {"t-box-seeds-metrics", "t-crf-metrics", "t-crf-metrics-summary"} <= keys  # run "t"
    assert {"box_seeds/begin", "box_seeds/shard-0", "box_seeds/shard-2", "crf/finish"} <= task_runs


def test_artifact_keys_are_valid_prefect_keys():
    from pipeline.flow import artifact_key

    assert artifact_key("Horses_box v2", "box_seeds", "metrics") == "horses-box-v2-box-seeds-metrics"


def test_flow_with_process_shards_records_a_bad_image_and_stops_on_a_failed_stage(tmp_path, horses, prefect_harness):
    """Prefect's process task runner: failures cross two process boundaries intact."""
    import pytest

    from pipeline.config import config_from_dict
    from pipeline.runner import StageFailed

    from .test_reliability import horse_config, horse_subset

    root = horse_subset(tmp_path, horses, 4)
    (root / "rgb" / "horse003.jpg").write_bytes(b"")
    cfg = horse_config(tmp_path, root, engine="prefect", task_runner="process", workers=2, shard_size=2)
    out = run_prefect(make_run(config_from_dict(cfg)), ["box_seeds", "seeds"], set())
    assert out["box_seeds"]["counts"] == {"total": 4, "done": 3, "failed": 1}
    assert "horse003.jpg: unreadable" in out["box_seeds"]["failures"]["horse003"]
    assert out["seeds"]["failures"]["horse003"].startswith("skipped: box_seeds failed for it: ")
    for k in (1, 2, 4):
        (root / "rgb" / f"horse{k:03d}.jpg").write_bytes(b"")
    with pytest.raises(StageFailed, match="box_seeds: every image failed"):  # a new run: nothing done before
        run_prefect(make_run(config_from_dict({**cfg, "run": "all_bad"})), ["box_seeds", "seeds"], set())

"""The ``wsss`` commands (local engine, so no Prefect server is needed here)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app

from .conftest import TINY_TRAINING

runner = CliRunner()


def write_config(tmp_path, **extra):
    data = {
        "run": "cli",
        "output_root": str(tmp_path / "art"),
        "engine": "local",
        "workers": 1,
        "dataset": {"kind": "demo", "num_train": 4, "num_val": 2},
        **TINY_TRAINING,
        "cam": {"enabled": False},
        **extra,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_error_is_one_message_without_traceback(tmp_path):
    path = write_config(tmp_path, crf={"iterations": -1})
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2
    assert "crf.iterations" in res.output and str(path) in res.output and "Traceback" not in res.output


def test_missing_dataset_stops_before_any_work(tmp_path):
    path = write_config(tmp_path, dataset={"kind": "masks", "root": str(tmp_path / "none")})
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2 and "dataset folder not found" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "art").exists()


def test_unknown_stage_is_an_error(tmp_path):
    res = runner.invoke(app, ["run", str(write_config(tmp_path)), "--only", "nope"])
    assert res.exit_code == 2 and "stage 'nope' is not part of this run" in res.output


def test_run_status_eval_inspect_and_cache(tmp_path):
    path = write_config(tmp_path)
    res = runner.invoke(app, ["run", str(path), "--until", "box_seeds"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", str(path), "--from", "seeds"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["status", str(path)])
    assert res.exit_code == 0 and "box_seeds" in res.output and "4/4" in res.output and "complete" in res.output
    res = runner.invoke(app, ["run", str(path)])
    assert "all 10 stage(s) cached" in res.output
    res = runner.invoke(app, ["eval", str(path), "--stage", "seeds", "--map", "M_F"])
    assert res.exit_code == 2 and "has no map 'M_F'" in res.output  # no CAM, no fusion
    res = runner.invoke(app, ["eval", str(path), "--stage", "crf"])
    assert res.exit_code == 0 and "disc" in res.output and "mean" in res.output
    assert (tmp_path / "art" / "cli" / "config.yaml").is_file()
    res = runner.invoke(app, ["inspect", str(path), "train_0001"])
    assert res.exit_code == 0, res.output
    png = tmp_path / "art" / "cli" / "inspect" / "train_0001.png"
    assert png.is_file()
    w, h = Image.open(png).size
    # a grid of 4 columns, tiles 200 px high + title: image, GT, boxes, box_seeds (+ GrabCut filled), seeds,
    # graph edges, random_walk, a2gnn, crf, ... in 3 or more rows, the legend below
    assert 4 * 200 < w < 4 * 300 and h > 3 * 222
    res = runner.invoke(app, ["eval", str(path), "--stage", "final_eval", "--map", "crf"])
    assert res.exit_code == 0 and "final_eval/crf: 2" in res.output and "mean" in res.output
    res = runner.invoke(app, ["inspect", str(path), "val_0001"])
    assert res.exit_code == 0, res.output
    w, h = Image.open(tmp_path / "art" / "cli" / "inspect" / "val_0001.png").size
    assert h < 2 * 222  # one row: image, GT, final_eval, final_eval/crf (the train stages are left out) + legend
    res = runner.invoke(app, ["inspect", str(path), "train_0001", "--pixel", "10,20"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(path), "train_0001", "--pixel", "999,20"])
    assert res.exit_code == 2 and "outside the 160x120 image" in res.output
    res = runner.invoke(app, ["inspect", str(path), "nope_1"])
    assert res.exit_code == 2 and "unknown image id" in res.output


def test_the_ladder_prints_the_note_beside_a_figure_under_its_baseline(tmp_path, monkeypatch, capsys):
    import pipeline.cli as cli
    from pipeline.config import ConfigError, load_config
    from pipeline.runner import make_run

    path = write_config(tmp_path, notes={"crf": "flat shapes: GrabCut solves them"})
    assert runner.invoke(app, ["run", str(path), "--until", "crf"]).exit_code == 0
    the_run = make_run(load_config(path))
    crf = the_run.store("crf").read_manifest()["metrics"]["miou"]
    filled = the_run.store("box_seeds").read_manifest()["metrics"]["maps"]["grabcut_filled"]["miou"]
    pairs = cli.baseline_pairs(the_run, "crf", the_run.store("crf").read_manifest()["metrics"])
    assert pairs == [("crf", crf, "GrabCut filled", filled)]
    for value, shown in ((filled - 0.1, True), (filled + 0.1, False)):
        monkeypatch.setattr(
            cli, "baseline_pairs", lambda r, n, m, v=value: [("crf", v, "GrabCut filled", filled)] if n == "crf" else []
        )
        cli._print_ladder(the_run)
        out = capsys.readouterr().out
        assert ("flat shapes: GrabCut solves them" in out) == shown and ("is not above GrabCut filled" in out) == shown
    with pytest.raises(ConfigError, match="notes: 'nope' is not a stage"):
        make_run(load_config(path, ["notes.nope=x"]))


def test_label_and_instance_images_hatch_unknown_and_colour_instances_apart():
    from pipeline.visualize import colourize, instance_image, label_image
    from stages.base import IGNORE

    labels = np.array([[0, 1, IGNORE, IGNORE, IGNORE, IGNORE]], np.uint8).repeat(6, 0)
    rgb = label_image(labels)
    assert (rgb[:, 0] == colourize(np.uint8(0))).all() and (rgb[:, 1] == colourize(np.uint8(1))).all()
    hatched = rgb[:, 2:].reshape(-1, 3)
    assert len({tuple(v) for v in hatched}) == 2 and all(v[0] == v[1] == v[2] for v in hatched)  # grey stripes
    inst = instance_image(np.array([[0, 1, 2, 3]], np.uint8))
    assert (inst[0, 0] == 0).all() and len({tuple(v) for v in inst[0, 1:]}) == 3


def test_weak_overlay_paints_each_kind_in_its_class_colour():
    from pipeline.visualize import colourize, weak_overlay
    from stages.base import IGNORE, Box, Point, WeakLabels

    image = np.full((20, 30, 3), 200, np.uint8)
    scrib = np.full((20, 30), IGNORE, np.uint8)
    scrib[5, 3:9] = 1
    scrib[0, 0] = 0
    weak = WeakLabels(tags=[1, 2], boxes=[Box(10, 4, 20, 12, 2)], scribbles=scrib, points=[Point(25, 15, 3)])
    dim = np.array([80, 80, 80], np.uint8)
    c = {k: colourize(np.array([k], np.uint8))[0] for k in (1, 2, 3)}
    s = weak_overlay(image, weak, "scribble")
    assert (s[5, 3:9] == c[1]).all() and (s[0, 0] == 255).all() and (s[6, 3] == dim).all() and (s[4, 10] == dim).all()
    b = weak_overlay(image, weak, "box")
    assert (b[4:12, 10] == c[2]).all() and (b[11, 10:20] == c[2]).all() and (b[7, 15] == dim).all()
    assert (b[12, 10] == dim).all() and (b[5, 3] == dim).all()  # half-open box; no scribbles drawn
    p = weak_overlay(image, weak, "point")
    assert (p[12:19, 22:29] == c[3]).all() and (p[11, 25] == dim).all()
    assert (weak_overlay(image, weak, "image") == dim).all()


def test_only_without_upstream_says_what_to_run(tmp_path):
    res = runner.invoke(app, ["run", str(write_config(tmp_path)), "--only", "crf"])
    assert res.exit_code == 2 and "crf needs 'a2gnn'" in res.output


def test_prepare_writes_weak_labels_the_reader_loads(tmp_path):
    path = write_config(tmp_path)
    out = tmp_path / "weak"
    res = runner.invoke(app, ["prepare", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["boxes"] >= 6 and 0.01 < summary["scribble_coverage"] < 0.06
    boxes = json.loads((out / "boxes.json").read_text())
    assert set(boxes) == {f"train_{i:04d}" for i in range(4)} | {"val_0000", "val_0001"}
    assert len(list((out / "scribbles").glob("*.png"))) == 6


def test_bench_prints_a_row_per_case(tmp_path):
    res = runner.invoke(app, ["bench", "seeds", "--images", "1", "--size", "96x64", "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["images"] for r in rows] == [1, 1, 1, 1]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    res = runner.invoke(app, ["bench", "nope"])
    assert res.exit_code == 2 and "unknown benchmark" in res.output


def test_bench_random_walk_measures_sparse_against_dense(tmp_path):
    res = runner.invoke(
        app,
        [
            "bench",
            "random_walk",
            "--images",
            "1",
            "--size",
            "96x64",
            "--opt",
            "depth=18",
            "--opt",
            "logt=3",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    graph, sparse, dense = json.loads((tmp_path / "b.json").read_text())
    assert graph["nodes"] == sparse["nodes"] == dense["nodes"] == 8 * 12
    assert graph["graph_bytes"] > 0 and sparse["edges"] == dense["edges"] > 96
    assert "sparse" in sparse["case"] and "dense" in dense["case"]


def test_missing_imagenet_weights_stop_the_run_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = write_config(tmp_path, cam={"enabled": True}, cam_train={"weights": "imagenet"})
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 2 and "cam_train:" in res.output and "never downloads" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "art").exists()


def test_voc_configs_are_the_thesis_settings_and_missing_weights_stop_them(tmp_path, monkeypatch):
    """configs/voc_{box,scribble,point,image}.yaml: CAM net, affinity net and final model from
    ImageNet weights, the final model DeepLabV3-ResNet101; without the files each stage stops
    before any work and says where to put them."""
    from pipeline.config import load_config
    from pipeline.runner import build_dag

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    root = Path(__file__).resolve().parent.parent
    for name in ("box", "scribble", "point", "image"):
        cfg = load_config(root / "configs" / f"voc_{name}.yaml")
        assert cfg.final_train.arch == "deeplabv3_resnet101"
        assert cfg.cam_train.weights == cfg.affinity_train.weights == cfg.final_train.weights == "imagenet"
        for spec in build_dag(cfg)[0]:
            if spec.name in ("cam_train", "affinity_train", "final_train"):
                with pytest.raises(OSError, match=f"{tmp_path}/torch/hub/checkpoints/resnet.*never downloads"):
                    spec.preflight(cfg)


@pytest.mark.parametrize(
    "flag, runs, spml",
    [
        ([], ["demo", "demo_dfr"], False),
        (["--all"], ["demo", "demo_dfr", "demo_blpseg", "demo_rrm", "demo_fewshot"], True),
    ],
)
def test_demo_runs_the_main_flow_and_all_every_branch(monkeypatch, flag, runs, spml):
    import pipeline.cli as cli

    ran = []
    monkeypatch.setattr(cli, "execute", lambda the_run: ran.append(the_run))
    monkeypatch.setattr(cli, "_print_ladder", lambda the_run: None)
    res = runner.invoke(app, ["demo", *flag, "--engine", "local"])
    assert res.exit_code == 0, res.output
    assert [r.config.run for r in ran] == runs
    assert ("spml_train" in ran[0].names) == spml and (ran[0].config.method == "spml") == spml
    assert "final_train" in ran[0].names and "instances" in ran[0].names


def test_the_ladder_counts_the_images_each_stage_made_worse_or_better(tmp_path, capsys):
    import pipeline.cli as cli
    from models.metrics import confusion_matrix, mean_iou
    from pipeline.config import load_config
    from pipeline.runner import make_run
    from pipeline.scoring import changed_images, references

    path = write_config(tmp_path)
    assert runner.invoke(app, ["run", str(path), "--until", "crf"]).exit_code == 0
    the_run = make_run(load_config(path))
    crf = the_run.store("crf").read_manifest()
    for image_id, value in crf["image_miou"][""].items():  # per image, against a loop over its classes
        pred, gt = the_run.store("crf").read_label(image_id), the_run.dataset.load_gt(image_id)
        held = [k for k in range(the_run.dataset.num_classes) if ((pred == k) | (gt == k)).any()]
        ious = [((pred == k) & (gt == k)).sum() / ((pred == k) | (gt == k)).sum() for k in held]
        assert value == pytest.approx(float(np.mean(ious)), abs=1e-4)
        assert value == round(mean_iou(confusion_matrix(pred, gt, the_run.dataset.num_classes)), 4)
    assert [r[0] for r in references(the_run, "crf")] == [the_run.upstream["crf"][0], "GrabCut filled"]

    # hand-set per-image scores: one image 0.3 worse, one 0.2 better, one within 0.1
    ids = sorted(crf["image_miou"][""])[:3]
    up = the_run.upstream["crf"][0]
    manifests = {
        "crf": {"image_miou": {"": dict(zip(ids, [0.5, 0.9, 0.75]))}, "metrics": {"coverage": 1.0}},
        up: {"image_miou": {"": dict(zip(ids, [0.8, 0.7, 0.7]))}},
        "box_seeds": {"image_miou": {"grabcut_filled": dict(zip(ids, [0.5, 0.9, 0.75]))}},
    }
    against_up, against_grabcut = changed_images(the_run, "crf", manifests)
    assert against_up == {"against": up, "images": 3, "worse": 1, "better": 1, "worst": [ids[0]]}
    assert against_grabcut == {"against": "GrabCut filled", "images": 3, "worse": 0, "better": 0, "worst": []}
    manifests["crf"]["metrics"]["coverage"] = 0.8  # a seed map: pixels left unknown on purpose
    assert changed_images(the_run, "crf", manifests) == []
    cli._print_ladder(the_run)
    out = " ".join(capsys.readouterr().out.split())
    real = changed_images(the_run, "crf", {n: the_run.store(n).read_manifest() for n in the_run.names})
    assert f"per image against GrabCut filled: {real[1]['worse']} worse and {real[1]['better']} better" in out

    # without GT: each image's agreement with the map a stage started from, the review list
    agreed = crf["image_agreement"]
    assert set(agreed) == {up, "GrabCut filled"} and set(agreed[up]) == set(crf["image_miou"][""])
    c = the_run.dataset.num_classes
    for image_id, value in agreed["GrabCut filled"].items():
        mine = the_run.store("crf").read_label(image_id)
        ref = the_run.store("box_seeds").read_label(image_id, "grabcut_filled")
        held = [k for k in range(c) if ((mine == k) | (ref == k)).any()]
        ious = [((mine == k) & (ref == k)).sum() / ((mine == k) | (ref == k)).sum() for k in held]
        assert value == pytest.approx(float(np.mean(ious)), abs=1e-4)
    assert "image_agreement" not in the_run.store("seeds").read_manifest()  # seed maps leave pixels unknown
    from pipeline.scoring import review

    rows = review(the_run, {n: the_run.store(n).read_manifest() for n in the_run.names})
    assert len(rows) == len(agreed[up]) and [r["disagreement"] for r in rows] == sorted(
        (r["disagreement"] for r in rows), reverse=True
    )
    top = rows[0]
    lowest = min((v, k) for k, v in top["agreements"].items())
    assert top["disagreement"] == pytest.approx(1 - lowest[0]) and f"{top['stage']} vs {top['against']}" == lowest[1]
    res = runner.invoke(app, ["status", str(path)])
    assert res.exit_code == 0 and "images to look at first" in res.output
    assert f"{top['image']} disagreement {top['disagreement']:.3f}" in " ".join(res.output.split())
    res = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "ex")])
    assert res.exit_code == 0, res.output
    import csv

    with open(tmp_path / "ex" / "review.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["image_id"] for r in table] == [r["image"] for r in rows] and table[0]["rank"] == "1"
    assert table[0]["image"] == the_run.dataset.image_path(top["image"])
    assert float(table[0][f"crf vs {up}"]) == top["agreements"][f"crf vs {up}"]

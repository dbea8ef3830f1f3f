import pytest

from pipeline.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "crf:\n  iteratons: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value) and "crf.iteratons" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_and_impossible_value(tmp_path):
    p = write(tmp_path, "box_seeds:\n  iterations: many\ncrf:\n  bilateral_sxy: -2\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "box_seeds.iterations" in msg and "crf.bilateral_sxy" in msg and str(p) in msg


def test_dataset_key_path_without_discriminator(tmp_path):
    p = write(tmp_path, "dataset:\n  kind: masks\n")
    with pytest.raises(ConfigError, match=r"dataset\.root: Field required"):
        load_config(p)


def test_set_overrides_are_typed(tmp_path):
    p = write(tmp_path, "run: x\n")
    cfg = load_config(p, ["crf.iterations=4", "box_seeds.crop_margin=null", "dataset.num_train=3"])
    assert cfg.crf.iterations == 4 and cfg.box_seeds.crop_margin is None and cfg.dataset.num_train == 3
    with pytest.raises(ConfigError, match="--set crf.iterations=0"):
        load_config(p, ["crf.iterations=0"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(p, ["crf.iterations"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))


def test_labels_and_method_default_check_and_name_what_is_allowed(tmp_path):
    from pipeline.runner import build_dag

    cases = {"a2gnn": "box", "spml": "box", "dfr": "scribble", "blpseg": "scribble", "rrm": "tags", "scl": "masks"}
    for method, labels in cases.items():
        assert load_config(write(tmp_path, f"method: {method}\n")).labels == labels, method
    dfr = load_config(write(tmp_path, "method: dfr\nlabels: point\n"))
    assert dfr.labels == "point" and [s.name for s in build_dag(dfr)[0]] == ["dfr_train", "dfr_eval"]
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "method: dfr\nlabels: box\n"))
    assert str(err.value).count("\n") == 0 and "method 'dfr' takes labels: scribble | point (got 'box')" in str(
        err.value
    )
    with pytest.raises(ConfigError, match="unknown method 'psa' .known: a2gnn, spml, dfr, blpseg, rrm, scl"):
        load_config(write(tmp_path, "method: psa\n"))
    with pytest.raises(ConfigError, match="labels: Input should be 'box', 'scribble', 'point', 'tags' or 'masks'"):
        load_config(write(tmp_path, "labels: image\n"))


@pytest.mark.parametrize(
    "text, says",
    [
        ("supervision: image\n", "for supervision: image write labels: tags"),
        ("supervision: dfr\n", "for supervision: dfr write method: dfr (labels: scribble or point)"),
        ("supervision: fewshot\n", "for supervision: fewshot write method: scl"),
        ("task: fewshot\n", "task: this key is gone; write method: scl"),
        ("spml_train:\n  enabled: true\n", "spml_train.enabled: this key is gone; write method: spml"),
        ("dfr_train:\n  labels: point\n", "dfr_train.labels: this key is gone; write the top-level labels:"),
    ],
)
def test_an_older_config_key_gets_one_line_saying_what_to_write(tmp_path, text, says):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: ") and says in msg and "\n" not in msg


def test_base_files_merge_in_order_relative_to_the_config_and_set_goes_on_top(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "data.yaml").write_text("dataset: {kind: demo, num_train: 5, num_val: 3}\ncrf: {iterations: 2}\n")
    (tmp_path / "b" / "more.yaml").write_text("_base_: data.yaml\ncrf: {iterations: 3, bilateral_sxy: 20}\n")
    p = write(tmp_path, "_base_: [b/data.yaml, b/more.yaml]\nrun: x\ncrf: {bilateral_sxy: 30}\n")
    cfg = load_config(p)
    assert (cfg.dataset.num_train, cfg.dataset.num_val, cfg.crf.iterations, cfg.crf.bilateral_sxy) == (5, 3, 3, 30)
    assert load_config(p, ["crf.iterations=7"]).crf.iterations == 7
    # a mapping with _delete_ replaces the base's instead of merging into it
    q = write(tmp_path, "_base_: b/data.yaml\ndataset: {_delete_: true, kind: demo, num_val: 4}\n")
    assert (load_config(q).dataset.num_train, load_config(q).dataset.num_val) == (32, 4)


@pytest.mark.parametrize(
    "base, says",
    [
        ("_base_: nope.yaml\n", "_base_: {dir}/nope.yaml: config file not found"),
        ("_base_: run.yaml\n", "_base_: run.yaml includes itself"),
        ("_base_: {a: 1}\n", "_base_: expected a file name or a list of them"),
    ],
)
def test_a_bad_base_is_one_line_naming_the_config(tmp_path, base, says):
    p = write(tmp_path, base)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert msg.startswith(str(p)) and says.format(dir=tmp_path.resolve()) in msg and "\n" not in msg


def test_shipped_configs_are_a_few_lines_over_their_bases_and_no_dataset_block_is_written_twice():
    from pathlib import Path

    import yaml

    root = Path(__file__).parent.parent / "configs"
    seen: dict[str, Path] = {}
    for path in sorted(root.rglob("*.yaml")):
        own = [line for line in path.read_text().splitlines() if line.strip()]
        data = yaml.safe_load(path.read_text()) or {}
        if path.parent == root:
            assert len(own) <= 26, (path.name, len(own))
        block = data.get("dataset", {})
        if {"root", "kind"} & set(block):  # a dataset's description, not a per-run tweak such as max_side
            key = yaml.safe_dump(block, sort_keys=True)
            assert key not in seen, (path, seen.get(key))
            seen[key] = path
            assert path.parent.name == "datasets", f"{path}: a dataset block belongs in configs/_base_/datasets"


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        load_config(path)


def test_the_dag_follows_the_declared_inputs_not_the_registration_order(monkeypatch):
    from pipeline.config import config_from_dict
    from pipeline.runner import build_dag
    from stages.base import STAGES

    config = config_from_dict({"labels": "box"}, "<test>")
    dag, upstream = build_dag(config)
    names = [s.name for s in dag]
    assert names[:3] == ["box_seeds", "cam_train", "cam"] and names.index("graph") < names.index("a2gnn")
    monkeypatch.setattr(STAGES, "_items", dict(reversed(list(STAGES._items.items()))))
    reordered = [s.name for s in build_dag(config)[0]]
    assert sorted(reordered) == sorted(names)
    for name, inputs in upstream.items():
        assert all(reordered.index(u) < reordered.index(name) for u in inputs)


def test_the_cli_starts_without_torch():
    import subprocess
    import sys

    code = "import sys, pipeline.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

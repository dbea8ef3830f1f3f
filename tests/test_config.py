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


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        load_config(path)


def test_the_dag_follows_the_declared_inputs_not_the_registration_order(monkeypatch):
    from pipeline.config import config_from_dict
    from pipeline.runner import build_dag
    from stages.base import STAGES

    config = config_from_dict({"supervision": "box"}, "<test>")
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

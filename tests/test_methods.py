"""Methods and stages come from their registries: a method in a package of its own runs in the
DAG with no edit to any list of the project."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from pipeline.config import ConfigError, config_from_dict
from pipeline.runner import make_run, run_local
from stages.base import STAGES
from stages.methods import METHODS

TOY = '''
import numpy as np
from pydantic import PositiveInt

from stages.base import STAGES, StageSpec, run_items
from stages.methods import METHODS, MethodSpec
from stages.sections import Section


class ToyFillConfig(Section):
    """Every pixel of a train image becomes class ``value``."""

    value: PositiveInt = 1


def _fill(ctx, image_id):
    h, w = ctx.dataset.load_image(image_id).shape[:2]
    ctx.out.write_label(image_id, np.full((h, w), ctx.section.value, np.uint8))
    return {}


def run(ctx):
    return run_items(ctx, _fill, desc="toy")


STAGES.register(StageSpec(name="toy_fill", run=run, inputs=lambda config: [], section=ToyFillConfig, parallel=False))
METHODS.register(MethodSpec("toy", ("tags", "box"), ("toy_fill",), "toy_fill", "toy_fill"))
'''


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """A package ``toyplug`` on sys.path whose module ``toyplug.toy`` registers one method and
    its one stage; the registries are restored afterwards."""
    pkg = tmp_path / "toyplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "toy.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(STAGES, "_items", dict(STAGES._items))
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    monkeypatch.delitem(__import__("sys").modules, "toyplug.toy", raising=False)
    monkeypatch.delitem(__import__("sys").modules, "toyplug", raising=False)
    return tmp_path


def _toy(tmp_path, **section):
    return config_from_dict(
        {"imports": ["toyplug.toy"], "method": "toy", "run": "toy", "output_root": str(tmp_path / "a"),
         "engine": "local", "workers": 1, "dataset": {"kind": "demo", "num_train": 3, "num_val": 1},
         "toy_fill": section},
        "<toy>",
    )  # fmt: skip


def test_a_method_in_its_own_package_runs_in_the_dag_with_no_central_edit(toy_package):
    config = _toy(toy_package, value=2)
    assert config.labels == "tags" and config.toy_fill.value == 2
    run = make_run(config)
    assert run.names == ["toy_fill"]
    out = run_local(run, run.names)["toy_fill"]
    assert out["status"] == "complete" and out["counts"]["done"] == 3
    for image_id in run.ids("toy_fill"):
        assert np.array_equal(np.unique(run.store("toy_fill").read_label(image_id)), [2])
    assert "toy_fill" in run.config.model_dump()  # the saved config carries the section
    with pytest.raises(ConfigError, match=r"toy_fill\.value: Input should be greater than 0"):
        _toy(toy_package, value=0)
    with pytest.raises(ConfigError, match=r"toy_fill\.colour: unknown key"):
        _toy(toy_package, colour=3)
    with pytest.raises(ConfigError, match=r"labels: method 'toy' takes labels: tags \| box \(got 'point'\)"):
        config_from_dict({"imports": ["toyplug.toy"], "method": "toy", "labels": "point"}, "<toy>")


def test_imports_that_do_not_import_and_methods_without_a_module_say_so(toy_package):
    with pytest.raises(ConfigError, match="<c>: imports: cannot import 'nopkg.nomod'"):
        config_from_dict({"imports": ["nopkg.nomod"]}, "<c>")
    from stages import load_all
    from stages.methods import MethodSpec

    METHODS.register(MethodSpec("ghost", ("box",), ("ghost_train",), "ghost_train", "ghost_train"))
    with pytest.raises(KeyError, match="method 'ghost' lists stage 'ghost_train', which no module registers"):
        load_all()


def test_every_stage_belongs_to_a_method_and_has_its_section():
    listed = {name for m in METHODS.names() for name in METHODS.get(m).stages}
    assert listed == set(STAGES.names())
    for name in STAGES.names():
        assert STAGES.get(name).section is not None, name


def test_the_ladder_dispatches_on_what_a_stage_declares_it_scores():
    from pipeline.cli import shot_keys
    from stages.base import Output, Scoring

    metrics = {"1shot": {}, "10shot": {}, "5shot": {}, "1shot_prototype": {}, "miou": 0.5, "screenshot": 1}
    assert shot_keys(STAGES.get("fewshot_eval"), metrics) == ["1shot", "5shot", "10shot"]
    assert shot_keys(STAGES.get("crf"), metrics) == []
    kinds = {n: (STAGES.get(n).output, STAGES.get(n).scores) for n in ("crf", "cam", "instances", "final_train")}
    assert kinds == {
        "crf": (Output.LABEL, Scoring.MAPS),
        "cam": (Output.SOFT, Scoring.MAPS),
        "instances": (Output.INSTANCES, Scoring.MASK_AP),
        "final_train": (Output.MODEL, Scoring.NONE),
    }


def test_each_benchmark_measures_a_registered_stage_and_the_cli_lists_them():
    from typer.testing import CliRunner

    from pipeline.bench import BENCHES, ORCHESTRATION
    from pipeline.cli import app

    assert set(BENCHES) - set(ORCHESTRATION) <= set(STAGES.names())
    res = CliRunner().invoke(app, ["bench", "list"])
    assert res.exit_code == 0 and res.output.split() == sorted(BENCHES)
    res = CliRunner().invoke(app, ["bench", "nope"])
    assert res.exit_code == 2 and "unknown benchmark 'nope' (known: a2gnn, affinity_train," in res.output

"""End to end on real and demo data, local engine (the Prefect flow is tested in test_flow.py)."""

import numpy as np
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.runner import make_run, run_local

from .conftest import demo_config


def test_demo_box_slice_quality(tmp_path):
    run = make_run(demo_config(tmp_path, workers=2, dataset__num_train=12, cam__enabled=False, crf__input="seeds"))
    out = run_local(run, ["box_seeds", "seeds", "crf"])
    seeds, crf = out["box_seeds"]["metrics"], out["crf"]["metrics"]
    assert seeds["images"] == crf["images"] == 12
    # GrabCut seeds: most pixels labeled, nearly all correctly; CRF labels every pixel.
    assert seeds["coverage"] > 0.85 and seeds["precision"] > 0.97 and seeds["miou"] > 0.85
    assert crf["coverage"] == 1.0 and crf["miou"] > 0.85
    assert out["crf"]["bytes"] > 0 and out["crf"]["timings"]["per_image_s"] > 0


def test_bad_image_is_recorded_and_the_run_goes_on(tmp_path, horses):
    from .conftest import horse_config, horse_subset

    root = horse_subset(tmp_path, horses, 3)
    data = (root / "rgb" / "horse002.jpg").read_bytes()
    (root / "rgb" / "horse002.jpg").write_bytes(data[: len(data) // 3])  # truncated
    cfg = config_from_dict(horse_config(tmp_path, root))
    out = run_local(make_run(cfg), ["box_seeds", "seeds", "crf"])
    m = out["box_seeds"]
    assert m["counts"] == {"total": 3, "done": 2, "failed": 1} and m["status"] == "complete"
    assert "horse002.jpg" in m["failures"]["horse002"] and "truncated" in m["failures"]["horse002"]
    assert out["crf"]["counts"]["done"] == 2


def test_horses_box_slice_quality(tmp_path, horses):
    cfg = config_from_dict(
        {
            "run": "horses",
            "output_root": str(tmp_path / "a"),
            "engine": "local",
            "workers": 2,
            "cam": {"enabled": False},
            "crf": {"input": "seeds"},
            "dataset": {
                "kind": "masks",
                "root": str(horses),
                "images": "rgb",
                "masks": "figure_ground",
                "class_names": ["background", "horse"],
                "resize": "image_to_mask",
                "limit": 24,
            },
        }
    )
    out = run_local(make_run(cfg), ["box_seeds", "seeds", "crf"])
    seeds, crf = out["box_seeds"]["metrics"], out["crf"]["metrics"]
    assert out["box_seeds"]["counts"]["failed"] == 0
    assert seeds["precision"] > 0.85 and seeds["coverage"] > 0.6
    assert crf["miou"] > 0.6 and crf["coverage"] == 1.0
    # The stored labels are VOC-palette PNGs at the mask's size.
    run = make_run(cfg)
    some = sorted(run.store("crf").done_ids())[0]
    img = Image.open(run.store("crf").item_path(some))
    assert img.mode == "P" and np.array(img).shape == run.dataset.load_gt(some).shape

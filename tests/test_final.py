"""Final stages: the CRF's inference parameters, the dense-CRF loss, final_train (resume),
final_eval (multi-scale, CRF column), instances (RLE, mask AP), and the demo's final model
against its GT-trained upper bound."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from models.affinity import window_offsets
from models.backbones import multiscale_sum, normalize
from models.losses import dense_crf_loss
from models.metrics import average_precision, mask_ap, match_instances
from pipeline.config import Config, config_from_dict
from pipeline.runner import make_run, run_local
from stages.base import Box
from models.boxes import instance_map, instance_score
from stages.instances import rle_encode

from .conftest import DEMO_BACKGROUND_ONLY, demo_config, kill_and_resume


def test_crf_stage_defaults_are_the_released_a2gnn_inference_parameters():
    cfg = Config()
    got = {
        k: getattr(cfg.crf, k)
        for k in (
            "gaussian_sxy",
            "gaussian_compat",
            "bilateral_sxy",
            "bilateral_srgb",
            "bilateral_compat",
            "iterations",
        )
    }
    assert got == {
        "gaussian_sxy": 2,
        "gaussian_compat": 3,
        "bilateral_sxy": 50,
        "bilateral_srgb": 5,
        "bilateral_compat": 10,
        "iterations": 10,
    }
    assert cfg.final_eval.crf.model_dump() == cfg.crf.model_dump(
        exclude={"input", "gt_prob", "grabcut_refine", "grabcut_min_iou", "bilateral_scale"}
    )
    assert (cfg.seeds.crf.bilateral_sxy, cfg.seeds.crf.bilateral_srgb) == (80, 13)  # PSA's, for the seeds
    assert cfg.crf.bilateral_scale is None  # the rule is opt-in: the released absolute width by default


def _naive_crf_loss(logits, images, valid, radius, sxy, srgb):
    probs = torch.softmax(logits, 1)
    rgb = normalize(images)
    n, _, h, w = logits.shape
    total = logits.new_zeros(())
    for b in range(n):
        for y in range(h):
            for x in range(w):
                for dy, dx in window_offsets(radius, "square"):
                    v, u = y + dy, x + dx
                    if not (0 <= v < h and 0 <= u < w) or not (valid[b, y, x] and valid[b, v, u]):
                        continue
                    k = torch.exp(
                        -torch.tensor(dy * dy + dx * dx) / (2 * sxy**2)
                        - ((rgb[b, :, y, x] - rgb[b, :, v, u]) ** 2).sum() / (2 * srgb**2)
                    )
                    total = total + k * (1 - (probs[b, :, y, x] * probs[b, :, v, u]).sum())
    return total / (n * h * w)


def test_dense_crf_loss_matches_a_naive_pair_loop_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    images = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64) * 255
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    valid[1, :, 4:] = False  # crop padding
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast = dense_crf_loss(a, images, valid, 2, 1.0, 3.0, 0.8)
    slow = _naive_crf_loss(b, images, valid, 2, 3.0, 0.8)
    fast.backward()
    slow.backward()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad)
    assert fast.item() > 0


def test_dense_crf_loss_at_half_scale_is_the_loss_of_the_resized_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64)
    images = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64) * 255
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    probs = F.interpolate(torch.softmax(logits, 1), size=(4, 4), mode="bilinear", align_corners=False)
    small = F.interpolate(images, size=(4, 4), mode="bilinear", align_corners=False)
    expect = _naive_crf_loss(torch.log(probs), small, valid[:, ::2, ::2], 1, 2.0, 0.5)
    assert float(dense_crf_loss(logits, images, valid, 1, 0.5, 2.0, 0.5)) == pytest.approx(float(expect), rel=1e-6)


def test_multiscale_sum_resizes_flips_back_and_sums():
    x = torch.arange(3 * 4 * 6, dtype=torch.float64).view(1, 3, 4, 6) / 10
    torch.testing.assert_close(multiscale_sum(lambda b: b, x, [1.0], flip=True), 2 * x[0])
    down = F.interpolate(x, size=(2, 3), mode="bilinear", align_corners=False)
    expect = F.interpolate(down, size=(4, 6), mode="bilinear", align_corners=False)[0] + x[0]
    torch.testing.assert_close(multiscale_sum(lambda b: b, x, [0.5, 1.0], flip=False), expect)
    # fn that is not flip-equivariant: the flipped pass is flipped back before summing
    left = lambda b: b[:, :1] * torch.linspace(0, 1, b.shape[-1], dtype=b.dtype)  # noqa: E731
    ramp = torch.linspace(0, 1, 6, dtype=torch.float64)
    torch.testing.assert_close(multiscale_sum(left, x, [1.0], flip=True)[0], x[0, 0] * ramp + x[0, 0] * ramp.flip(0))


# --------------------------------------------------------------------------- instances
def test_rle_is_pycocotools_compressed_and_round_trips():
    mask = np.random.default_rng(0).random((7, 9)) > 0.6
    rle = rle_encode(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [7, 9]
    json.dumps(rle)  # JSON-ready
    np.testing.assert_array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool), mask)
    assert mask_utils.area({**rle, "counts": rle["counts"].encode()}) == mask.sum()


def test_instance_map_gives_overlaps_to_the_smaller_box_and_keeps_the_class():
    labels = np.zeros((6, 8), np.uint8)
    labels[1:5, 1:7] = 1
    labels[2, 2] = 2
    boxes = [Box(0, 0, 8, 6, 1), Box(4, 1, 7, 5, 1), Box(2, 2, 3, 3, 2)]
    inst = instance_map(labels, boxes)
    assert (inst[1:5, 4:7] == 2).all()  # the small box wins its overlap
    assert inst[2, 2] == 3 and inst[1, 1] == 1 and inst[0, 0] == 0
    assert instance_score(inst == 2, boxes[1]) == 1.0
    assert instance_score(inst == 1, boxes[0]) == pytest.approx((4 * 3) / 48)  # rows 1-4, columns 1-3


def _strip(pixels, n=100):
    m = np.zeros((1, n), bool)
    m[0, pixels] = True
    return m


def test_mask_ap_matches_a_hand_computed_example():
    gts = [(1, _strip(slice(0, 10))), (1, _strip(slice(20, 45))), (2, _strip(slice(60, 70)))]
    dets = [
        (1, 0.9, _strip(slice(0, 8))),  # IoU 0.8 with the first GT
        (1, 0.8, _strip(slice(0, 6))),  # IoU 0.6 with it again: a duplicate
        (1, 0.7, _strip(slice(20, 38))),
    ]  # IoU 0.72 with the second GT
    records = match_instances(dets, gts, [0.5, 0.75])
    assert [r[2] for r in records] == [[True, True], [False, False], [True, False]]
    out = mask_ap(records, {1: 2, 2: 1}, [0.5, 0.75], ["bg", "a", "b"])
    # t=0.5: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3
    assert out["AP@0.5"]["a"] == pytest.approx(0.5 + 1 / 3)
    assert out["AP@0.75"]["a"] == pytest.approx(0.5)
    assert out["AP@0.5"]["b"] == 0.0  # a class with GT and no detection
    assert out["mAP@0.5"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert average_precision(np.array([False, True]), 1) == pytest.approx(0.5)
    assert np.isnan(average_precision(np.array([True]), 0))


# --------------------------------------------------------------------------- dead dilated taps
@pytest.mark.parametrize("size,dilation,groups", [((8, 8), 12, 1), ((8, 10), 6, 1), ((5, 30), 4, 3), ((9, 9), 2, 6)])
def test_live_tap_conv_equals_the_full_dilated_conv_in_value_and_gradient(size, dilation, groups):
    from models.dilated import LiveTapConv2d, live_taps

    torch.manual_seed(0)
    full = torch.nn.Conv2d(6, 6, 5, padding=2 * dilation, dilation=dilation, groups=groups).double()
    live = LiveTapConv2d(6, 6, 5, padding=2 * dilation, dilation=dilation, groups=groups).double()
    live.load_state_dict(full.state_dict())
    x = torch.randn(2, 6, *size, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    a, b = full(x), live(y)
    torch.testing.assert_close(b, a)
    (a * a.detach()).sum().backward()
    (b * a.detach()).sum().backward()
    torch.testing.assert_close(y.grad, x.grad)
    torch.testing.assert_close(live.weight.grad, full.weight.grad)
    # the pruned taps' gradient is exactly zero, as the full conv's is
    m = live_taps(5, dilation, size[0])
    if m < 2:
        assert live.weight.grad[:, :, : 2 - m].abs().max() == 0 and full.weight.grad[:, :, : 2 - m].abs().max() == 0


def test_deeplab_swaps_the_aspp_convs_and_keeps_its_state_dict_keys():
    from models.dilated import LiveTapConv2d
    from models.segmentation import DeepLab

    torch.manual_seed(0)
    net = DeepLab("deeplabv3_mobilenet_v3_large", 3).eval()
    swapped = [m for m in net.head.modules() if isinstance(m, LiveTapConv2d)]
    assert [m.dilation for m in swapped] == [(12, 12), (24, 24), (36, 36)]
    torch.manual_seed(0)
    import torchvision

    ref = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False
    )
    assert {f"backbone.{k}" for k in ref.backbone.state_dict()} | {
        f"head.{k}" for k in ref.classifier.state_dict()
    } == set(net.state_dict())
    ref.backbone.load_state_dict(net.backbone.state_dict())
    ref.classifier.load_state_dict(net.head.state_dict())
    ref.eval()
    images = torch.rand(1, 3, 128, 96) * 255
    with torch.no_grad():
        expect = F.interpolate(
            ref.classifier(ref.backbone(normalize(images))["out"]), size=(128, 96), mode="bilinear", align_corners=False
        )
        torch.testing.assert_close(net(images), expect, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- final_train
def _tiny_final(tmp_path, **kw):
    settings = dict(
        dataset__num_train=4,
        dataset__height=64,
        dataset__width=64,
        final_train={
            "arch": "deeplabv3_mobilenet_v3_large",
            "labels": "gt",
            "crop": 48,
            "batch_size": 2,
            "iterations": 4,
            "checkpoint_every": 2,
            "reg_weight": 0.5,
            "reg_radius": 2,
        },
    )
    return demo_config(tmp_path, **{**settings, **kw})


def test_final_train_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    import stages.final_train as ft

    # killed inside the dense-CRF loss of step 3: the rloss path and the dropout RNG are resumed too
    m1, m2, state1, state2 = kill_and_resume(tmp_path, monkeypatch, _tiny_final, "final_train", ft, "dense_crf_loss")
    assert m2["info"]["steps"] == 4 and m2["info"]["reg_loss_last"] > 0
    assert m2["info"]["loss_curve"] == pytest.approx(m1["info"]["loss_curve"], rel=1e-5)
    for key, value in state1["state_dict"].items():
        torch.testing.assert_close(state2["state_dict"][key], value, rtol=1e-4, atol=1e-5)


def test_final_eval_writes_both_columns_and_multiscale_changes_the_probabilities(tmp_path):
    from models.segmentation import predict_probs
    from stages.final_train import load_trained

    cfg = _tiny_final(tmp_path, final_eval={"scales": [0.75, 1.0], "flip": True})
    run = make_run(cfg)
    out = run_local(run, ["final_train", "final_eval"])["final_eval"]
    assert out["status"] == "complete" and out["counts"]["done"] == cfg.dataset.num_val
    assert set(out["metrics"]["maps"]) == {"crf"} and 0 <= out["metrics"]["maps"]["crf"]["miou"] <= 1
    store = run.store("final_eval")
    image_id = run.ids("final_eval")[0]
    assert store.read_label(image_id).shape == store.read_label(image_id, "crf").shape == (64, 64)
    model = load_trained(run.store("final_train").read_model(), "cpu")
    image = run.dataset.load_image(image_id)
    multi = predict_probs(model, image, [0.75, 1.0], True)
    np.testing.assert_array_equal(store.read_label(image_id), multi.argmax(0))
    np.testing.assert_allclose(multi.sum(0), 1.0, atol=1e-5)
    assert np.abs(multi - predict_probs(model, image)).max() > 1e-3


def test_instances_need_boxes_and_final_train_rejects_unknown_weights(tmp_path):
    from pipeline.config import ConfigError

    assert "instances" not in make_run(demo_config(tmp_path, labels="scribble")).names
    with pytest.raises(ConfigError, match="final_train: .*not found"):
        make_run(demo_config(tmp_path, final_train={"weights": str(tmp_path / "missing.pth")}))


# --------------------------------------------------------------------------- the demo
@pytest.mark.claims
def test_demo_final_model_is_within_10_points_of_its_gt_upper_bound(demo_box_run):
    """Table 3.1 at demo scale: DeepLab on the CRF'd A²GNN labels vs the same settings on GT.
    Training seeds 0 / 1 / 2 (docs/results.md): 0.354 / 0.354 / 0.360 against 0.425 / 0.407 / 0.364 on GT,
    all-background 0.215: both floors (+0.10) are under the smallest gain over all-background
    (0.139); this runs seed 0."""
    run = demo_box_run
    done = run_local(run, ["crf", "final_train", "final_eval", "instances"])
    pseudo = done["final_eval"]["metrics"]
    data = copy.deepcopy(run.config.model_dump(mode="json"))
    data["final_train"]["labels"] = "gt"
    upper_run = make_run(config_from_dict(data, "<upper bound>"))
    upper = run_local(upper_run, ["final_train", "final_eval"])["final_eval"]["metrics"]
    assert upper["miou"] > DEMO_BACKGROUND_ONLY + 0.10, upper["miou"]
    assert pseudo["miou"] > DEMO_BACKGROUND_ONLY + 0.10, pseudo["miou"]
    assert pseudo["miou"] > upper["miou"] - 0.10, (pseudo["miou"], upper["miou"])
    assert "crf" in pseudo["maps"]
    inst = done["instances"]["metrics"]
    assert inst["gt_objects"] > 32 and inst["mAP@0.5"] > 0.7 and inst["mAP@0.5"] >= inst["mAP@0.75"]
    assert "miou" not in inst  # instance ids are not semantic labels


def test_bench_final_train_rows(tmp_path):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    res = CliRunner().invoke(
        app,
        [
            "bench",
            "final_train",
            "--images",
            "2",
            "--size",
            "96x64",
            "--opt",
            "arch=deeplabv3_mobilenet_v3_large",
            "--opt",
            "batch=2",
            "--opt",
            "crop=64",
            "--opt",
            "reg=true",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    train, single, multi = json.loads((tmp_path / "b.json").read_text())
    assert "loss crf" in train["case"] and train["images"] == 2 and "single scale" in single["case"]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in (train, single, multi))


def test_mask_rcnn_training_says_it_needs_the_compiled_torchvision_ops(tmp_path, monkeypatch):
    import models.tvcompat as tvc
    from pipeline.config import ConfigError

    assert "instance_train" not in make_run(demo_config(tmp_path)).names  # off by default
    monkeypatch.setitem(tvc._state, "compiled_ops", False)  # as on this CPU-only torch
    with pytest.raises(ConfigError, match="instance_train .Mask R-CNN.: this feature needs torchvision's compiled"):
        make_run(demo_config(tmp_path, instance_train={"enabled": True}))

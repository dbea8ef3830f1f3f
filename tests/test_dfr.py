"""DFR branch: every loss of Eq. 1-13 against a naive pixel-pair loop (values and
gradients), the Swin + UperNet network, the schedule and augmentation, the stages'
resume, and the demo quality claim (full DFR beats pCE only)."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.backbones import normalize
from models.losses import DfrTerms, dfr_objective
from pipeline.runner import make_run, run_local
from stages.augment import photometric
from stages.training import poly_lr

from .conftest import demo_config

IGNORE = 255


def _naive_eq1(logits, feats, images, scribbles, valid, t: DfrTerms) -> dict:
    """Eq. 1-13 with explicit loops over pixels i and window neighbours j (input = grid size)."""
    n, c, h, w = logits.shape
    probs = torch.softmax(logits, 1)
    rgb = normalize(images)
    out = {"pce": F.cross_entropy(logits, scribbles, ignore_index=IGNORE)}  # Eq. 2: mean over scribbled pixels
    m = torch.where(
        (probs.detach().max(1).values > t.gamma) & valid, probs.detach().argmax(1), torch.full((n, h, w), IGNORE)
    )  # Eq. 7
    dfr = fr = logits.new_zeros(())
    bg, fg, neg, k_feature = [], [], [], []
    for b, y, x in itertools.product(range(n), range(h), range(w)):
        for dy, dx in itertools.product(range(-t.radius, t.radius + 1), repeat=2):
            yy, xx = y + dy, x + dx
            if (dy, dx) == (0, 0) or not (0 <= yy < h and 0 <= xx < w) or not (valid[b, y, x] and valid[b, yy, xx]):
                continue
            e_xy = (dy * dy + dx * dx) / (2 * t.sigma_xy**2)
            e_rgb = ((rgb[b, :, y, x] - rgb[b, :, yy, xx]) ** 2).sum() / (2 * t.sigma_rgb**2)
            e_f = ((feats[b, :, y, x] - feats[b, :, yy, xx]).detach() ** 2).sum() / (2 * t.sigma_feat**2)
            k = torch.exp(
                -(e_xy if t.kernel_xy else 0) - (e_rgb if t.kernel_rgb else 0) - (e_f if t.kernel_feature else 0)
            )  # Eq. 6
            k_feature.append(torch.exp(-e_f))
            dfr = dfr + k * (1 - (probs[b, :, y, x] * probs[b, :, yy, xx]).sum())  # Eq. 5
            mi, mj = int(m[b, y, x]), int(m[b, yy, xx])
            if mi == IGNORE or mj == IGNORE:
                continue
            dist = (feats[b, :, y, x] - feats[b, :, yy, xx]).abs().sum() / feats.shape[1]
            d = torch.exp(-dist)  # Eq. 10
            (neg if mi != mj else bg if mi == 0 else fg).append(d)
            fr = fr + torch.exp(-e_xy - e_rgb) * dist  # Eq. 12-13
    out["dfr"] = dfr / (n * h * w)  # Eq. 4

    def mean(xs):
        return torch.stack(xs).mean() if xs else logits.new_zeros(())

    out["fd"] = (
        mean([-torch.log(d) for d in bg])
        + mean([-torch.log(d) for d in fg])
        + 2 * mean([-torch.log(1 - d) for d in neg])
    )  # Eq. 11
    out["fr"] = fr / (n * h * w)
    out["loss"] = out["pce"] + t.lambda_dfr * out["dfr"] + t.lambda_feat * (out["fd"] + out["fr"])
    out["pairs"] = (len(bg), len(fg), len(neg))
    out["k_feature"] = torch.stack(k_feature).mean()  # diagnostics: mean K_f factor, share of M known
    out["confident"] = (m != IGNORE).sum() / valid.sum()
    return out


def _tiny_problem(seed=0, n=2, c=3, h=7, w=6, d=5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, h, w, generator=g) * 4).requires_grad_()
    feats = torch.rand(n, d, h, w, generator=g).requires_grad_()
    images = torch.rand(n, 3, h, w, generator=g) * 255
    scribbles = torch.full((n, h, w), IGNORE, dtype=torch.long)
    scribbles[:, 1, 1:4] = 0
    scribbles[:, 4, 2:5] = 2
    valid = torch.ones(n, h, w, dtype=torch.bool)
    valid[1, :, -2:] = False  # crop padding
    return logits, feats, images, scribbles, valid


def test_every_dfr_term_matches_the_naive_pair_loop_values_and_gradients():
    # large sigma_feat and a low gamma so that both the feature kernel and all three pair sets matter
    terms = DfrTerms(radius=2, sigma_xy=1.5, sigma_rgb=0.8, sigma_feat=0.7, gamma=0.9, lambda_dfr=0.3, lambda_feat=0.2)
    args = _tiny_problem()
    ours = dfr_objective(*args, terms)
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    ref = _naive_eq1(*ref_args, terms)
    assert min(ref["pairs"]) > 3, ref["pairs"]  # bg+, fg+ and negative pairs all present
    assert 0.05 < float(ref["k_feature"]) < 0.95 and 0.05 < float(ref["confident"]) < 0.95
    for key in ("pce", "dfr", "fd", "fr", "loss", "k_feature", "confident"):
        assert float(ours[key].detach()) == pytest.approx(float(ref[key].detach()), rel=1e-4, abs=1e-6), key
    ours["loss"].backward()
    ref["loss"].backward()
    torch.testing.assert_close(args[0].grad, ref_args[0].grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(args[1].grad, ref_args[1].grad, rtol=1e-3, atol=1e-6)  # 1e-5 inside the logs


@pytest.mark.parametrize("switch", [{"kernel_xy": False}, {"kernel_rgb": False}, {"kernel_feature": False}])
def test_kernel_terms_switch_off_like_the_naive_loop(switch):
    terms = DfrTerms(radius=2, sigma_xy=1.5, sigma_rgb=0.8, sigma_feat=0.7, fd=False, fr=False, **switch)
    args = _tiny_problem(1)
    ref = _naive_eq1(*[a.detach() for a in args], terms)
    assert float(dfr_objective(*args, terms)["dfr"].detach()) == pytest.approx(float(ref["dfr"]), rel=1e-4)


def test_the_deep_feature_kernel_passes_no_gradient_into_the_features():
    terms = DfrTerms(radius=2, sigma_feat=0.7, fd=False, fr=False)
    logits, feats, *rest = _tiny_problem()
    out = dfr_objective(logits, feats, *rest, terms)
    out["loss"].backward()
    assert feats.grad is None and logits.grad.abs().sum() > 0
    # ... yet the features do shape the loss through K
    other = dfr_objective(logits.detach(), feats.detach() * 3, *rest, terms)["dfr"]
    assert abs(float(other) - float(out["dfr"].detach())) > 1e-4


def test_baselines_pce_only_and_potts():
    args = _tiny_problem()
    pce = {k: v.detach() for k, v in dfr_objective(*args, DfrTerms(dfr=False, fd=False, fr=False)).items()}
    assert set(pce) == {"pce", "loss"} and float(pce["loss"]) == pytest.approx(float(pce["pce"]))
    potts = DfrTerms(kernel_feature=False, fd=False, fr=False, radius=2, sigma_xy=1.5, sigma_rgb=0.8)
    assert not potts.uses_features and DfrTerms().uses_features
    out = {k: v.detach() for k, v in dfr_objective(args[0], None, *args[2:], potts).items()}  # no feature head
    ref = _naive_eq1(*[a.detach() for a in args], potts)
    assert float(out["dfr"]) == pytest.approx(float(ref["dfr"]), rel=1e-4)
    assert set(out) == {"pce", "dfr", "loss"}


def test_pce_is_taken_at_input_resolution_from_upsampled_logits():
    logits, feats = torch.randn(2, 3, 4, 4), torch.rand(2, 5, 4, 4)
    big = torch.full((2, 8, 8), IGNORE, dtype=torch.long)
    big[:, 2, 2:6] = 1
    out = dfr_objective(
        logits,
        feats,
        torch.rand(2, 3, 8, 8) * 255,
        big,
        torch.ones(2, 8, 8, dtype=torch.bool),
        DfrTerms(dfr=False, fd=False, fr=False),
    )
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    want = -torch.log_softmax(up, 1)[:, 1][big == 1].mean()
    assert float(out["pce"]) == pytest.approx(float(want), rel=1e-5)


def test_swin_uperNet_shapes_and_fusion_choices():
    from models.segmentation import DfrNet

    x = torch.rand(2, 3, 70, 90) * 255
    for stages in ([1, 2, 3, 4], [4], [1, 2], [3, 4]):
        net = DfrNet("swin_mini", 4, stages=stages, channels=16, feature_dim=8)
        logits, feats = net.forward_train(x)
        assert logits.shape == (2, 4, 17, 22) and feats.shape == (2, 8, 17, 22)  # stride-4 grid
        assert (feats >= 0).all()  # ReLU
        assert net.eval()(x).shape == (2, 4, 70, 90)
    with pytest.raises(ValueError, match="fusion stages"):
        DfrNet("swin_mini", 4, stages=[], channels=16)
    net = DfrNet("swin_mini", 4, channels=16)
    decay, no_decay = net.param_groups()
    assert len(decay) + len(no_decay) == len(list(net.parameters()))
    assert all(p.ndim > 1 for p in decay) and any(p.ndim > 1 for p in no_decay)  # position tables


def test_config_section_is_what_the_loss_reads():
    """DfrTrainConfig (validated YAML) is a DfrTerms: the loss fields, defaults and validators
    live once, and a config section drives the loss as it is."""
    import pydantic
    from stages.dfr_train import DfrTrainConfig

    cfg = DfrTrainConfig(fd=False, radius=3)
    assert isinstance(cfg, DfrTerms) and cfg.radius == 3 and not cfg.fd and cfg.gamma == DfrTerms().gamma
    with pytest.raises(pydantic.ValidationError, match="gamma"):
        DfrTrainConfig(gamma=1.0)
    args = _tiny_problem()
    assert torch.equal(dfr_objective(*args, cfg)["loss"], dfr_objective(*args, DfrTerms(fd=False, radius=3))["loss"])


def test_swin_weights_are_never_downloaded(tmp_path, monkeypatch):
    from models.backbones import SwinBackbone, WeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="swin_t.*never downloads"):
        SwinBackbone("swin_t", "imagenet")
    with pytest.raises(WeightsError, match="demo-sized"):
        SwinBackbone("swin_mini", "imagenet")


def test_warmup_then_poly_schedule():
    assert poly_lr(1.0, 0, 100, 1.0, 10, 1e-6) == pytest.approx(1e-6)
    assert poly_lr(1.0, 5, 100, 1.0, 10, 1e-6) == pytest.approx(0.95 * (1 - (1 - 1e-6) * 0.5))
    assert poly_lr(1.0, 50, 100, 1.0, 10, 1e-6) == pytest.approx(0.5)


def test_photometric_distortion_is_seeded_and_stays_in_range():
    img = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    a = photometric(img, np.random.default_rng(3))
    b = photometric(img, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    outs = [photometric(img, np.random.default_rng(s)) for s in range(8)]
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert sum(not np.array_equal(o, img) for o in outs) >= 6


def _tiny_dfr(path, **over):
    return demo_config(path, method="dfr", **over)


def test_dfr_dag_and_stages(tmp_path):
    run = make_run(_tiny_dfr(tmp_path))
    assert run.names == ["dfr_train", "dfr_eval"]
    done = run_local(run, ["dfr_train", "dfr_eval"])
    info = done["dfr_train"]["info"]
    assert info["terms"] == ["pce", "dfr", "fd", "fr"] and info["steps"] == 2
    assert 0 < info["k_feature_last"] <= 1 and 0 <= info["confident_last"] <= 1  # diagnostics in the manifest
    assert done["dfr_eval"]["counts"]["done"] == 2 and 0 <= done["dfr_eval"]["metrics"]["miou"] <= 1
    pce_only = make_run(
        _tiny_dfr(
            tmp_path / "p",
            dfr_train={**_tiny_dfr(tmp_path).dfr_train.model_dump(), "dfr": False, "fd": False, "fr": False},
        )
    )
    assert run_local(pce_only, ["dfr_train"])["dfr_train"]["info"]["terms"] == ["pce"]


def test_dfr_train_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    import stages.dfr_train as dt

    from .conftest import single_stage_resumes_exactly

    single_stage_resumes_exactly(tmp_path, monkeypatch, "dfr", dt, "dfr_objective")


def test_bench_dfr_train_rows(tmp_path):
    from .conftest import bench_rows

    train, single = bench_rows(
        tmp_path,
        "dfr_train",
        "--images",
        "2",
        "--size",
        "96x64",
        "--opt",
        "arch=swin_mini",
        "--opt",
        "batch=2",
        "--opt",
        "crop=64",
        "--opt",
        "multiscale=false",
    )
    assert "dfr_train step swin_mini" in train["case"] and "loss dfr" in train["case"] and train["images"] == 2
    assert "single scale" in single["case"]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in (train, single))


@pytest.mark.claims
def test_demo_dfr_beats_pce_only(tmp_path):
    """Table 4's first step at demo scale: configs/demo_dfr.yaml (what `make demo` runs) with
    the full Eq. 1 against the same network and schedule trained with pCE alone."""
    from .conftest import demo_branch_vs_baseline

    full, pce = demo_branch_vs_baseline(tmp_path, "dfr", dfr=False, fd=False, fr=False)
    f, p = full["dfr_eval"]["metrics"]["miou"], pce["dfr_eval"]["metrics"]["miou"]
    assert f > p + 0.015, (f, p)
    assert full["dfr_train"]["info"]["terms"] == ["pce", "dfr", "fd", "fr"]

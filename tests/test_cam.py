"""Backbones, the CAM network and its training loop (resume), on tiny inputs."""

import numpy as np
import pytest
import torch

from models.backbones import ResNetBackbone, WeightsError
from models.cam import CamNet, multiscale_cam, with_background
from pipeline.runner import make_run, run_stage_local
from stages.training import poly_lr

from .conftest import demo_config, kill_and_resume


@pytest.mark.parametrize("depth,stride", [(18, 8), (18, 16), (50, 16)])
def test_backbone_output_stride(depth, stride):
    net = ResNetBackbone(depth, stride).eval()
    with torch.no_grad():
        feats = net(torch.zeros(1, 3, 64, 96))
    assert feats[-1].shape[-2:] == (64 // stride, 96 // stride)
    assert [f.shape[1] for f in feats] == net.channels


def test_imagenet_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError, match="never downloads") as err:
        ResNetBackbone(18, 16, "imagenet")
    assert "resnet18-" in str(err.value) and str(tmp_path / "torch") in str(err.value)
    with pytest.raises(WeightsError, match="not found"):
        ResNetBackbone(18, 16, str(tmp_path / "missing.pth"))


def test_weights_from_a_path_and_the_hub_cache(tmp_path, monkeypatch):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(src.layer1[0].conv1.weight, 0.5)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    net = ResNetBackbone(18, 16, str(path))
    assert net.pretrained and torch.equal(net.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    # in a model in training mode, a pretrained backbone keeps its BatchNorm statistics frozen
    model = CamNet(3, 18, 16, str(path)).train()
    assert not model.backbone.layer1[0].bn1.training and not model.backbone.layer1[0].bn1.weight.requires_grad
    assert model.classifier.training and CamNet(3, 18, 16).train().backbone.layer1[0].bn1.training
    # the same file where torchvision's hub cache keeps it is found by `imagenet`
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from models.backbones import _imagenet_file

    cached, _ = _imagenet_file("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(src.state_dict(), cached)
    assert torch.equal(ResNetBackbone(18, 16, "imagenet").layer1[0].conv1.weight, src.layer1[0].conv1.weight)


def test_logits_are_the_mean_of_the_activation_map():
    torch.manual_seed(0)
    model = CamNet(3, 18, 16).eval()
    x = torch.rand(2, 3, 48, 64) * 255
    with torch.no_grad():
        dense = model.classifier(model.features(x))
        np.testing.assert_allclose(model(x), dense.mean((2, 3)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(model.cam(x), dense.clamp_min(0), rtol=1e-5)


def test_multiscale_cam_is_normalised_and_flip_equivariant():
    torch.manual_seed(0)
    model = CamNet(3, 18, 16).eval()
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    cams = multiscale_cam(model, image, [0, 2], scales=(0.5, 1.0, 1.5))
    assert cams.shape == (2, 40, 56) and cams.min() >= 0
    np.testing.assert_allclose(cams.reshape(2, -1).max(1), 1.0, rtol=1e-4)
    flipped = multiscale_cam(model, np.ascontiguousarray(image[:, ::-1]), [0, 2], scales=(0.5, 1.0, 1.5))
    np.testing.assert_allclose(flipped, cams[:, :, ::-1], atol=1e-4)


def test_background_score():
    cams = np.array([[[0.2, 1.0]], [[0.5, 0.0]]], np.float32)
    out = with_background(cams, 2.0)
    np.testing.assert_allclose(out[0], [[(1 - 0.5) ** 2, 0.0]])
    np.testing.assert_array_equal(out[1:], cams)
    assert with_background(np.zeros((0, 2, 3), np.float32), 4.0).shape == (1, 2, 3)


def test_poly_lr():
    assert poly_lr(0.1, 0, 100, 0.9) == 0.1
    assert poly_lr(0.1, 50, 100, 0.9) == pytest.approx(0.1 * 0.5**0.9)


def _tiny(tmp_path, **kw):
    settings = dict(
        dataset__num_train=4,
        dataset__height=64,
        dataset__width=64,
        cam_train__depth=18,
        cam_train__crop=48,
        cam_train__batch_size=2,
        cam_train__epochs=2,
        cam_train__checkpoint_every=2,
    )
    return demo_config(tmp_path, **{**settings, **kw})


def test_cam_train_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    import stages.cam_train as ct

    m1, m2, state1, state2 = kill_and_resume(tmp_path, monkeypatch, _tiny, "cam_train", ct, "classification_loss")
    assert m2["counts"]["done"] == 4
    assert m2["info"]["loss_curve"] == pytest.approx(m1["info"]["loss_curve"], rel=1e-4)
    for key, value in state1["state_dict"].items():
        torch.testing.assert_close(state2["state_dict"][key], value, rtol=1e-4, atol=1e-5)


class _NeedsValues(torch.nn.Module):
    """A constructor that reads a tensor's value (impossible on the meta device)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.k = int(torch.ones(1).sum().item())


class _ExtraBuffer(torch.nn.Module):
    """A buffer the state dict does not hold."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 2.0), persistent=False)


@pytest.mark.parametrize("cls", [lambda: CamNet(3, 18), _NeedsValues, _ExtraBuffer])
def test_trained_model_takes_the_checkpoint_tensors_and_falls_back_to_a_real_build(cls):
    from stages.training import trained_model

    torch.manual_seed(0)
    ref = cls().eval()
    model = trained_model({"arch": {}, "state_dict": ref.state_dict()}, lambda arch: cls(), "cpu")
    assert not model.training and not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    for (name, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    if isinstance(ref, _ExtraBuffer):
        assert torch.equal(model.scale, ref.scale)


def test_sgd_gets_momentum_and_weight_decay_by_name(tmp_path, monkeypatch):
    """PSA's PolyOptimizer passed weight_decay into SGD's momentum slot; check ours."""
    import stages.cam_train as ct

    seen = {}
    real = torch.optim.SGD

    def spy(groups, **kw):
        seen.update(kw)
        seen["lrs"] = [g["lr"] for g in groups]
        return real(groups, **kw)

    monkeypatch.setattr(ct.torch.optim, "SGD", spy)
    run = make_run(_tiny(tmp_path, cam_train__epochs=1, cam_train__momentum=0.8, cam_train__weight_decay=3e-4))
    run_stage_local(run, "cam_train")
    assert seen["momentum"] == 0.8 and seen["weight_decay"] == 3e-4
    assert seen["lrs"][1] == pytest.approx(10 * seen["lrs"][0])

import pytest
import torch

from models import tvcompat  # installs the compat shim before torchvision
import torchvision


def test_resnet50_forward():
    net = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def test_deeplabv3_forward():
    net = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 65, 65))["out"]
    assert out.shape == (1, 4, 65, 65)


def test_transforms_work():
    from torchvision.transforms import v2

    x = torch.rand(3, 40, 50)
    y = v2.Compose([v2.Resize((20, 25)), v2.RandomHorizontalFlip(p=1.0)])(x)
    assert y.shape == (3, 20, 25)


def test_compiled_ops_work_or_say_clearly_they_are_missing():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    if tvcompat.has_compiled_ops():  # a complete torchvision: the real kernel runs
        assert torch.ops.torchvision.nms(boxes, scores, 0.5).tolist() == [0, 2]
        tvcompat.require_compiled_ops("Mask R-CNN")
        return
    with pytest.raises(RuntimeError, match="compiled"):
        torch.ops.torchvision.nms(boxes, scores, 0.5)
    with pytest.raises(RuntimeError, match="Mask R-CNN.*compiled"):
        tvcompat.require_compiled_ops("Mask R-CNN")

import pytest
import torch

from vera_cli.errors import VeraError
from vera_cli.models import ConvNet, build_model, count_parameters


def test_convnet_has_the_write_ups_parameters_without_the_dead_conv3():
    model = build_model("convnet")
    assert count_parameters(model) == 76_286
    assert [name for name, _ in model.named_children()] == ["conv1", "conv2", "fc1", "fc2", "fc3", "fc4", "fc5"]


def test_forward_is_features_then_classifier():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(5, 3, 32, 32)
    assert model.features(x).shape == (5, 400)
    assert model(x).shape == (5, 10)
    assert torch.equal(model(x), model.classifier(model.features(x)))


def test_unknown_model_is_refused():
    with pytest.raises(VeraError, match="unknown model 'resnet': choose from convnet"):
        build_model("resnet")

import pytest
import torch
import torch.nn.functional as F

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


@pytest.fixture
def kernels(monkeypatch) -> list[tuple[int, ...]]:
    """The weight shape of every convolution run, in order."""
    shapes = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda inputs, weight, *rest: shapes.append(tuple(weight.shape)) or conv2d(inputs, weight, *rest))
    return shapes


def _six_channel_reference(model: ConvNet, x: torch.Tensor) -> torch.Tensor:
    """The write-up's forward, layer by layer, with the stored 6-channel weights."""
    h = F.relu(F.max_pool2d(F.conv2d(x, model.conv1.weight, model.conv1.bias), 2))
    h = F.relu(F.max_pool2d(F.conv2d(h, model.conv2.weight, model.conv2.bias), 2))
    return model.classifier(torch.flatten(h, 1))


def test_lane_padded_convolutions_compute_the_write_ups_function_and_gradients(kernels):
    torch.manual_seed(0)
    model = ConvNet()
    x, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    expected = _six_channel_reference(model, x)
    expected_grads = torch.autograd.grad(F.cross_entropy(expected, labels), list(model.parameters()))
    kernels.clear()
    logits = model(x)
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), list(model.parameters()))
    # conv1 with two zero filters, conv2 reading them through two zero input channels.
    assert kernels == [(8, 3, 5, 5), (16, 8, 5, 5)]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    for name, grad, want in zip([n for n, _ in model.named_parameters()], grads, expected_grads):
        assert grad.shape == want.shape, name
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=name)


def test_an_adapted_convolution_runs_its_own_forward_and_merges_back_to_the_lane_padded_one(kernels):
    from vera_cli.adapters.config import AdapterConfig
    from vera_cli.adapters.inject import inject, merged_plain, trainable_state

    torch.manual_seed(0)
    model = inject(ConvNet().eval(), AdapterConfig(method="lora", rank=2, targets=["conv1"]))
    with torch.no_grad():
        for p in trainable_state(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 3, 32, 32)
    adapted = model(x)
    assert (16, 6, 5, 5) in kernels and not [k for k in kernels if 8 in k[:2]]
    kernels.clear()
    merged = merged_plain(model)(x)
    assert kernels == [(8, 3, 5, 5), (16, 8, 5, 5)]
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_a_hooked_convolution_is_called_as_a_module_and_trains_pruned(kernels):
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = ConvNet()
    calls = []
    model.conv2.register_forward_hook(lambda *_: calls.append("conv2"))
    prune.l1_unstructured(model.conv1, "weight", amount=0.5)  # rebuilds conv1.weight in a pre-hook every call
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    assert calls == ["conv2", "conv2"] and kernels == [(6, 3, 5, 5), (16, 6, 5, 5)] * 2
    assert int((model.conv1.weight == 0).sum()) == 6 * 3 * 5 * 5 // 2

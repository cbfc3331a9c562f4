import pytest
import torch
import torch.nn.functional as F

from vera_cli import fast
from vera_cli.errors import VeraError
from vera_cli.fast import convnet_features
from vera_cli.fast.build import kernels, library
from vera_cli.models import ConvNet, build_model, count_parameters


def test_convnet_has_the_write_ups_parameters_without_the_dead_conv3():
    model = build_model("convnet")
    assert count_parameters(model) == 76_286
    assert [name for name, _ in model.named_children()] == ["conv1", "conv2", "fc1", "fc2", "fc3", "fc4", "fc5"]


def test_features_are_the_write_ups_convolutions_and_the_classifier_its_five_linear_layers():
    """The split the feature cache relies on, against the write-up's network written out here."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(5, 3, 32, 32)
    # conv, ReLU, pool twice; 16 channels of 5 x 5, flattened channel by channel.
    h = F.max_pool2d(F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, model.conv2.weight, model.conv2.bias)), 2)
    features = h.reshape(5, 400)
    assert model.features(x).shape == (5, 400)
    torch.testing.assert_close(model.features(x), features, rtol=1e-5, atol=1e-6)
    # fc1 to fc4 each followed by a ReLU, then fc5: the logits.
    logits = features
    for layer in (model.fc1, model.fc2, model.fc3, model.fc4):
        logits = F.relu(F.linear(logits, layer.weight, layer.bias))
    logits = F.linear(logits, model.fc5.weight, model.fc5.bias)
    assert model(x).shape == (5, 10)
    torch.testing.assert_close(model.classifier(features), logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), logits, rtol=1e-5, atol=1e-6)


def test_unknown_model_is_refused():
    with pytest.raises(VeraError, match="unknown model 'resnet': choose from convnet"):
        build_model("resnet")


@pytest.fixture
def convolutions(monkeypatch) -> list[tuple[int, ...]]:
    """The weight shape of every convolution torch runs, in order."""
    shapes = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda inputs, weight, *rest: shapes.append(tuple(weight.shape)) or conv2d(inputs, weight, *rest))
    return shapes


@pytest.fixture
def compiled(kernel_width, monkeypatch) -> tuple[int, list]:
    """The compiled kernels, at each vector width this processor runs: the width, and the kernels called with theirs."""
    monkeypatch.setattr(convnet_features, "vector_width", lambda: kernel_width)
    calls = []
    call = convnet_features.call_with_scratch
    monkeypatch.setattr(convnet_features, "call_with_scratch",
                        lambda kernel, *args: calls.append((kernel, args[0])) or call(kernel, *args))
    return kernel_width, calls


@pytest.fixture
def torch_only(monkeypatch) -> None:
    monkeypatch.setenv("VERA_CLI_KERNELS", "off")
    kernels.cache_clear()
    yield
    kernels.cache_clear()


def _six_channel_reference(model: ConvNet, x: torch.Tensor) -> torch.Tensor:
    """The write-up's forward, layer by layer, with the stored 6-channel weights."""
    h = F.relu(F.max_pool2d(F.conv2d(x, model.conv1.weight, model.conv1.bias), 2))
    h = F.relu(F.max_pool2d(F.conv2d(h, model.conv2.weight, model.conv2.bias), 2))
    return model.classifier(torch.flatten(h, 1))


def _assert_same_function_and_gradients(model: ConvNet, x: torch.Tensor, convolutions: list) -> list:
    labels = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    expected = _six_channel_reference(model, x)
    expected_grads = torch.autograd.grad(F.cross_entropy(expected, labels), list(model.parameters()))
    convolutions.clear()
    logits = fast.forward(model)(x)
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), list(model.parameters()))
    ran = list(convolutions)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    for name, grad, want in zip([n for n, _ in model.named_parameters()], grads, expected_grads):
        assert grad.shape == want.shape, name
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=name)
    return ran


@pytest.mark.parametrize("batch, threads", [(16, 2), (3, 2), (1, 2), (5, 1)])
def test_compiled_kernels_compute_the_write_ups_function_and_gradients(compiled, convolutions, batch, threads):
    torch.manual_seed(0)
    model = ConvNet()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Batches smaller than the thread count and odd slices: every image once.
        assert _assert_same_function_and_gradients(model, torch.randn(batch, 3, 32, 32), convolutions) == []
        width, calls = compiled
        assert calls == [("vc_forward", width), ("vc_backward", width)]
    finally:
        torch.set_num_threads(before)


def test_compiled_kernels_send_a_tied_pool_windows_gradient_to_its_first_maximum_as_torch_does(compiled, convolutions):
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        # Three channels constant: every window of theirs a four-way tie, positive, negative and zero.
        model.conv1.weight[:3].zero_()
        model.conv1.bias[:3] = torch.tensor([0.5, -0.5, 0.0])
    x = torch.randn(4, 3, 32, 32)
    assert _assert_same_function_and_gradients(model, x, convolutions) == []


def test_compiled_kernels_let_a_nan_through_as_torch_does(compiled):
    model = ConvNet()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    assert fast.forward(model)(torch.randn(2, 3, 32, 32)).isnan().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_compiled_kernels_pass_gradients_through_non_finite_windows_as_torch_does(compiled, convolutions, bad):
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(4, 3, 32, 32)
    x[0, :, 10, 10] = bad  # torch's pool sends a NaN window's gradient to its last NaN, its ReLU lets it pass
    expected = torch.autograd.grad(_six_channel_reference(model, x).sum(), list(model.parameters()))
    convolutions.clear()
    grads = torch.autograd.grad(fast.forward(model)(x).sum(), list(model.parameters()))
    assert convolutions == []
    for name, grad, want in zip([n for n, _ in model.named_parameters()], grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


def test_compiled_kernels_give_torchs_finite_weight_gradients_beside_an_images_inf(compiled, convolutions):
    """An image holding an inf takes dense weight-gradient sums, whose entries are NaN only where the inf enters
    them: the rest must be torch's too. The inf is in one input channel near the image's end (past the first half
    of what is checked for one), and conv1 turns it into +inf in one channel of the first layer's output and into
    -inf, which the ReLU makes 0, in the others."""
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        model.conv1.weight[0, 0].abs_()
        model.conv1.weight[1:, 0] = -model.conv1.weight[1:, 0].abs()
    x = torch.randn(4, 3, 32, 32)
    x[1, 0, 27, 29] = float("inf")
    expected = torch.autograd.grad(_six_channel_reference(model, x).sum(), list(model.parameters()))
    assert expected[0][:, 1:].isfinite().all() and expected[2][:, 1:].isfinite().all()
    convolutions.clear()
    grads = torch.autograd.grad(fast.forward(model)(x).sum(), list(model.parameters()))
    assert convolutions == []
    for name, grad, want in zip([n for n, _ in model.named_parameters()], grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


def test_images_that_need_a_gradient_or_another_size_run_on_torchs_operators(compiled, convolutions):
    model = ConvNet()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    fast.forward(model)(x).sum().backward()
    assert convolutions == [(8, 3, 5, 5), (16, 8, 5, 5)] and x.grad.abs().sum() > 0
    convolutions.clear()
    assert fast.features(model)(torch.randn(2, 3, 36, 36)).shape == (2, 16 * 6 * 6) and len(convolutions) == 2


def test_without_the_kernels_lane_padded_convolutions_compute_the_write_ups_function(torch_only, convolutions):
    torch.manual_seed(0)
    # conv1 with two zero filters, conv2 reading them through two zero input channels.
    assert _assert_same_function_and_gradients(ConvNet(), torch.randn(16, 3, 32, 32), convolutions) == [
        (8, 3, 5, 5), (16, 8, 5, 5)]


def test_an_adapted_convolution_runs_its_own_forward_and_merges_back_to_the_fast_path(convolutions):
    from vera_cli.adapters.config import AdapterConfig
    from vera_cli.adapters.inject import inject, merged_plain, trainable_state

    torch.manual_seed(0)
    model = inject(ConvNet().eval(), AdapterConfig(method="lora", rank=2, targets=["conv1"]))
    with torch.no_grad():
        for p in trainable_state(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 3, 32, 32)
    adapted = fast.forward(model)(x)
    assert (16, 6, 5, 5) in convolutions and not [k for k in convolutions if 8 in k[:2]]
    convolutions.clear()
    merged = fast.forward(merged_plain(model))(x)
    assert convolutions == ([] if library() else [(8, 3, 5, 5), (16, 8, 5, 5)])
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_a_hooked_convolution_is_called_as_a_module_and_trains_pruned(convolutions):
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
        F.cross_entropy(fast.forward(model)(x), labels).backward()
        optimizer.step()
    assert calls == ["conv2", "conv2"] and convolutions == [(6, 3, 5, 5), (16, 6, 5, 5)] * 2
    assert int((model.conv1.weight == 0).sum()) == 6 * 3 * 5 * 5 // 2

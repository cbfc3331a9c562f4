"""Adapters on convolutions, target presets, and the package standing alone."""

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vera_cli.adapters
from vera_cli.adapter_files import apply_adapter, save_adapter
from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.inject import adapted_layers, inject, merged_plain, projection_bank, trainable_state
from vera_cli.adapters.projections import ProjectionBank
from vera_cli.adapters.targets import select_targets
from vera_cli.adapters.vera import VeraConv2d
from vera_cli.param_count import count_params
from vera_cli.models import ConvNet
from vera_cli.bases import fingerprint
from vera_cli.fast.weight_path import choose_per_call

INPUT = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def nudge(model: nn.Module) -> None:
    """Give the adapter non-zero values, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable_state(model).values():
            p.add_(torch.randn_like(p) * 0.1)


class Attention(nn.Module):
    """Names as in a ViT block: blocks.0.attn.query/key/value/out, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": nn.ModuleDict(
            {name: nn.Linear(8, 8) for name in ("query", "key", "value", "out")})})])
        self.head = nn.Linear(8, 3)

    classifier_name = "head"


@pytest.mark.parametrize("targets, expected", [
    ([], ["fc1", "fc2", "fc3", "fc4", "fc5"]),
    (["linear"], ["fc1", "fc2", "fc3", "fc4", "fc5"]),
    (["conv"], ["conv1", "conv2"]),
    (["all"], ["conv1", "conv2", "fc1", "fc2", "fc3", "fc4", "fc5"]),
    (["all-linear"], ["fc1", "fc2", "fc3", "fc4"]),
    (["fc5", "conv"], ["conv1", "conv2", "fc5"]),
    (["conv[12]|fc1"], ["conv1", "conv2", "fc1"]),
])
def test_presets_and_regexes_choose_layers_in_model_order(targets, expected):
    assert select_targets(convnet(), targets) == expected


def test_attention_preset_takes_query_and_value_only():
    assert select_targets(Attention(), ["attention"]) == ["blocks.0.attn.query", "blocks.0.attn.value"]
    assert select_targets(Attention(), ["all-linear"]) == [f"blocks.0.attn.{n}" for n in ("query", "key", "value", "out")]
    with pytest.raises(AdapterError, match=r"preset 'attention' \(nn.Linear layers named query or value"):
        select_targets(convnet(), ["attention"])


def test_the_head_is_the_layer_the_model_names_never_a_guess():
    undeclared = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.raises(AdapterError, match="preset 'all-linear' leaves out the classifier head, and Sequential names none"):
        select_targets(undeclared, ["all-linear"])
    with pytest.raises(AdapterError, match="does not name its classifier head"):
        inject(undeclared, AdapterConfig(method="head"))
    assert select_targets(undeclared, ["linear"]) == ["0", "1"]  # presets that need no head still work
    undeclared.classifier_name = "0"  # the head need not be registered last
    assert select_targets(undeclared, ["all-linear"]) == ["1"]
    assert [n for n, p in inject(undeclared, AdapterConfig(method="head")).named_parameters() if p.requires_grad] == [
        "0.weight", "0.bias"]


def test_a_bad_regex_is_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match=r"targets: 'fc\[' is neither a preset nor a valid regular expression"):
        AdapterConfig(targets=["fc["])


def grouped_model(**conv_options) -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 4, 3, **conv_options), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


@pytest.mark.parametrize("conv_options, reason", [
    ({"groups": 2}, "target layer 0 is a grouped convolution \\(groups=2\\); convolution adapters support groups=1 only"),
    ({"padding": 1, "padding_mode": "reflect"}, "target layer 0 pads with 'reflect'; convolution adapters support zero padding only"),
])
def test_unsupported_convolutions_are_refused_and_the_model_is_left_alone(conv_options, reason):
    model = grouped_model(**conv_options)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match=reason):
        inject(model, AdapterConfig(method="lora", targets=["all"]))
    assert not adapted_layers(model) and all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == before.keys()
    # The same layer is fine once the targets leave it out.
    assert list(adapted_layers(inject(model, AdapterConfig(method="lora", rank=2, targets=["2"])))) == ["2"]


def conv_under_test() -> tuple[nn.Conv2d, ProjectionBank, VeraConv2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=2, padding=(1, 2), dilation=(2, 1))
    bank = ProjectionBank([(3 * 3 * 2, 5)], 4, "per-shape", seed=0)
    vera = VeraConv2d(conv, bank, rank=4, d_init=0.1)
    nudge(vera)
    return conv, bank, vera


def test_vera_conv_forward_equals_the_convolution_with_the_explicit_kernel():
    conv, bank, vera = conv_under_test()
    a, b = bank.pair("18x5")
    delta = (torch.diag(vera.vera_b) @ b @ torch.diag(vera.vera_d) @ a).view(5, 3, 3, 2)
    x = torch.randn(2, 3, 11, 9)
    expected = F.conv2d(x, conv.weight + delta, conv.bias, conv.stride, conv.padding, conv.dilation)
    assert torch.allclose(vera(x), expected, atol=1e-5)


def test_vera_conv_builds_the_kernel_in_forward_only_where_that_costs_less_and_trains_the_same(monkeypatch):
    _, _, vera = conv_under_test()
    choose_per_call(vera)
    built = []
    original = VeraConv2d.delta_weight
    monkeypatch.setattr(VeraConv2d, "delta_weight", lambda self: built.append(1) or original(self))
    # Rank 4, fan-in 18, 5 outputs: with a backward the kernel costs less from 8 output positions on.
    small, large = torch.randn(1, 3, 4, 4), torch.randn(4, 3, 16, 16)
    vera(small)
    assert built == []
    for x in (small, large):
        weight_path = vera(x)
        factored = vera.base(x) + vera.delta(x)
        assert torch.allclose(weight_path, factored, atol=1e-5)
        grads = [torch.autograd.grad(y.square().sum(), [vera.vera_d, vera.vera_b]) for y in (weight_path, factored)]
        assert all(torch.allclose(g, h, rtol=1e-4, atol=1e-5) for g, h in zip(*grads))
    assert built == [1]  # the large input only


@pytest.mark.parametrize("shape", [(64, 40), (8, 9, 40)])
def test_vera_linear_trains_through_one_graph_node_with_the_plain_paths_gradients(shape):
    torch.manual_seed(0)
    plain = inject(nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20)),
                   AdapterConfig(method="vera", rank=8, targets=["all"]))
    with torch.no_grad():
        for tensor in plain.parameters():
            if tensor.requires_grad:
                tensor.add_(torch.randn_like(tensor) * 0.3)
    fast_path = copy.deepcopy(plain)
    choose_per_call(fast_path)
    x = torch.randn(*shape, requires_grad=True)
    outputs, grads = [], []
    for model in (plain, fast_path):
        y = model(x)
        outputs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [x] + [t for t in model.parameters() if t.requires_grad]))
    assert type(outputs[1].grad_fn).__name__ == "VeraLinearBackward"  # the last layer: one node
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5
    assert all(torch.allclose(g, h, rtol=1e-4, atol=1e-4) for g, h in zip(*grads))


def test_per_shape_pairs_are_keyed_by_fan_in_and_out_across_conv_and_linear():
    # conv: fan_in 4 * 3 * 3 = 36, out 8; the linear layer 36 -> 8 has the same shape.
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(1, 2), nn.Linear(36, 8))
    inject(model, AdapterConfig(method="vera", rank=3, targets=["all"]))
    bank = projection_bank(model)
    assert list(bank.pair_shapes) == ["36x8"]
    conv_a, conv_b = adapted_layers(model)["0"].projections()
    linear_a, linear_b = adapted_layers(model)["2"].projections()
    assert conv_a.data_ptr() == linear_a.data_ptr() and conv_b.data_ptr() == linear_b.data_ptr()
    assert conv_a.shape == (3, 36) and conv_b.shape == (8, 3)


def test_convnet_pairs_per_shape_and_sliced():
    per_shape = projection_bank(inject(convnet(), AdapterConfig(method="vera", targets=["all"])))
    assert list(per_shape.pair_shapes) == ["75x6", "150x16", "400x120", "120x84", "84x84", "84x10"]
    # Sliced: one pair sized for the largest fan-in (a conv's if it were larger) and output.
    model = nn.Sequential(nn.Conv2d(8, 20, 3), nn.Flatten(), nn.LazyLinear(5))
    model(torch.zeros(1, 8, 5, 5))
    inject(model, AdapterConfig(method="vera", rank=4, sharing="sliced", targets=["all"]))
    a, b = projection_bank(model).pair("shared")
    assert a.shape == (4, 180) and b.shape == (20, 4)
    conv_a, conv_b = adapted_layers(model)["0"].projections()
    linear_a, linear_b = adapted_layers(model)["2"].projections()
    assert conv_a.shape == (4, 72) and linear_a.shape == (4, 180) and linear_b.shape == (5, 4)
    assert torch.equal(conv_a, a[:, :72]) and conv_a.data_ptr() == a.data_ptr()
    # nn.Sequential calls every child: the bank must not be one of them.
    expected = model(torch.ones(2, 8, 5, 5))
    plain = merged_plain(model)
    assert [type(m) for m in plain] == [nn.Conv2d, nn.Flatten, nn.Linear]
    assert torch.allclose(plain(torch.ones(2, 8, 5, 5)), expected)


def test_linear_pairs_are_unchanged_and_the_checksum_covers_the_conv_pairs():
    linear = projection_bank(inject(convnet(), AdapterConfig(method="vera")))
    again = projection_bank(inject(convnet(), AdapterConfig(method="vera", targets=["all"])))
    assert again.checksum() == projection_bank(inject(convnet(), AdapterConfig(method="vera", targets=["all"]))).checksum()
    assert torch.equal(linear.pair("400x120")[0], ProjectionBank([(400, 120)], 32, "per-shape", 0).pair("400x120")[0])
    before = again.checksum()
    with torch.no_grad():
        again.pair("75x6")[0][0, 0] += 1e-6
    assert again.checksum() != before


@pytest.mark.parametrize("method", ["vera", "lora"])
def test_conv_adapter_file_round_trip_and_a_changed_conv_projection_is_caught(tmp_path, method):
    spec = AdapterConfig(method=method, rank=4, targets=["conv", "fc5"], store_projections=True)
    model = inject(convnet(), spec)
    nudge(model)
    save_adapter(tmp_path, model, spec, fingerprint(convnet()), {"base_run": "b", "classes": ["cat"]})
    restored = convnet()
    apply_adapter(restored, tmp_path, fingerprint(convnet()))
    assert torch.equal(restored(INPUT), model(INPUT))
    assert set(trainable_state(restored)) == {f"{layer}.{name}" for layer in ("conv1", "conv2", "fc5")
                                              for name in ({"vera": ("vera_d", "vera_b"), "lora": ("lora_A", "lora_B")}[method])}
    if method == "lora":
        assert restored.conv1.lora_A.shape == (4, 3, 5, 5) and restored.conv1.lora_B.shape == (6, 4, 1, 1)


def test_count_params_covers_conv_layers_and_leaves_the_model_alone():
    model = convnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vera = count_params(model, AdapterConfig(method="vera", rank=32, targets=["all"]))
    assert not adapted_layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    rows = {row.name: row for row in vera.layers}
    assert (rows["conv1"].trainable, rows["conv1"].shape) == (32 + 6, "6x3x5x5")
    assert rows["conv2"].trainable == 32 + 16
    assert vera.trainable == 542 + 38 + 48
    assert {pair.key: pair.layers for pair in vera.pairs}["75x6"] == ["conv1"]
    assert vera.frozen_projections == 31_552 + 32 * (75 + 6) + 32 * (150 + 16)
    lora = count_params(model, AdapterConfig(method="lora", rank=8, targets=["all"]))
    assert {row.name: row.trainable for row in lora.layers if row.trainable} == {
        "conv1": 8 * 75 + 6 * 8, "conv2": 8 * 150 + 16 * 8, "fc1": 8 * 520, "fc2": 8 * 204, "fc3": 8 * 168,
        "fc4": 8 * 168, "fc5": 8 * 94}
    assert lora.trainable == 11_208


def test_the_adapters_package_imports_nothing_else_from_the_app():
    package = Path(vera_cli.adapters.__file__).parent
    imported = set()
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    assert "vera_cli.adapters.inject" in imported
    assert {name for name in imported if name.startswith("vera_cli") and not name.startswith("vera_cli.adapters")} == set()


def test_cli_refuses_a_target_that_matches_nothing(vera):
    result = vera("count-params", "--target", "conv", "--target", "fc9")
    assert result.code == 2
    assert result.err.startswith("error: target 'fc9' matches no adaptable layer; the model's Linear and Conv2d layers are")

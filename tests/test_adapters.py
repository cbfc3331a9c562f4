import copy

import pytest
import torch
from torch import nn

from vera_cli.adapter_files import apply_adapter, save_adapter
from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.inject import adapted_layers, inject, merge, projection_bank, trainable_state, unmerge
from vera_cli.adapters.lora import LoraLinear
from vera_cli.adapters.projections import ProjectionBank
from vera_cli.adapters.vera import VeraLinear
from vera_cli.config import AdapterConfig
from vera_cli.param_count import count_params
from vera_cli.errors import VeraError
from vera_cli.models import ConvNet
from vera_cli.bases import fingerprint
from vera_cli.files import read_json, write_json


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


def mlp() -> nn.Module:
    """The write-up's worked example: four layers (80,120), (120,120), (120,120), (120,10)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(80, 120), nn.ReLU(), nn.Linear(120, 120), nn.ReLU(),
                         nn.Linear(120, 120), nn.ReLU(), nn.Linear(120, 10))


def adapted(method: str, seed: int = 0, **kwargs) -> nn.Module:
    model = convnet(seed)
    inject(model, AdapterConfig(method=method, **kwargs))
    return model


def nudge(model: nn.Module) -> None:
    """Give the adapter non-zero values, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable_state(model).values():
            p.add_(torch.randn_like(p) * 0.1)


INPUT = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ["vera", "lora"])
def test_adapted_model_starts_equal_to_the_base(method):
    base = convnet()
    model = adapted(method)
    assert torch.equal(model(INPUT), base(INPUT))


@pytest.mark.parametrize("method, names", [
    ("vera", {"vera_d", "vera_b"}),
    ("lora", {"lora_A", "lora_B"}),
])
def test_only_adapter_tensors_train(method, names):
    model = adapted(method)
    assert {n.rsplit(".", 1)[1] for n in trainable_state(model)} == names
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = nn.functional.cross_entropy(model(INPUT), torch.arange(8))
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(trainable_state(model))
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # LoRA's B starts at zero, so A gets no gradient on the first step: at least B must move.
    assert changed and changed <= set(trainable_state(model))
    assert all(n.rsplit(".", 1)[1] in names for n in changed)


def test_per_shape_pairs_are_one_tensor_shared_by_same_shaped_layers():
    model = adapted("vera", rank=32)
    layers = adapted_layers(model)
    a3, b3 = layers["fc3"].projections()
    a4, b4 = layers["fc4"].projections()
    assert a3.data_ptr() == a4.data_ptr() and b3.data_ptr() == b4.data_ptr()
    assert layers["fc1"].projections()[0].data_ptr() != a3.data_ptr()
    names = [n for n, _ in model.named_buffers()]
    assert len(names) == 8 and all(n.startswith("vera_projections.") for n in names)


def test_sliced_sharing_uses_one_pair_cut_per_layer():
    model = adapted("vera", rank=16, sharing="sliced")
    bank = projection_bank(model)
    a, b = bank.pair("shared")
    assert a.shape == (16, 400) and b.shape == (120, 16)
    fc5_a, fc5_b = adapted_layers(model)["fc5"].projections()
    assert fc5_a.shape == (16, 84) and fc5_b.shape == (10, 16)
    assert torch.equal(fc5_a, a[:, :84]) and fc5_a.data_ptr() == a.data_ptr()


def test_projections_regenerate_bit_for_bit_from_the_seed():
    shapes = [(400, 120), (120, 84), (84, 84)]
    first = ProjectionBank(shapes, 8, "per-shape", seed=7)
    again = ProjectionBank(shapes, 8, "per-shape", seed=7)
    other = ProjectionBank(shapes, 8, "per-shape", seed=8)
    for (n1, t1), (_, t2), (_, t3) in zip(first.named_buffers(), again.named_buffers(), other.named_buffers()):
        assert torch.equal(t1, t2), n1
        assert not torch.equal(t1, t3), n1
    assert first.checksum() == again.checksum() != other.checksum()


def test_projection_scale_uses_each_matrix_fan_in():
    bank = ProjectionBank([(400, 120)], 32, "per-shape", seed=0)
    a, b = bank.pair("400x120")
    assert a.abs().max() <= (6 / 400) ** 0.5 and a.abs().max() > 0.9 * (6 / 400) ** 0.5
    assert b.abs().max() <= (6 / 32) ** 0.5 and b.abs().max() > 0.9 * (6 / 32) ** 0.5


def test_moving_the_model_moves_the_shared_projections():
    model = adapted("vera").to(torch.float64)
    a, b = adapted_layers(model)["fc2"].projections()
    assert a.dtype == b.dtype == torch.float64
    assert model(INPUT.double()).dtype == torch.float64


def test_vera_forward_equals_the_explicit_formula():
    layer = nn.Linear(20, 12)
    bank = ProjectionBank([(20, 12)], 6, "per-shape", seed=0)
    vera = VeraLinear(layer, bank, rank=6, d_init=0.1)
    nudge(vera)
    x = torch.randn(4, 20)
    a, b = bank.pair("20x12")
    weight = layer.weight + torch.diag(vera.vera_b) @ b @ torch.diag(vera.vera_d) @ a
    assert torch.allclose(vera(x), x @ weight.T + layer.bias, atol=1e-6)


def test_lora_forward_equals_the_explicit_formula():
    layer = nn.Linear(20, 12)
    lora = LoraLinear(layer, rank=4, alpha=8)
    nudge(lora)
    x = torch.randn(4, 20)
    weight = layer.weight + 2.0 * lora.lora_B @ lora.lora_A
    assert torch.allclose(lora(x), x @ weight.T + layer.bias, atol=1e-6)


@pytest.mark.parametrize("method, kwargs", [
    ("vera", {}), ("lora", {}),
    ("vera", {"targets": ["all"]}), ("vera", {"targets": ["all"], "sharing": "sliced"}), ("lora", {"targets": ["all"]})])
def test_merge_gives_the_same_outputs_and_unmerge_restores_the_weights(method, kwargs):
    model = adapted(method, **kwargs)
    nudge(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(INPUT)
    merge(model)
    assert torch.allclose(model(INPUT), expected, atol=1e-5)
    for name in adapted_layers(model):
        assert not torch.equal(model.state_dict()[f"{name}.base.weight"], original[f"{name}.base.weight"]), name
    unmerge(model)
    for key, value in model.state_dict().items():
        assert torch.allclose(value, original[key], atol=1e-6), key
    assert torch.allclose(model(INPUT), expected, atol=1e-6)


def test_merge_refuses_non_finite_weights():
    model = adapted("vera")
    with torch.no_grad():
        adapted_layers(model)["fc2"].vera_b.fill_(float("nan"))
    with pytest.raises(AdapterError, match="not finite"):
        merge(model)


def test_adapting_twice_is_refused():
    model = adapted("vera")
    with pytest.raises(AdapterError, match="already carries adapters"):
        inject(model, AdapterConfig(method="lora"))


def test_targets_select_layers_by_name_or_regex():
    model = adapted("lora", targets=["fc[12]", "fc5"])
    assert list(adapted_layers(model)) == ["fc1", "fc2", "fc5"]
    with pytest.raises(AdapterError, match="target 'fc9' matches no adaptable layer; the model's Linear and Conv2d "
                       "layers are conv1, conv2, fc1, fc2, fc3, fc4, fc5"):
        adapted("lora", targets=["fc9"])


def test_trainable_modules_stay_fully_trainable():
    model = adapted("vera", targets=["fc[1-4]"], trainable=["fc5"])
    names = set(trainable_state(model))
    assert {"fc5.weight", "fc5.bias"} <= names
    assert "fc1.base.weight" not in names


def test_full_and_head_methods():
    assert sum(p.numel() for p in trainable_state(adapted("full")).values()) == 76_286
    assert set(trainable_state(adapted("head"))) == {"fc5.weight", "fc5.bias"}


def test_counts_match_the_write_up_on_the_convnet():
    counts = count_params(convnet(), AdapterConfig(method="vera", rank=32))
    assert counts.trainable == 542
    assert {row.name: row.trainable for row in counts.layers if row.trainable} == {
        "fc1": 152, "fc2": 116, "fc3": 116, "fc4": 116, "fc5": 42}
    assert len(counts.pairs) == 4
    assert counts.frozen_projections == 31_552 == 32 * (520 + 204 + 168 + 94)
    assert all(pair.one_tensor for pair in counts.pairs)
    assert [pair.layers for pair in counts.pairs if len(pair.layers) > 1] == [["fc3", "fc4"]]
    assert counts.frozen_base == 76_286
    assert counts.adapter_bytes < 4096


def test_counts_match_the_write_up_on_the_four_layer_mlp():
    plain = sum(p.numel() for p in mlp().parameters())
    assert plain == 39_970
    vera = count_params(mlp(), AdapterConfig(method="vera", rank=16))
    assert vera.trainable == 434
    assert vera.frozen_projections == 9_120 and len(vera.pairs) == 3
    assert vera.total == 49_524
    assert round(vera.percent_trainable, 1) == 0.9
    lora = count_params(mlp(), AdapterConfig(method="lora", rank=16))
    assert lora.trainable == 12_960 and lora.frozen_projections == 0


def _saved(tmp_path, method, **kwargs):
    base = convnet()
    model = adapted(method, **kwargs)
    nudge(model)
    save_adapter(tmp_path, model, AdapterConfig(method=method, **kwargs), fingerprint(base), {"base_run": "b", "classes": ["cat"]})
    return base, model


@pytest.mark.parametrize("method, kwargs", [
    ("vera", {}), ("vera", {"sharing": "sliced", "store_projections": True}), ("lora", {"rank": 4})])
def test_adapter_file_round_trip_gives_identical_outputs(tmp_path, method, kwargs):
    base, model = _saved(tmp_path, method, **kwargs)
    restored = copy.deepcopy(base)
    apply_adapter(restored, tmp_path, fingerprint(base))
    assert torch.equal(restored(INPUT), model(INPUT))


def test_vera_file_holds_only_the_vectors_unless_asked(tmp_path):
    _saved(tmp_path, "vera")
    assert (tmp_path / "adapter.safetensors").stat().st_size < 4096


def test_adapter_on_another_base_is_refused(tmp_path):
    _saved(tmp_path, "vera")
    other = convnet(seed=5)
    with pytest.raises(VeraError, match="trained on another base model"):
        apply_adapter(other, tmp_path, fingerprint(other))


def test_projection_checksum_mismatch_is_refused(tmp_path):
    base, _ = _saved(tmp_path, "vera")
    meta = read_json(tmp_path / "adapter.json")
    meta["projection_checksum"] = "0" * 64
    write_json(tmp_path / "adapter.json", meta)
    with pytest.raises(VeraError, match="regenerated from the seed differ .*checksum mismatch"):
        apply_adapter(copy.deepcopy(base), tmp_path, fingerprint(base))


@pytest.mark.parametrize("sharing", ["per-shape", "sliced"])
def test_a_vera_adapter_saved_from_a_half_precision_copy_loads_into_a_float32_base(sharing):
    from vera_cli.adapters.state import adapter_metadata, adapter_tensors, load_adapter

    spec = AdapterConfig(method="vera", rank=8, sharing=sharing)
    model = adapted("vera", rank=8, sharing=sharing)
    nudge(model)
    half = copy.deepcopy(model).half()
    # Its projections are the seed's rounded to float16: a float32 base regenerates the seed's own, which the
    # adapter was trained with, so the file records their checksum.
    metadata = adapter_metadata(half, spec)
    assert metadata["projection_checksum"] == adapter_metadata(model, spec)["projection_checksum"]
    tensors = adapter_tensors(half, spec)
    loaded = convnet()
    load_adapter(loaded, metadata, tensors)
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for value in trainable_state(expected).values():
            value.copy_(value.half().float())
    assert torch.equal(loaded(INPUT), expected(INPUT))
    # Projections changed after the seed (then rounded) are not the seed's: their own checksum, refused on load.
    with torch.no_grad():
        next(projection_bank(half).buffers()).add_(1)
    with pytest.raises(AdapterError, match="checksum mismatch"):
        load_adapter(convnet(), adapter_metadata(half, spec), tensors)


@pytest.mark.parametrize("method, targets", [("vera", []), ("lora", []), ("vera", ["all"]), ("lora", ["all"])])
def test_merged_plain_model_is_the_base_architecture_with_the_same_outputs(method, targets):
    from vera_cli.adapters.inject import merged_plain

    model = adapted(method, targets=targets)
    nudge(model)
    expected = model(INPUT)
    plain = merged_plain(model)
    assert not adapted_layers(plain) and projection_bank(plain) is None
    assert set(plain.state_dict()) == set(convnet().state_dict())
    assert torch.allclose(plain(INPUT), expected, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    ({"rank": 8 / 2}, "rank must be an integer, got 4.0"),
    ({"rank": True}, "rank must be an integer, got True"),
    ({"projection_seed": 1.5}, "projection_seed must be an integer, got 1.5"),
    ({"d_init": "0.1"}, "d_init must be a number, got '0.1'"),
    ({"dropout": None}, "dropout must be a number, got None"),
    ({"targets": "linear"}, r"targets must be a list of strings, got 'linear' \(one: \['linear'\]\)"),
    ({"targets": [3]}, r"targets must be a list of strings, got \[3\]$"),
    ({"trainable": "fc5"}, r"trainable must be a list of strings, got 'fc5' \(one: \['fc5'\]\)"),
])
def test_settings_of_the_wrong_type_are_refused_before_a_model_is_touched(settings, message):
    from vera_cli.adapters.config import AdapterConfig as PackageConfig
    with pytest.raises(AdapterError, match=message):
        PackageConfig(method="lora", **settings)
    # Whole numbers where a float is meant are numbers.
    assert PackageConfig(d_init=1, alpha=8, targets=("fc1",)).alpha == 8


def test_a_layer_the_model_uses_at_two_places_is_adapted_at_both():
    from vera_cli.adapters.named import add_adapter, delete_adapter
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    base = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(4, 6)
    model = inject(copy.deepcopy(base), AdapterConfig(method="lora", rank=2, targets=["0"]))
    assert model[0] is model[2]
    nudge(model)
    part = model[0].parts["default"]
    tied = nn.Linear(6, 6)
    with torch.no_grad():
        tied.weight.copy_(model[0].base.weight + part.delta_weight(model[0]))
        tied.bias.copy_(model[0].base.bias)
        expected = nn.Sequential(tied, nn.ReLU(), tied, nn.ReLU(), model[4])(x)
        assert (model(x) - expected).abs().max() < 1e-6
        from vera_cli.adapters.inject import merged_plain
        plain = merged_plain(model)
        assert plain[0] is plain[2] and type(plain[0]) is nn.Linear
        assert (plain(x) - expected).abs().max() < 1e-6
    named = add_adapter(copy.deepcopy(base), "a", AdapterConfig(method="vera", rank=2))
    assert named[0] is named[2]
    delete_adapter(named, "a")
    assert named[0] is named[2] and type(named[0]) is nn.Linear


@pytest.mark.parametrize("layer", [nn.Linear(4, 4), nn.Conv2d(3, 4, 3)])
def test_a_model_that_is_itself_one_layer_is_refused_and_left_alone(layer):
    from vera_cli.adapters.named import add_adapter
    for adapt in (lambda: inject(layer, AdapterConfig(method="lora", rank=2, targets=["all"])),
                  lambda: add_adapter(layer, "a", AdapterConfig(method="vera", rank=2, targets=["all"]))):
        with pytest.raises(AdapterError, match=rf"the model is itself a {type(layer).__name__}: adapters replace "
                           r"layers inside a model; wrap it first \(nn.Sequential\(layer\)\)"):
            adapt()
        assert not layer._modules and all(p.requires_grad for p in layer.parameters())


class AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_the_output_projection_of_multihead_attention_is_refused_by_name_and_the_rest_adapts():
    torch.manual_seed(0)
    block = AttentionBlock().eval()
    x = torch.randn(2, 5, 8)
    expected = block(x)
    with pytest.raises(AdapterError, match="target layer attn.out_proj is the output projection of an "
                       "nn.MultiheadAttention, which reads its weight without calling it: leave it out of the targets"):
        inject(block, AdapterConfig(method="lora", rank=2))
    assert not adapted_layers(block)
    inject(block, AdapterConfig(method="lora", rank=2, targets=["fc"]))
    assert torch.allclose(block(x), expected, atol=1e-6)  # frozen, the attention may take its fused path

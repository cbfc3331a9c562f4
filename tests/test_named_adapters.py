"""Several named adapters on one base, and mixed-adapter batches (vera_cli.adapters.named, .mixed)."""

from __future__ import annotations

import copy
import io
import types

import numpy as np
import pytest
import torch
from torch import nn

from vera_cli import fast
from vera_cli.adapter_files import apply_adapter, save_adapter
from vera_cli.adapters.config import AdapterConfig
from vera_cli.adapters.errors import AdapterError
from vera_cli.adapters.inject import adapted_layers, inject, merge, merged_plain, projection_bank, unmerge
from vera_cli.adapters.layer import AdaptedLinear
from vera_cli.adapters.mixed import forward_mixed, mixed_batch
from vera_cli.adapters.named import (active_adapter, add_adapter, adapter_names, delete_adapter, disable_adapters,
                                     set_adapter)
from vera_cli.adapters.registry import banks, named_tensors
from vera_cli.adapters import routing, vera as vera_module
from vera_cli.adapters.routing import LOOP_UP_TO
from vera_cli.adapters.state import adapter_metadata, adapter_tensors, load_adapter
from vera_cli.bases import fingerprint
from vera_cli.models import ConvNet, ModelConfig, ViTConfig, build_model

INPUT = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))
TINY_VIT = ModelConfig("vit", ViTConfig(patch_size=8, dim=16, depth=2, heads=2, mlp_ratio=2))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model(TINY_VIT).eval()


def nudge(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter non-zero values, as training would (each adapter its own)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in adapter_names(model):
            for tensor in named_tensors(model, name).values():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)


def with_adapters(base: nn.Module, specs: dict[str, AdapterConfig]) -> nn.Module:
    model = copy.deepcopy(base)
    for name, spec in specs.items():
        add_adapter(model, name, spec)
    nudge(model)
    return model


def alone(model: nn.Module, name: str | None, x: torch.Tensor, forward=None) -> torch.Tensor:
    """The model's output for `x` with one adapter active (None: adapters disabled)."""
    forward = forward or model
    if name is None:
        with disable_adapters(model):
            return forward(x)
    set_adapter(model, name)
    return forward(x)


VERA_ALL = AdapterConfig(method="vera", rank=8, targets=["all"])


def test_named_adapters_compute_as_each_alone_and_the_base_comes_back():
    base = convnet()
    specs = {"cat": VERA_ALL, "dog": AdapterConfig(method="lora", rank=4, targets=["all"]),
             "bird": AdapterConfig(method="vera", rank=8, train_head=True), "ship": AdapterConfig(method="head")}
    model = with_adapters(base, specs)
    assert adapter_names(model) == list(specs) and active_adapter(model) == "cat"
    for name, spec in specs.items():
        # The same adapter as the only one of a fresh base (its tensors loaded by their file names).
        single = inject(copy.deepcopy(base), spec)
        single.load_state_dict({**single.state_dict(), **named_tensors(model, name)})
        set_adapter(model, name)
        assert torch.allclose(model(INPUT), single(INPUT), atol=1e-6), name
        # Only the active adapter trains.
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(t) for t in named_tensors(model, name).values()}, name
    with disable_adapters(model):
        assert torch.equal(model(INPUT), base(INPUT))
    assert not torch.equal(model(INPUT), base(INPUT))
    # Each adapter keeps its own copy of the head: the base's head is untouched by head and train_head adapters.
    assert torch.equal(model.fc5.base.weight, base.fc5.weight)
    for name in specs:
        delete_adapter(model, name)
    assert not adapted_layers(model) and not banks(model)
    assert model.state_dict().keys() == base.state_dict().keys()
    assert torch.equal(model(INPUT), base(INPUT))


def test_disabling_inside_a_disabled_block_leaves_the_outer_block_on_the_base():
    base = convnet()
    model = with_adapters(base, {"a": VERA_ALL})
    with torch.no_grad():
        with disable_adapters(model):
            with disable_adapters(model):
                pass
            assert torch.equal(model(INPUT[:2]), base(INPUT[:2]))
        assert (model(INPUT[:2]) - base(INPUT[:2])).abs().max() > 1e-3


def test_deleting_the_active_adapter_activates_the_first_remaining_and_drops_unread_projections():
    model = with_adapters(convnet(), {"a": VERA_ALL, "b": AdapterConfig(method="vera", rank=4, projection_seed=9),
                                      "c": AdapterConfig(method="lora", rank=2)})
    assert [name for name, _ in banks(model)] == ["vera_projections", "vera_projections_2"]
    delete_adapter(model, "a")
    assert active_adapter(model) == "b"
    assert [name for name, _ in banks(model)] == ["vera_projections"] and projection_bank(model, "b").seed == 9
    # conv1 and conv2 carried only "a": plain layers again.
    assert type(model.conv1) is nn.Conv2d and isinstance(model.fc1, AdaptedLinear)
    with pytest.raises(AdapterError, match="no adapter named 'a'; it has b, c"):
        set_adapter(model, "a")


@pytest.mark.parametrize("count", [1, 3, 8])
def test_vera_adapters_with_one_seed_share_one_projection_bank(count):
    model = with_adapters(convnet(), {f"a{i}": VERA_ALL for i in range(count)})
    assert len(banks(model)) == 1
    # One tensor in memory whatever the number of adapters: every adapter's A and B are the bank's storage.
    buffers = {name: buf.data_ptr() for name, buf in model.named_buffers()}
    assert len(buffers) == 12  # 6 per-shape pairs, as for a single adapter
    for layer in adapted_layers(model).values():
        pointers = {(part.projections(layer)[0].data_ptr(), part.projections(layer)[1].data_ptr())
                    for part in layer.parts.values()}
        assert len(pointers) == 1
        assert pointers <= {(a.data_ptr(), b.data_ptr()) for a, b in [projection_bank(model).projections(layer.fan_in, layer.out_features)]}


def test_adapter_files_load_under_names_sharing_projections_and_round_trip(tmp_path):
    base = convnet()
    specs = {"v": AdapterConfig(method="vera", rank=8, train_head=True),
             "w": AdapterConfig(method="vera", rank=8, targets=["fc[1-4]"]),
             "s": AdapterConfig(method="vera", rank=8, sharing="sliced", store_projections=True),
             "l": AdapterConfig(method="lora", rank=4, targets=["all"])}
    folders = {}
    for index, (name, spec) in enumerate(specs.items()):
        single = inject(copy.deepcopy(base), spec)
        nudge(single, seed=index)
        folders[name] = tmp_path / name
        folders[name].mkdir()
        save_adapter(folders[name], single, spec, fingerprint(base), {"base_run": "b", "classes": ["cat"]})
    model = copy.deepcopy(base)
    for name, folder in folders.items():
        apply_adapter(model, folder, fingerprint(base), name=name)
    assert len(banks(model)) == 2  # v and w read one per-shape bank, s its sliced pair
    for name, folder in folders.items():
        single = copy.deepcopy(base)
        apply_adapter(single, folder, fingerprint(base))
        set_adapter(model, name)
        assert torch.equal(model(INPUT), single(INPUT)), name
        # Saved by name, the adapter's file holds what the single model's file holds.
        spec = specs[name]
        ours, theirs = adapter_tensors(model, spec, name), adapter_tensors(single, spec)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert adapter_metadata(model, spec, name)["projection_checksum"] == adapter_metadata(single, spec)["projection_checksum"]


def test_saving_without_a_name_while_an_adapter_added_by_name_is_active_is_refused():
    model = inject(convnet(), VERA_ALL)
    add_adapter(model, "a", VERA_ALL)
    set_adapter(model, "a")
    with pytest.raises(AdapterError, match="the active adapter 'a' was added by name: pass name='a' to save it"):
        adapter_tensors(model, VERA_ALL)
    set_adapter(model, "default")
    assert set(adapter_tensors(model, VERA_ALL)) == set(adapter_tensors(model, VERA_ALL, "a"))


def test_a_file_that_does_not_fit_leaves_nothing_behind(tmp_path):
    base = convnet()
    spec = AdapterConfig(method="lora", rank=4)
    single = inject(copy.deepcopy(base), spec)
    tensors = adapter_tensors(single, spec)
    tensors["fc1.lora_A"] = torch.zeros(3, 400)
    model = with_adapters(base, {"a": VERA_ALL})
    before = set(model.state_dict())
    with pytest.raises(AdapterError, match="adapter tensor fc1.lora_A has shape"):
        load_adapter(model, adapter_metadata(single, spec), tensors, name="b")
    assert adapter_names(model) == ["a"] and set(model.state_dict()) == before


def test_merge_and_unmerge_one_adapter_at_a_time_restore_the_weights_exactly():
    model = with_adapters(convnet(), {"a": VERA_ALL, "b": AdapterConfig(method="lora", rank=4, train_head=True)})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    set_adapter(model, "b")
    expected = model(INPUT)
    set_adapter(model, "a")
    merge(model, "b")
    assert torch.allclose(model(INPUT), expected, atol=1e-5)
    with pytest.raises(AdapterError, match="adapter 'b' is merged: unmerge it before merging 'a'"):
        merge(model, "a")
    for refused in (lambda: set_adapter(model, "a"), lambda: disable_adapters(model).__enter__(),
                    lambda: mixed_batch(model, ["a"] * len(INPUT)).__enter__(), lambda: delete_adapter(model, "b")):
        with pytest.raises(AdapterError, match="'b' is merged"):
            refused()
    unmerge(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    plain = merged_plain(model, "b")
    assert plain.state_dict().keys() == convnet().state_dict().keys()
    assert torch.allclose(plain(INPUT), expected, atol=1e-5)


def test_merging_an_adapter_the_model_does_not_have_is_refused():
    model = with_adapters(convnet(), {"a": VERA_ALL})
    set_adapter(model, "a")
    expected = model(INPUT)
    for refused in (lambda: merge(model, "zz"), lambda: merged_plain(model, "zz")):
        with pytest.raises(AdapterError, match="no adapter named 'zz'; it has a"):
            refused()
    assert active_adapter(model) == "a" and adapter_names(model) == ["a"]
    assert torch.equal(model(INPUT), expected)


def test_adapters_are_refused_on_layers_that_are_not_float32_and_work_once_the_adapted_model_is_converted():
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(AdapterError, match=f"this model's are {str(dtype)[6:]}: call model.float"):
            add_adapter(convnet().to(dtype), "a", VERA_ALL)
    model = with_adapters(convnet(), {"a": VERA_ALL})
    model.to(torch.float64)
    with pytest.raises(AdapterError, match="this model's are float64"):
        add_adapter(model, "b", AdapterConfig(method="lora", rank=4))
    assert adapter_names(model) == ["a"]
    set_adapter(model, "a")
    with torch.no_grad():
        converted = model(INPUT.double())
        assert converted.dtype == torch.float64
        assert torch.allclose(converted.float(), model.float()(INPUT), atol=1e-5)


@pytest.mark.parametrize("name, message", [
    ("base", "means no adapter in a mixed batch"), ("a.b", "use letters, digits"), ("keys", "choose another name"),
    ("a", "already has an adapter named 'a'")])
def test_bad_names_are_refused(name, message):
    model = with_adapters(convnet(), {"a": VERA_ALL})
    with pytest.raises(AdapterError, match=message):
        add_adapter(model, name, AdapterConfig(method="lora"))


def test_a_full_fine_tune_or_a_model_trained_in_place_cannot_take_named_adapters():
    with pytest.raises(AdapterError, match="a full fine-tune changes every weight"):
        add_adapter(convnet(), "a", AdapterConfig(method="full"))
    legacy = inject(convnet(), AdapterConfig(method="vera", train_head=True))
    with pytest.raises(AdapterError, match=r"this model trains fc5.weight, fc5.bias in place"):
        add_adapter(legacy, "b", AdapterConfig(method="lora"))
    # The default adapter added by name keeps its head apart, so others may join it.
    model = add_adapter(convnet(), "default", AdapterConfig(method="vera", train_head=True))
    assert {"fc5.weight", "fc5.base.weight", "fc1.vera_d"} <= set(model.state_dict())
    add_adapter(model, "b", AdapterConfig(method="lora"))


MIXED = {
    "v1": VERA_ALL, "v2": VERA_ALL, "v3": VERA_ALL,
    "v4": AdapterConfig(method="vera", rank=4, projection_seed=7, sharing="sliced"),
    # A rank above the layers' widths: its samples go through its delta W where that costs less.
    "v5": AdapterConfig(method="vera", rank=64, projection_seed=11, targets=["all"]),
    "l1": AdapterConfig(method="lora", rank=4, targets=["all"]), "l2": AdapterConfig(method="lora", rank=2),
    "h1": AdapterConfig(method="head"), "vh": AdapterConfig(method="vera", rank=8, train_head=True),
    **{f"m{i}": AdapterConfig(method="lora", rank=4, targets=["all"], alpha=4 + i) for i in range(LOOP_UP_TO + 2)},
    **{f"c{i}": AdapterConfig(method="head") for i in range(LOOP_UP_TO + 1)},
}


# fast.forward(ViT) is the model itself; on the ConvNet it is the compiled prefix and the weight path. With
# LOOP_FROM_POSITIONS out of reach, adapters with many positions each (convolutions, tokens) are gathered per row too.
@pytest.mark.parametrize("build, use_fast", [(convnet, False), (convnet, True), (vit, False)])
@pytest.mark.parametrize("loop_from_positions", [routing.LOOP_FROM_POSITIONS, 10 ** 9])
def test_each_sample_of_a_mixed_batch_gets_what_it_gets_alone(build, use_fast, loop_from_positions, monkeypatch):
    monkeypatch.setattr(routing, "LOOP_FROM_POSITIONS", loop_from_positions)
    monkeypatch.setattr(vera_module, "TURN", 0)  # v5's weights cost less than its factors at this toy size
    model = with_adapters(build(), MIXED)
    names = [list(MIXED)[i % len(MIXED)] for i in range(len(INPUT))]
    names[5], names[11] = None, "base"
    forward = fast.forward(model) if use_fast else model
    with torch.no_grad():
        mixed = forward_mixed(model, INPUT, names, forward)
        for row, name in enumerate(names):
            expected = alone(model, None if name == "base" else name, INPUT[row:row + 1], forward)
            assert (mixed[row] - expected[0]).abs().max() < 1e-5, (row, name)


def test_a_batch_all_on_vera_adapters_above_the_width_skips_the_base_output_and_gets_what_each_gets_alone(monkeypatch):
    # Rank 64 on layers of width 16, 17 tokens a sample: each adapter's own weight costs less than the factors
    # (at this toy size, once a loop step's own cost is set aside).
    monkeypatch.setattr(vera_module, "TURN", 0)
    model = with_adapters(vit(), {f"w{i}": AdapterConfig(method="vera", rank=64, targets=["attention"]) for i in range(3)})
    names = [f"w{i % 3}" for i in range(len(INPUT))]
    calls = []
    hooks = [layer.base.register_forward_hook(lambda *_: calls.append(1)) for layer in adapted_layers(model).values()]
    with torch.no_grad():
        mixed = forward_mixed(model, INPUT, names)
    assert calls == []  # no adapted layer computed the base's output beneath the adapters' weights
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for row, name in enumerate(names):
            assert (mixed[row] - alone(model, name, INPUT[row:row + 1])[0]).abs().max() < 1e-5, (row, name)


@pytest.mark.parametrize("adapters, loop", [(32, True), (48, True), (61, False), (201, False)])
def test_mixed_vera_batches_on_the_vit_switch_to_the_factors_where_they_were_measured_faster(adapters, loop):
    # pretrain-vit's query at VeRA r256, 256 images of 64 tokens, each on a VeRA adapter: timed both ways, each
    # adapter's own weight ran faster up to 32 adapters, even at 48, and slower from 61 on (TURN's comment).
    layer = types.SimpleNamespace(fan_in=128, out_features=128)
    group = types.SimpleNamespace(parts=[types.SimpleNamespace(rank=256)], used=list(range(adapters)))
    assert vera_module._own_weights_cost_less(layer, 256 * 64, group, beside_base=False) is loop


def test_positions_or_a_tensor_choose_adapters_and_a_uniform_batch_is_the_adapter_alone():
    model = with_adapters(convnet(), {"a": VERA_ALL, "b": AdapterConfig(method="lora", rank=4)})
    with torch.no_grad():
        by_name = forward_mixed(model, INPUT[:4], ["a", "b", None, "a"])
        assert torch.equal(forward_mixed(model, INPUT[:4], [0, 1, -1, 0]), by_name)
        assert torch.equal(forward_mixed(model, INPUT[:4], torch.tensor([0, 1, -1, 0])), by_name)
        assert torch.equal(forward_mixed(model, INPUT[:4], np.array([0, 1, -1, 0])), by_name)  # a router's argmax
        assert torch.equal(forward_mixed(model, INPUT, ["b"] * len(INPUT)), alone(model, "b", INPUT))
    with pytest.raises(AdapterError, match="no adapter named 'z': the model has a, b"):
        forward_mixed(model, INPUT[:2], ["a", "z"])
    with pytest.raises(AdapterError, match="4 samples but 3 per-sample adapters: give one adapter per sample"):
        forward_mixed(model, INPUT[:4], ["a", "b", None])
    with pytest.raises(AdapterError, match="names an adapter for 3 samples, but this layer got 4 rows"), \
            mixed_batch(model, ["a", "b", None]):
        model(INPUT[:4])
    # One name for the whole batch is a list of it, not the name's letters; True is not adapter 1.
    with pytest.raises(AdapterError, match=r"not the string 'ab': \['ab'\] \* batch_size puts every sample on it"):
        forward_mixed(model, INPUT[:2], "ab")
    with pytest.raises(AdapterError, match="a sample's adapter is a name, a position in 0..1, -1, None or 'base'; got True"):
        forward_mixed(model, INPUT[:2], [True, 0])
    with pytest.raises(AdapterError, match="not the string 'abc'"):
        forward_mixed(model, INPUT[:2], "abc")
    with pytest.raises(AdapterError, match="as a tensor must be one integer position per sample"):
        forward_mixed(model, INPUT[:2], torch.tensor(0))
    with pytest.raises(AdapterError, match="2 samples but 3 per-sample adapters"):
        forward_mixed(model, INPUT[:2], torch.tensor([0, 1, 0]))
    with pytest.raises(AdapterError, match="positions must lie in -1..1"):
        forward_mixed(model, INPUT[:2], torch.tensor([0, 2]))


def test_vera_computes_one_down_and_one_up_product_per_layer_for_the_whole_batch(monkeypatch):
    model = with_adapters(convnet(), {f"a{i}": VERA_ALL for i in range(6)})
    calls = []
    for method in ("down", "up"):  # static on the linear geometry: counted per layer through an instance method
        original = getattr(AdaptedLinear, method)
        monkeypatch.setattr(AdaptedLinear, method, lambda self, x, w, original=original, method=method:
                            calls.append((method, id(self))) or original(x, w))
    with torch.no_grad():
        forward_mixed(model, INPUT, [f"a{i % 6}" for i in range(len(INPUT))])
    linear = [id(layer) for layer in adapted_layers(model).values() if isinstance(layer, AdaptedLinear)]
    assert sorted(calls) == sorted([("down", i) for i in linear] + [("up", i) for i in linear])


def test_layers_reading_one_input_through_one_a_share_its_down_projection(monkeypatch):
    # A ViT's query, key and value read one normalised input; VeRA gives layers of one shape one A.
    model = with_adapters(vit(), {f"a{i}": AdapterConfig(method="vera", rank=8, targets=["all"]) for i in range(4)})
    calls = []
    for method in ("down", "up"):
        original = getattr(AdaptedLinear, method)
        monkeypatch.setattr(AdaptedLinear, method, lambda self, x, w, original=original, method=method:
                            calls.append((method, self)) or original(x, w))
    names = [f"a{i % 4}" for i in range(len(INPUT))]
    with torch.no_grad():
        mixed = forward_mixed(model, INPUT, names)
    blocks = model.blocks
    downs = [layer for method, layer in calls if method == "down"]
    # Per block: one for query, key and value together, one each for out, fc1 and fc2; the head reads its own input.
    assert downs == [layer for block in blocks for layer in (block.attn.query, block.attn.out, block.mlp.fc1,
                                                             block.mlp.fc2)] + [model.head]
    assert sum(method == "up" for method, _ in calls) == 6 * len(blocks) + 1
    with torch.no_grad():
        for row, name in enumerate(names):
            assert (mixed[row] - alone(model, name, INPUT[row:row + 1])[0]).abs().max() < 1e-5, (row, name)
    # An input changed in place between two layers is projected again.
    shared = routing.SharedDown()
    x, a = torch.ones(2, 3), torch.ones(4, 3)
    first = shared.get(x, a, None, (), lambda: x @ a.t())
    x.mul_(2)
    assert torch.equal(shared.get(x, a, None, (), lambda: x @ a.t()), 2 * first)


@pytest.mark.parametrize("build", [convnet, vit])
def test_a_mixed_batch_under_inference_mode_gets_what_it_gets_under_no_grad(build):
    model = with_adapters(build(), {"a": VERA_ALL, "b": VERA_ALL, "l": AdapterConfig(method="lora", rank=4)})
    names = ["a", "b", None, "l"] * 6
    with torch.no_grad():
        expected = forward_mixed(model, INPUT, names)
    with torch.inference_mode():
        got = forward_mixed(model, INPUT, names)
    assert (got - expected).abs().max() < 1e-6


def test_one_adapter_s_tensors_saved_after_a_mixed_batch_hold_that_adapter_alone():
    spec = VERA_ALL
    model = with_adapters(convnet(), {f"a{i}": spec for i in range(16)})

    def saved(name: str) -> tuple[int, dict]:
        buffer = io.BytesIO()
        torch.save(adapter_tensors(model, spec, name), buffer)
        return len(buffer.getvalue()), torch.load(io.BytesIO(buffer.getvalue()))

    before, values = saved("a3")
    with torch.no_grad():
        forward_mixed(model, INPUT[:8], [f"a{i}" for i in range(8)])
    after, again = saved("a3")
    # The vectors are rows of one table per layer now; the file still holds one adapter's.
    assert after == before
    assert values.keys() == again.keys() and all(torch.equal(values[k], again[k]) for k in values)


@pytest.mark.parametrize("change", ["in place", "load_state_dict", "assigned", "replaced", "deleted", "converted",
                                    "round trip", "trained"])
def test_a_mixed_batch_sees_every_change_to_the_adapters_since_the_last(change):
    """Mixed batches keep each layer's stacked adapter values between calls: a change of any kind must show."""
    names = [f"a{i}" for i in range(LOOP_UP_TO + 3)]
    model = with_adapters(convnet(), {**{name: VERA_ALL for name in names},
                                      "l": AdapterConfig(method="lora", rank=4, targets=["all"])})
    per_sample = [names[i % len(names)] for i in range(len(INPUT))]
    per_sample[3] = "l"
    with torch.no_grad():
        before = forward_mixed(model, INPUT, per_sample)
        assert torch.equal(forward_mixed(model, INPUT, per_sample), before)
        layer = adapted_layers(model)["fc2"]
        if change == "in place":
            layer.parts["a1"].tensor("vera_b").mul_(3)
            layer.parts["l"].tensor("lora_B").mul_(3)
        elif change == "load_state_dict":
            state = {key: value * 3 for key, value in model.state_dict().items()
                     if key.startswith("fc2.") and key.endswith((".a1.vera_b", ".l.lora_B"))}
            assert len(state) == 2
            model.load_state_dict(state, strict=False)
        elif change == "assigned":  # new Parameters in place of the old, as a checkpoint loaded with assign
            state = {key: value * 3 for key, value in model.state_dict().items()
                     if key.startswith("fc2.") and key.endswith((".a1.vera_b", ".l.lora_B"))}
            model.load_state_dict(state, strict=False, assign=True)
            assert layer.parts["a1"].tensor("vera_b").data_ptr() == state["fc2.adapters.a1.vera_b"].data_ptr()
        elif change == "trained":  # an optimizer step changes the tensors in place, one kernel for all of them
            with torch.enable_grad():
                tensors = [layer.parts["a1"].tensor("vera_b"), layer.parts["l"].tensor("lora_B")]
                optimizer = torch.optim.AdamW(tensors, lr=0.5, foreach=True)
                for tensor in tensors:
                    tensor.grad = torch.ones_like(tensor)
                optimizer.step()
        elif change == "replaced":
            holder = layer.parts["a1"].holder
            new = nn.Parameter(holder.vera_b.detach() * 3)
            while new._version < holder.vera_b._version:  # the same count of in-place changes: only identity tells
                new.add_(0)
            holder.vera_b = new
        elif change == "deleted":
            delete_adapter(model, "a1")
            per_sample = [None if name == "a1" else name for name in per_sample]
        inputs = INPUT
        if change == "converted":
            model.double()
            inputs = INPUT.double()
            layer.parts["a1"].tensor("vera_b").mul_(3)
        if change == "round trip":  # new data for every tensor, on the same device and of the same type as before
            model.double().float()
            layer.parts["a1"].tensor("vera_b").mul_(3)
        after = forward_mixed(model, inputs, per_sample)
        assert after.dtype == inputs.dtype
        for row in (1, 3, 8):  # a1, l, a1
            name = per_sample[row]
            expected = alone(model, name, inputs[row:row + 1])
            assert (after[row] - expected[0]).abs().max() < 1e-5, (row, name)
        assert (after[1] - before[1]).abs().max() > 1e-4
        assert torch.allclose(after[2].float(), before[2], atol=1e-5)  # a2 untouched


def test_mixed_batches_in_training_mode_train_each_sample_through_its_own_adapter():
    model = with_adapters(convnet(), {"a": VERA_ALL, "b": AdapterConfig(method="lora", rank=4)}).train()
    for name in ("a", "b"):
        for tensor in named_tensors(model, name).values():
            tensor.requires_grad_(True)
    forward_mixed(model, INPUT[:4], ["a", "a", None, None]).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in named_tensors(model, "a").values())
    assert all(t.grad is None for t in named_tensors(model, "b").values())
    dropout = with_adapters(convnet(), {"a": AdapterConfig(method="vera", dropout=0.1)}).train()
    with pytest.raises(AdapterError, match="without adapter dropout: call model.eval"):
        forward_mixed(dropout, INPUT[:2], ["a", None])


@pytest.mark.parametrize("count", [2, LOOP_UP_TO + 3])
def test_lora_mixed_batch_equals_peft_adapter_names_on_the_same_weights(count):
    peft = pytest.importorskip("peft", reason="peft is not installed: pip install -e '.[peft]' to run this")
    targets = ["conv1", "conv2", "fc1", "fc2", "fc3", "fc4", "fc5"]
    names = [f"a{i}" for i in range(count)]
    ours = with_adapters(convnet(), {name: AdapterConfig(method="lora", rank=4, alpha=4 + i, targets=["all"])
                                     for i, name in enumerate(names)})
    theirs = peft.get_peft_model(convnet(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets), adapter_name=names[0])
    for i, name in enumerate(names[1:], start=1):
        theirs.add_adapter(name, peft.LoraConfig(r=4, lora_alpha=4 + i, target_modules=targets))
    with torch.no_grad():
        for name in names:
            for layer_name, layer in adapted_layers(ours).items():
                peft_layer = theirs.base_model.model.get_submodule(layer_name)
                peft_layer.lora_A[name].weight.copy_(layer.parts[name].tensor("lora_A"))
                peft_layer.lora_B[name].weight.copy_(layer.parts[name].tensor("lora_B"))
        theirs.eval()
        per_sample = [names[i % count] if i % 5 else None for i in range(len(INPUT))]
        logits = forward_mixed(ours, INPUT, per_sample)
        reference = theirs(INPUT, adapter_names=[name or "__base__" for name in per_sample])
    assert (logits - reference).abs().max() < 1e-5


def test_an_adapter_that_trains_layers_whole_keeps_its_own_copies():
    model = with_adapters(convnet(), {"a": VERA_ALL})
    add_adapter(model, "b", AdapterConfig(method="lora", targets=["fc1"], trainable=["conv1", "fc5"]))
    set_adapter(model, "b")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.adapters.b.lora_A", "fc1.adapters.b.lora_B", "conv1.adapters.b.weight",
                         "conv1.adapters.b.bias", "fc5.adapters.b.weight", "fc5.adapters.b.bias"}
    with pytest.raises(AdapterError, match="adapter 'c' cannot sit beside others: trainable names fc1, which the "
                       "adapter also adapts"):
        add_adapter(model, "c", AdapterConfig(method="vera", trainable=["fc1"]))

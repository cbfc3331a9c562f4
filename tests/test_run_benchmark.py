"""The benchmark helpers: the arithmetic limit counts the write-up's ConvNet; round-robin timing varies the order."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when the script runs: it imports the shared timing helper beside it
SPEC = importlib.util.spec_from_file_location("benchmark_run", BENCHMARKS / "run.py")
bench = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = bench  # its dataclasses look their module up there
SPEC.loader.exec_module(bench)


def test_flops_per_training_image_are_the_six_channel_networks_forward_times_three():
    conv_macs = 28 * 28 * 6 * 3 * 5 * 5 + 10 * 10 * 16 * 6 * 5 * 5
    linear_macs = 400 * 120 + 120 * 84 + 84 * 84 + 84 * 84 + 84 * 10
    assert bench.flops_per_training_image() == 3 * 2 * (conv_macs + linear_macs) == 3_994_992


def test_a_vit_s_training_flops_count_its_attention_products_on_the_cpu():
    from conftest import TINY_VIT
    from vera_cli.models import build_model

    torch.manual_seed(0)
    # TINY_VIT: 32x32 images in patches of 8 (16 tokens), width 16, 2 blocks of 2 heads, MLP 32 wide, 10 classes.
    tokens, dim, hidden, blocks = 16, 16, 32, 2
    linear = tokens * blocks * (4 * dim * dim + 2 * dim * hidden) + dim * 10
    attention = blocks * 2 * tokens * tokens * dim  # scores and their weighted sum, over the heads together
    embed = tokens * dim * 3 * 8 * 8
    # Forward and two products back for each linear layer and for attention; the embedding's weight gradient
    # only (nothing flows back to the images).
    expected = 2 * (3 * (linear + attention) + 2 * embed)
    assert bench.counted_training_flops(build_model(TINY_VIT), batch=4) == expected


def test_round_robin_times_every_call_each_round_after_varying_predecessors(monkeypatch):
    import timing

    # A clock that each call moves on by its own cost: 1, 2, 3 or 4 ms, and 100 times that every fourth time
    # it runs (a slow outlier the median leaves out, where a mean would not).
    clock, sequence = [0.0], []
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def call(name: str) -> None:
        sequence.append(name)
        cost = "abcd".index(name) + 1
        clock[0] += cost / 1000 * (100 if sequence.count(name) % 4 == 0 else 1)

    calls = {name: (lambda name=name: call(name)) for name in "abcd"}
    medians = timing.round_robin_ms(calls, 40)
    assert medians == pytest.approx({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    rounds = [sequence[i:i + 4] for i in range(0, len(sequence), 4)]
    assert len(rounds) == 40 and all(sorted(r) == list("abcd") for r in rounds)
    # No call always follows the same one (a twin before it ran faster in a fixed order).
    for name in "abcd":
        before = {sequence[i - 1] for i in range(1, len(sequence)) if sequence[i] == name}
        assert len(before) >= 3, name


def test_serving_measures_every_setup_on_both_models_and_the_setups_agree(monkeypatch):
    pytest.importorskip("peft")
    import serving
    from conftest import TINY_VIT
    from vera_cli.models import build_model

    full_size = serving.base_model
    monkeypatch.setattr(serving, "base_model", lambda name: full_size(name) if name == "convnet" else build_model(TINY_VIT).eval())
    result = serving.serving((1, 3), calls=1, batch=6)
    assert set(result["models"]) == {"convnet", "vit"}
    for entry in result["models"].values():
        rows = entry["rows"]
        # The most adapters and one, timed in turn.
        assert rows["single"]["adapters"] == 3 and rows["single"]["vera mixed images/s"] > 0
        assert rows["single"]["vera images/s"] > 0
        for count in (1, 3):
            row = rows[count]
            assert all(row[name]["images_per_second"] > 0
                       for name in ("vera mixed", "lora mixed", "peft lora mixed", "merged per adapter"))
            # PEFT computes our LoRA adapters' logits, the merged models our VeRA adapters'.
            assert row["peft lora mixed"]["max_difference"] < 1e-4 and row["merged per adapter"]["max_difference"] < 1e-4
        # A file per adapter; VeRA adds one 8-byte seed for all of them.
        assert rows[3]["disk_bytes"]["vera"] - 8 == 3 * (rows[1]["disk_bytes"]["vera"] - 8)
        assert rows[3]["disk_bytes"]["lora"] == 3 * rows[1]["disk_bytes"]["lora"]
    # The ViT's VeRA below its width as well, at the largest N, against its own single adapter.
    low = result["models"]["vit"]["rows"]["low rank"]
    assert low["adapters"] == 3 and low["vera mixed images/s"] > 0 and low["vera images/s"] > 0
    assert "low rank" not in result["models"]["convnet"]["rows"]
    rows, disk = bench.serving_lines(result)
    # Per model and count a VeRA and a LoRA row, then VeRA's ratio to one adapter (and the ViT's at the low rank);
    # LoRA's and those ratios have targets.
    assert len(rows) == 2 * (2 * 2 + 1) + 1
    assert sum(row.endswith("met) |") for row in rows) == 2 * (2 + 1) + 1
    assert rows[-2].startswith("| VeRA mixed batch of 3 adapters against one adapter, timed in turn, vit |")
    assert rows[-1].startswith("| the same at VeRA r32, below the width (3 adapters) |")
    assert [line.split(":")[0] for line in disk] == ["Bytes on disk for N adapters, convnet",
                                                     "Bytes on disk for N adapters, vit"]


def test_growth_laws_tell_linear_from_a_fixed_floor_and_from_faster_growth():
    import growth

    linear = growth.law([(1, 2.0), (2, 3.0), (4, 5.0)])
    assert linear["kind"] == "linear"
    assert linear["per_unit_seconds"] == pytest.approx(1.0) and linear["fixed_seconds"] == pytest.approx(1.0)
    # A floor (the few-shot step budget): the first step up costs nothing.
    floor = growth.law([(10, 5.0), (100, 5.0), (1000, 9.0), (5000, 30.0)])
    assert floor["kind"] == "slower than linear" and floor["elasticity"] < 1
    quadratic = growth.law([(1, 1.0), (2, 4.0), (4, 16.0)])
    assert quadratic["kind"] == "faster than linear" and quadratic["elasticity"] == pytest.approx(2.0)
    rows = bench.growth_lines({"pretrain": {"unit": "training images", "points": [(1, 2.0), (2, 3.0), (4, 5.0)],
                                            **linear, "reason": "why"}})
    assert rows == ["| how cost grows: pretrain wall time at 1 / 2 / 4 training images | 2.0 / 3.0 / 5.0 s | linear: "
                    "1 s per unit + 1.0 s fixed (time grew as size^0.66) | - | why |"]


def test_time_to_the_classic_accuracy_takes_the_shortest_schedule_that_reaches_it(monkeypatch, tmp_path):
    # Each schedule's epochs end at a test accuracy that grows with the schedule's length (fake runs).
    schedules = []

    def fake_pretrain(cfg, log, progress):
        epochs = cfg.train.epochs
        schedules.append(epochs)
        curve = [0.40 + 0.05 * epoch + 0.01 * epochs for epoch in range(1, epochs + 1)]
        lines = "\n".join(f'{{"epoch": {e}, "seconds": 2.0, "test_accuracy": {a}}}' for e, a in enumerate(curve, 1))
        return SimpleNamespace(run=SimpleNamespace(file=lambda name: SimpleNamespace(read_text=lambda: lines)),
                               test=SimpleNamespace(overall=curve[-1]))

    monkeypatch.setattr(bench, "run_pretrain", fake_pretrain)
    # 3 epochs end at 0.58, 4 at 0.64 (its epoch 4 is the first at 0.60 or above).
    result = bench.ours_to_accuracy("data", 0.60, tmp_path, longest=6)
    assert schedules == [3, 4]
    assert result["epochs"] == 4 and result["reached"] == {"epoch": 4, "train_seconds": 8.0}
    assert [t["accuracy"] for t in result["tried"]] == pytest.approx([0.58, 0.64])
    # Out of reach within the longest schedule: every schedule tried, nothing reached.
    schedules.clear()
    result = bench.ours_to_accuracy("data", 0.99, tmp_path, longest=5)
    assert schedules == [3, 4, 5] and result["reached"] is None and result["epochs"] == 5


def test_predict_on_the_test_split_as_png_files_counts_what_eval_counts(tmp_path_factory, tmp_path, cifar_root,
                                                                         trained_base):
    from conftest import train_once
    from synthetic import TEST_SIZE
    import predict_files

    trained = train_once(tmp_path_factory, cifar_root, "adapt", "--base", "runs/base", "--epochs", "1",
                         "--batch-size", "32", "--run-dir", "runs/vera", runs_from=trained_base)
    result = predict_files.predict_files(str(cifar_root), str(trained / "runs" / "vera"), tmp_path)
    forms = result["forms"]
    assert result["images"] == TEST_SIZE and 0 < result["eval_correct"] < TEST_SIZE
    assert forms["png 32x32"]["correct"] == result["eval_correct"] and not forms["png 32x32"]["converted"]
    assert forms["jpeg 96x96"]["converted"] and forms["jpeg 224x300"]["converted"]
    assert all(form["skipped"] == 0 and form["images_per_second"] > 0 for form in forms.values())
    png, jpeg, _ = bench.predict_lines(result)
    assert png.endswith("| +0 images correct | the same images correct (met) |")
    assert "short side to 32, centre crop" in jpeg and "short side" not in png
    # One image more or fewer than eval's is a failed row.
    forms["png 32x32"]["correct"] -= 1
    assert bench.predict_lines(result)[0].endswith("| -1 images correct | the same images correct (NOT met) |")

"""The benchmark helpers: the arithmetic limit counts the write-up's ConvNet; round-robin timing varies the order."""

import importlib.util
import sys
from pathlib import Path

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


def test_round_robin_times_every_call_each_round_after_varying_predecessors():
    from timing import round_robin_ms

    sequence = []
    calls = {name: (lambda name=name: sequence.append(name)) for name in "abcd"}
    medians = round_robin_ms(calls, 40)
    assert set(medians) == set("abcd") and all(ms >= 0 for ms in medians.values())
    rounds = [sequence[i:i + 4] for i in range(0, len(sequence), 4)]
    assert len(rounds) == 40 and all(sorted(r) == list("abcd") for r in rounds)
    # No call always follows the same one (a twin before it ran faster in a fixed order).
    for name in "abcd":
        before = {sequence[i - 1] for i in range(1, len(sequence)) if sequence[i] == name}
        assert len(before) >= 3, name

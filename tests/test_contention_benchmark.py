"""The busy-machine benchmark (benchmarks/contention.py): every setting timed alone and beside a busy process."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import contention  # noqa: E402


@pytest.mark.slow
def test_each_setting_runs_alone_and_beside_a_busy_process_that_is_stopped_after(monkeypatch):
    started = []
    real = subprocess.Popen

    def recorded(*args, **kwargs):
        process = real(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(contention.subprocess, "Popen", recorded)
    result = contention.contention("convnet", steps=2)
    assert list(result) == list(contention.SETTINGS)
    assert all(set(seconds) == {"alone", "busy"} and all(0 < s < 60 for s in seconds.values()) for seconds in result.values())
    busy = [process for process in started if process.args == contention.BUSY]
    # One busy neighbour for the three settings' busy runs, gone when they are.
    assert len(busy) == 1 and busy[0].poll() is not None
    # Six timed processes besides it, each of them finished.
    assert len(started) == 7 and all(process.poll() is not None for process in started)


"""One run lifecycle for every command that writes a run.

prepare (refuse an existing run directory, or check that a resumed run keeps its
own config) -> open (create the directory, record status and config) -> seed ->
restore a checkpoint on resume -> finish (summary, status, drop the checkpoint).
An interruption or failure inside marks the run and keeps its wall time, so a
resumed run reports the time of all its parts. Commands own only their logic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, TypeVar

import torch
from torch import nn

from vera_cli import config as config_module
from vera_cli import fast, signals
from vera_cli.bases import run_config
from vera_cli.checkpoint import restore
from vera_cli.config import LoggingConfig
from vera_cli.errors import VeraError
from vera_cli.runlock import RunLock
from vera_cli.runs import CONFIG_FILE, Run, create_run, ensure_new, open_resumable
from vera_cli.files import write_json, write_yaml, yaml_bytes

# Keys a resumed run may change: where the data is, what it runs on and what it logs, never what it computes.
RESUMABLE_CHANGES = ("device", "workers", "data.dir", "data.download", "logging.tensorboard", "logging.plots")
T = TypeVar("T")


class Summary(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


S = TypeVar("S", bound=Summary)


def load_settings(cls: type[T], kind: str, default: str, source: str | Path | None, overrides: dict[str, Any],
                  resume: Optional[str]) -> tuple[Optional[Run], T]:
    """(run to resume or None, validated config) from the shipped config `default` or the file `source` laid
    over it. A resumed run reads its own config.yaml; of the overrides only RESUMABLE_CHANGES apply,
    anything else is refused with the list to drop."""
    if not resume:
        return None, config_module.load(cls, source or default, overrides, default=default)
    given = sorted(key for key, value in overrides.items() if value is not None and key not in RESUMABLE_CHANGES)
    if given:
        raise VeraError(f"--resume continues a run with its own config; drop {', '.join(given)} "
                        f"(only {', '.join(RESUMABLE_CHANGES)} may change)")
    run = open_resumable(resume, kind)
    recorded = config_module.load_recorded(cls, run_config(run), str(run.file(CONFIG_FILE)))
    return run, config_module.build(cls, config_module.apply_overrides(config_module.to_dict(recorded), overrides))


def check_resume_config(run: Run, recorded: dict[str, Any], cls: type) -> None:
    """Refuse to continue `run` with a config other than the one it started with.

    The run's config.yaml is read through `cls`, as the resumed run reads it: a key added since the
    run started is absent from the file and takes its default, which is no change.
    """
    started = run_config(run)
    before = config_module.flatten({**started, **config_module.to_dict(config_module.load_recorded(cls, started, str(run.file(CONFIG_FILE))))})
    now = config_module.flatten(recorded)
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES and k != "run_dir")
    if changed:
        raise VeraError(f"{run.path} continues with its own config; these keys differ from it: {', '.join(changed)} "
                        f"(only {', '.join(RESUMABLE_CHANGES)} may change on --resume)")


def _seconds(value: Any) -> float:
    """Wall seconds recorded by earlier parts of a run; an edited or missing value counts as none."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 else 0.0


class Shared(Protocol):
    """How a process takes part in a run that several processes share (vera_cli.distributed): one of them
    writes the run, every one of them waits for the others at `barrier` and gets the writer's value from `share`."""

    writes: bool

    def barrier(self) -> None: ...

    def share(self, value: T) -> T: ...


class RunLifecycle:
    """A run of `kind` for config `cfg` (which has `run_dir`), new or resumed.

    Under torchrun several processes share one run (`shared`) and only one writes it;
    `writes` and `by_writer` are how commands tell. Alone, a process writes its run.
    """

    def __init__(self, kind: str, cfg: Any, resume: Run | None = None, resumable: bool = True,
                 recorded: dict[str, Any] | None = None, shared: Shared | None = None) -> None:
        self.kind, self.cfg, self.resume, self.resumable, self.shared = kind, cfg, resume, resumable, shared
        # The run's recorded environment names the path that computed this run, from its first evaluation on.
        fast.forget_use()
        # What config.yaml holds: the config, with anything resolved at start (the base run) filled in.
        self.recorded = recorded if recorded is not None else config_module.to_dict(cfg)
        if resume is None:
            ensure_new(cfg.run_dir)
        else:
            check_resume_config(resume, self.recorded, type(cfg))
            RunLock.check(resume.path)
        self._run: Run | None = None
        self._started = 0.0
        self._earlier_seconds = 0.0

    @property
    def writes(self) -> bool:
        return self.shared is None or self.shared.writes

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("the run is not open yet")
        return self._run

    @contextlib.contextmanager
    def open(self) -> Iterator[Run]:
        """Create (or reopen) the run directory; mark it interrupted or failed if the body does not finish.
        A process that does not write takes the writer's directory and leaves it alone."""
        if self.shared is not None:
            # No process checks the run directory after the writer has created it.
            self.shared.barrier()
        self._started = time.perf_counter()
        if not self.writes:
            self._run = Run(Path(self.shared.share(None)))
            yield self._run
            return
        if self.resume is None:
            # An interrupt after the directory is published and before its recording starts would leave the run
            # marked running with no process behind it (listed as crashed): it lands once recording has started.
            signals.hold()
            try:
                run, lock = create_run(self.kind, self.cfg.run_dir, {CONFIG_FILE: yaml_bytes(self.recorded)})
            except BaseException:
                signals.release()
                raise
        else:
            # Two processes must never write one run: the second resume is refused here.
            run, lock = self.resume, RunLock.acquire(self.resume.path)
            try:
                # Another process may have finished it while this one loaded its data.
                self._earlier_seconds = _seconds(open_resumable(run.path, self.kind).status.get("wall_seconds"))
            except BaseException:
                lock.release()
                raise
        self._run = run
        try:
            with run.recording(self.resumable):
                signals.release()
                if self.resume is not None:
                    run.set_status("running")
                    write_yaml(run.file(CONFIG_FILE), self.recorded)
                if self.shared is not None:
                    self.shared.share(str(run.path))
                yield run
        except BaseException:
            with contextlib.suppress(Exception):
                run.set_status(run.status.get("status", "failed"), wall_seconds=self.elapsed())
            raise
        finally:
            lock.release()

    def seed(self, seed: int, device: torch.device) -> torch.Generator:
        """Seed torch's global generator (weights, adapters) and return the run's own data generator."""
        torch.manual_seed(seed)
        return torch.Generator(device=device).manual_seed(seed)

    def restore(self, model: nn.Module, trainer: Any, generator: torch.Generator, log: Callable[[str], None]) -> int:
        """The epoch to start from: 1 for a new run, the one after the last checkpoint on resume (checked
        against the run's config and its metrics record; `log` hears what was rebuilt)."""
        if not self.resume:
            return 1
        return restore(self.run, model, trainer, generator, log, self.writes)

    def logging(self, cfg: LoggingConfig) -> LoggingConfig:
        """The training logs (TensorBoard, plots) this process writes: all that `cfg` asks for, if it writes."""
        return cfg if self.writes else dataclasses.replace(cfg, tensorboard=False, plots=False)

    def by_writer(self, action: Callable[[], T]) -> T:
        """Run `action` (a write, a decision from what is on disk) in the writing process; every process gets its result."""
        if self.shared is None:
            return action()
        return self.shared.share(action() if self.writes else None)

    def elapsed(self) -> float:
        """Wall seconds of this run, earlier interrupted parts included."""
        return self._earlier_seconds + time.perf_counter() - self._started

    def finish(self, summary: S) -> S:
        if not self.writes:
            return summary
        write_json(self.run.file("summary.json"), summary.to_dict())
        self.run.finish()
        return summary

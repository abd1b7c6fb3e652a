"""Fault injection for reliability tests: a testing hook, off unless FWSWEEP_FAULT is set.

Ray workers cannot import test modules, so the hook lives in the package. The trainable and a
comparison's seed runs wrap their reporter with `wrap(reporter)`; with FWSWEEP_FAULT unset that returns
the reporter unchanged.

FWSWEEP_FAULT holds directives separated by ';', each `KIND[@EPOCH][xTIMES][=VALUE]`:

- `raise@2`    the trial raises RuntimeError when it reports epoch 2 (before that epoch's checkpoint
               is kept, so a retry restarts from the epoch-1 checkpoint)
- `nan@2`      the trial reports a non-finite train_loss with `diverged: 1` at epoch 2 and raises
               TrialDiverged, as `run_trial` does when the loss becomes NaN/inf
- `crash@2`    the worker process dies at epoch 2 (os._exit, like an OOM kill or a segfault)
- `slow=1.5`   every report waits 1.5 s more (keeps a sweep running long enough to interrupt it)
- `hold@16`    the report of epoch 16 waits while the file `hold` exists in FWSWEEP_FAULT_STATE: a test
               keeps trials from finishing until it has done what must happen while they run (however
               loaded the machine), then deletes the file
- `interrupt@3` the driver sends itself SIGINT (as Ctrl-C) the moment Tune has logged a trial's epoch-3
               result, before Tune's state records that result's checkpoint or the trial's end: the
               narrowest window an interrupt can hit (see `DriverFaults`)

`xTIMES` fires the fault at most TIMES times across the whole sweep (all workers on this machine count
together through marker files in FWSWEEP_FAULT_STATE, a folder), so `raise@2x1` fails exactly one trial
once and lets its retry succeed. Without `xTIMES` the fault fires every time its epoch is reported.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from sweep.errors import TrialDiverged
from sweep.reporter import Reporter

ENV = "FWSWEEP_FAULT"
STATE_ENV = "FWSWEEP_FAULT_STATE"

_DIRECTIVE = re.compile(r"^(raise|nan|crash|slow|hold|interrupt)(?:@(\d+))?(?:x(\d+))?(?:=([0-9.]+))?$")


class InjectedFault(RuntimeError):
    """The failure a `raise` directive throws; its message says it was injected on purpose."""


@dataclass(frozen=True)
class Fault:
    kind: str
    epoch: int | None = None
    times: int | None = None
    value: float = 0.0


def parse(text: str) -> list[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        match = _DIRECTIVE.match(part)
        if not match:
            raise ValueError(f"{ENV}: cannot parse {part!r}; write KIND[@EPOCH][xTIMES][=VALUE]")
        kind, epoch, times, value = match.groups()
        faults.append(Fault(kind, int(epoch) if epoch else None, int(times) if times else None,
                            float(value) if value else 0.0))
    return faults


HOLD_FILE = "hold"  # in the state folder: `hold` directives wait while it exists


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or "fwsweep-faults")


def _claim(fault: Fault) -> bool:
    """True if this firing is within the fault's budget (markers created atomically, so races are safe)."""
    if fault.times is None:
        return True
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    for i in range(fault.times):
        try:
            fd = os.open(state / f"{fault.kind}-{fault.epoch}-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return True
    return False


class FaultyReporter:
    """Passes reports through, failing as the directives say."""

    def __init__(self, inner: Reporter, faults: list[Fault]) -> None:
        self.inner = inner
        self.faults = faults

    def restore_dir(self) -> Path | None:
        return self.inner.restore_dir()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        epoch = metrics.get("epoch")
        for fault in self.faults:
            if fault.kind == "interrupt":
                continue  # the driver's (DriverFaults)
            if fault.kind == "slow":
                time.sleep(fault.value)
                continue
            if fault.epoch is not None and epoch != fault.epoch:
                continue
            if not _claim(fault):
                continue
            if fault.kind == "raise":
                raise InjectedFault(f"fault injected on purpose by {ENV} at epoch {epoch}")
            if fault.kind == "crash":
                os._exit(3)
            if fault.kind == "hold":
                while (state_dir() / HOLD_FILE).exists():
                    time.sleep(0.2)
            if fault.kind == "nan":
                self.inner.report({**metrics, "train_loss": math.nan, "diverged": 1}, None)
                raise TrialDiverged(f"loss became nan at epoch {epoch} (injected by {ENV})")
        self.inner.report(metrics, checkpoint_dir)


def wrap(reporter: Reporter) -> Reporter:
    """The reporter itself unless FWSWEEP_FAULT asks for faults."""
    text = os.environ.get(ENV, "")
    return FaultyReporter(reporter, parse(text)) if text.strip() else reporter


class DriverFaults(Callback):
    """The driver's directives (`interrupt`), read from this process's FWSWEEP_FAULT when a result comes
    in, so a later session (a resume, which unpickles this callback) without the variable is unaffected."""

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        for fault in parse(os.environ.get(ENV, "")):
            if fault.kind == "interrupt" and fault.epoch in (None, result.get("epoch")) and _claim(fault):
                os.kill(os.getpid(), signal.SIGINT)


def driver_callbacks() -> list[Callback]:
    """[DriverFaults()] when FWSWEEP_FAULT asks for a driver fault, else nothing."""
    wanted = any(f.kind == "interrupt" for f in parse(os.environ.get(ENV, "")))
    return [DriverFaults()] if wanted else []

"""Tune callbacks that belong to this process (a terminal view, an MLflow writer thread).

Tune pickles its RunConfig, callbacks included, into the experiment folder, and `Tuner.restore` brings
them back. A `LiveCallback` pickles as a reference instead: (its kind, the sweep's name). Unpickled in a
session that registered one of that kind for the sweep (the runner creates them before it restores), it
*is* that session's object, so the runner keeps its own handles and swaps nothing into Tune (no private
Tune API); anywhere else it becomes a callback that does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ray.tune import Callback

_LIVE: dict[tuple[str, str], Callback] = {}


def restored(kind: str, sweep: str) -> Callback:
    """What a pickled LiveCallback becomes: this session's callback of that kind, else a no-op one."""
    return _LIVE.get((kind, sweep)) or Callback()


class LiveCallback(Callback):
    """Registers itself for `sweep` on creation; pickles as a reference to the registered one."""

    def __init__(self, sweep: str) -> None:
        self.live_sweep = sweep
        _LIVE[(type(self).__qualname__, sweep)] = self

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return restored, (type(self).__qualname__, self.live_sweep)


def unregister(callbacks: Iterable[Any]) -> None:
    """Forget these callbacks (the session is over)."""
    for cb in callbacks:
        key = (type(cb).__qualname__, getattr(cb, "live_sweep", None))
        if _LIVE.get(key) is cb:
            del _LIVE[key]

"""SIGTERM and SIGHUP stop any command the way Ctrl-C does.

A batch scheduler or `kill` sends SIGTERM, a closed terminal SIGHUP. Left to their default, both ended the
process on the spot: `sweep train` saved nothing and left its MLflow run RUNNING, `sweep ui` left the
local MLflow server running with no command to stop it. Here each is passed to whatever handles Ctrl-C at
that moment (Tune's orderly stop in `sweep run`, `sweep train`'s save-after-this-step, Python's
KeyboardInterrupt elsewhere), and the exit code says which signal came (128 + its number: 143, 129).
A signal the shell told the command to ignore (`nohup`: SIGHUP) stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from types import FrameType

STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []


def stop_like_ctrl_c() -> None:
    """Install the handlers (main thread, once per process: the CLI's entry point)."""
    for signum in STOPPING_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _as_ctrl_c)


def _as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if signum == signal.SIGHUP:
        _leave_the_terminal()
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a non-interactive shell): stop all the same
        raise KeyboardInterrupt


def _leave_the_terminal() -> None:
    """After a hang-up every write to the terminal fails (EIO), and the orderly stop, which prints, would
    end half-way (seen: the thread that ends a sweep whose local Ray the same hang-up stopped died on its
    message, and the driver waited a minute on the dead GCS). Output that went to the terminal goes to
    /dev/null from here on; output to a file or a pipe is kept."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if stat.S_ISCHR(os.fstat(fd).st_mode):  # a terminal (fstat works on a hung-up one)
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def interrupted_exit_code() -> int:
    """130 after Ctrl-C; 128 + the signal's number after SIGTERM or SIGHUP."""
    return 128 + (_received[-1] if _received else signal.SIGINT)

"""A Tune callback that stops a sweep as soon as its local storage folder cannot be written.

A read-only remount or a full disk would otherwise fail every trial on its next checkpoint (a traceback
each) and record them all as errors. Raising from Tune's loop ends the driver like a crash instead: Tune's
last saved state keeps those trials running, so `sweep resume` continues them once the disk is fixed, and
`sweep.runner.storage_faults` turns the error into one message.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import time
from typing import Any

from ray.tune import Callback

DISK_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}
TUNE_TRIAL_LOGGER = "ray.tune.execution.tune_controller"  # logs a failed trial's traceback
TUNE_STATE_LOGGER = "ray.tune.execution.experiment_state"  # logs a failed upload of Tune's own state
TUNE_TEMP_FILE = re.compile(r"/\.[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-tmp-")  # .<uuid>-tmp-<name>


def disk_error(err: BaseException | None) -> OSError | None:
    """The disk error (read-only, full, no permission) behind `err`, if any: Tune and Ray wrap what a
    storage write raises (TuneError from it, RayTaskError copies a worker's), so the chain is searched."""
    for _ in range(20):
        if err is None:
            return None
        if isinstance(err, OSError) and (err.errno in DISK_ERRNOS or any(
                os.strerror(code) in str(err) for code in DISK_ERRNOS)):
            return err
        err = err.__cause__ or err.__context__
    return None


class _HushDiskTracebacks(logging.Filter):
    """Drops Tune's traceback of a trial that failed on a disk error: the sweep ends with one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and disk_error(record.exc_info[1]))


class _OneLineStateSyncRace(logging.Filter):
    """Tune (2.60, experiment_state.py) writes its next state snapshot into the staging folder before it
    waits for the background upload of the previous one, so that upload can find one of the snapshot's
    temp files (`.<uuid>-tmp-<name>`, Tune's `_atomic_save`) renamed under it. Tune logs an error with a
    traceback; the next upload carries the state (seen once in 40 sweeps). That case becomes one line;
    others pass as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, FileNotFoundError) and TUNE_TEMP_FILE.search(str(err)):
            record.msg = ("Tune's upload of the sweep state raced with its next snapshot (a temp file was "
                          "renamed while it was copied); the next upload carries the state")
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


STATE_SYNC_RACE = _OneLineStateSyncRace()


def hush_state_sync_race() -> None:
    logging.getLogger(TUNE_STATE_LOGGER).addFilter(STATE_SYNC_RACE)  # once: a filter is added once


class StorageWatch(Callback):
    """Probe `folder` (a temp file created and removed) every `every_s` seconds and after a trial error."""

    def __init__(self, folder: str, every_s: float = 2.0) -> None:
        self.folder, self.every_s, self._next = folder, every_s, 0.0

    def _probe(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self.every_s
        if os.path.isdir(self.folder):  # (Tune creates it)
            tempfile.TemporaryFile(dir=self.folder, prefix=".fwsweep-probe-").close()  # OSError: stop

    def setup(self, **info: Any) -> None:
        logging.getLogger(TUNE_TRIAL_LOGGER).addFilter(_HushDiskTracebacks())

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._probe()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._probe(force=True)

"""A Tune callback that stops a sweep as soon as its storage cannot be written: a local folder turned
read-only or full, or an object store that stops answering (or refuses).

Otherwise every trial would fail on its next checkpoint upload (a traceback each), Tune's state uploads
would log theirs, and all of them would be recorded as errors. Raising from Tune's loop ends the driver
like a crash instead: Tune's last saved state keeps those trials running, so `sweep resume` continues them
once the storage is back, and `sweep.runner.storage_faults` turns the error into one message.

A local folder is probed every 2 s (a temp file, no network); an object store only after a trial error
and after Tune logs a failed upload of its own (a write and a delete each; nothing on the event loop's
way while the store is well).
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

from sweep import paths
from sweep.errors import in_chain

DISK_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}
# What pyarrow's S3 and GCS filesystems raise (OSError without an errno): "AWS Error NETWORK_CONNECTION
# during HeadObject operation: ...", "google::cloud::Status(UNAVAILABLE: ...)"
OBJECT_STORE_ERROR = re.compile(r"AWS Error [A-Z_]+|google::cloud::Status\(")
TUNE_TRIAL_LOGGER = "ray.tune.execution.tune_controller"  # logs a failed trial's traceback
TUNE_STATE_LOGGER = "ray.tune.execution.experiment_state"  # logs a failed upload of Tune's own state
TUNE_UPLOAD_LOGGERS = ("ray.train._internal.syncer", "ray.train._internal.storage")  # its upload thread
TUNE_TEMP_FILE = re.compile(r"/\.[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-tmp-")  # .<uuid>-tmp-<name>
SLOW_UPLOAD_MESSAGE = re.compile(  # Tune's (experiment_state.py) while an upload of its state takes > 30 s
    r"Saving the experiment state .*?(?:has already taken |took ~)([\d.]+) seconds")


def _is_storage_error(err: BaseException) -> bool:
    if not isinstance(err, OSError):
        return False
    text = str(err)
    return err.errno in DISK_ERRNOS or bool(OBJECT_STORE_ERROR.search(text)) or any(
        os.strerror(code) in text for code in DISK_ERRNOS)


def storage_error(err: BaseException | None) -> OSError | None:
    """The storage error (read-only, full, no permission; an object store that fails) behind `err`, if
    any (the chain is searched: Tune and Ray wrap what a storage write raises)."""
    return in_chain(err, _is_storage_error)  # type: ignore[return-value]


class _HushStorageTracebacks(logging.Filter):
    """Drops Tune's tracebacks of what failed on a storage error (a trial, an upload of its state) and
    asks the watch for a probe: the sweep ends with one message, or goes on if the storage is well."""

    watch: StorageWatch | None = None  # the running sweep's (one sweep runs at a time in a process)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.watch is None:  # no sweep running: every message as Tune logged it
            return True
        failed = (record.exc_info and storage_error(record.exc_info[1])) or (
            record.exc_info is None and OBJECT_STORE_ERROR.search(record.getMessage()))
        if failed:
            self.watch.suspect = True
        return not failed


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


class _SlowStateUpload(logging.Filter):
    """Tune warns every 2 s, in four lines, while an upload of its state has taken over 30 s (a slow or
    unresponsive object store; it suggests s3fs and a variable). That becomes one line at most every
    `every_s` seconds: the sweep waits for it, and an upload that fails ends the sweep (StorageWatch)."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s, self._last = every_s, float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() if record.exc_info is None else ""
        taken = SLOW_UPLOAD_MESSAGE.match(text)
        if taken is None:
            return True
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        record.msg = (f"the sweep's storage has taken {float(taken.group(1)):.0f} s so far to save Tune's "
                      "state (slow or not answering); the sweep goes on when it answers")
        record.args = ()
        return True


STATE_SYNC_RACE = _OneLineStateSyncRace()
SLOW_STATE_UPLOAD = _SlowStateUpload()
STORAGE_TRACEBACKS = _HushStorageTracebacks()


def hush_state_upload_messages() -> None:
    """Tune's messages about uploads of its state, in fewer words (filters are added once)."""
    for hush in (STATE_SYNC_RACE, SLOW_STATE_UPLOAD):
        logging.getLogger(TUNE_STATE_LOGGER).addFilter(hush)


class StorageWatch(Callback):
    """Probe the sweep's storage: a local `folder` (a temp file created and removed) every `every_s`
    seconds and after a trial error; an object store (`uri`) after a trial error or a failed upload."""

    uri: str | None = None  # (class defaults: a watch pickled by an older fwsweep has only `folder`)
    suspect = False  # a failed upload was logged: probe at the next step

    def __init__(self, folder: str | None = None, uri: str | None = None, every_s: float = 2.0) -> None:
        self.folder, self.uri, self.every_s, self._next = folder, uri, every_s, 0.0

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the Tuner
        return {"folder": self.folder, "uri": self.uri, "every_s": self.every_s, "_next": 0.0,
                "suspect": False}

    def _probe(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.uri is not None:
            if force or self.suspect:
                from sweep.store import open_storage

                self.suspect = False
                open_storage(self.uri).write_probe()  # the store's OSError, with its words, ends the sweep
            return
        if not force and now < self._next:
            return
        self._next = now + self.every_s
        if self.folder and os.path.isdir(self.folder):  # (Tune creates it)
            tempfile.TemporaryFile(dir=self.folder, prefix=f"{paths.PROBE}-").close()  # OSError: stop

    def setup(self, **info: Any) -> None:
        STORAGE_TRACEBACKS.watch = self
        for name in (TUNE_TRIAL_LOGGER, TUNE_STATE_LOGGER, *TUNE_UPLOAD_LOGGERS):
            logging.getLogger(name).addFilter(STORAGE_TRACEBACKS)  # once: a filter is added once

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._probe()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        STORAGE_TRACEBACKS.watch = None

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._probe(force=True)

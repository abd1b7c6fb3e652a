"""result.json, Tune's per-trial record of every result, kept whole across a killed driver.

Tune writes result.json in the driver's staging folder and uploads it with its experiment state. On a
restore, its JsonLoggerCallback fetches the uploaded file back only for trials whose restored state holds
a checkpoint. But Tune snapshots its state apart from the results it logs: a driver killed between a
trial's result (logged, uploaded) and its checkpoint's registration restores that trial with no
checkpoint and an empty staging file, whose next upload replaces the rows already recorded. fwsweep's
resume does not re-report those epochs (sweep.runner.recorded_progress), so they were lost for good:
seen once as a trial whose records read epochs [2, 3].

ResultLog fetches the uploaded file for such a trial too, before Tune opens it, so the rows of the
earlier session stay and the new ones follow them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray.tune.logger import JsonLoggerCallback
from ray.tune.result import EXPR_RESULT_FILE

log = logging.getLogger(__name__)


class ResultLog(JsonLoggerCallback):
    def log_trial_start(self, trial: Any) -> None:
        if trial.checkpoint is None:  # else Tune fetches the file itself
            _fetch_recorded_rows(trial)
        super().log_trial_start(trial)


def _fetch_recorded_rows(trial: Any) -> None:
    """Copy the trial's uploaded result.json into its (empty or missing) staging file."""
    trial.init_local_path()
    local = Path(trial.local_path, EXPR_RESULT_FILE)
    if local.exists() and local.stat().st_size:
        return
    remote = Path(trial.storage.trial_fs_path, EXPR_RESULT_FILE).as_posix()
    fs = trial.storage.storage_filesystem
    if fs.get_file_info(remote).type != pyarrow.fs.FileType.File:
        return  # a trial that never reported: nothing to keep
    pyarrow.fs.copy_files(remote, local.as_posix(), source_filesystem=fs)
    log.info("kept the %s result row(s) trial %s logged before the restore",
             sum(1 for line in local.read_text().splitlines() if line.strip()), trial.trial_id)

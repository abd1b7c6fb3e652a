"""The checkpoint a resumed trial starts from, when Tune deleted the one its saved state names.

Tune keeps a trial's newest `keep_checkpoints` and deletes an older one the moment it registers a new one,
but saves the experiment state that names each trial's newest checkpoint on a timer and uploads it in the
background. A driver killed between the two leaves a state naming a checkpoint that is gone, next to a
newer one that Tune never wrote down; Tune's restore then fails the trial ("Could not recover from
checkpoint"). Before a resume restores anything, such a trial's newest whole checkpoint is copied to the
name the state holds (the trainable reads the epoch it holds from meta.json and goes on from there; the
epochs the sweep's records already hold are not reported again, those they lack are, from the
checkpoint's history), and the newer folders are removed, so
the trial's folder holds just the checkpoints Tune knows, as it would have without the kill.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from sweep.checkpoint import CONFIG_FILE, META_FILE, STATE_FILE
from sweep.store import SweepStore, TrialRecord

_TUNE_CHECKPOINT = re.compile(r"checkpoint_(\d+)$")  # Tune's checkpoint folders: checkpoint_000003
_FILES = (STATE_FILE, CONFIG_FILE, META_FILE)  # copied in this order: meta.json, last, ends a whole copy


@dataclass(frozen=True)
class Restored:
    trial_id: str
    named: str  # the checkpoint Tune's state names (relative to the sweep's folder)
    source: str  # the newer one copied there (its base name)

    def message(self) -> str:
        return (f"trial {self.trial_id}: Tune's saved state names {posixpath.basename(self.named)}, deleted "
                f"after that state was saved; resuming from the newer {self.source}")


def _index(path: str) -> int | None:
    match = _TUNE_CHECKPOINT.match(posixpath.basename(path.rstrip("/")))
    return int(match.group(1)) if match else None


def _is_whole(fs: pafs.FileSystem, folder: str) -> bool:
    infos = fs.get_file_info([posixpath.join(folder, f) for f in _FILES])
    return all(i.type == pafs.FileType.File and i.size for i in infos)


def restore_named_checkpoints(store: SweepStore, records: list[TrialRecord]) -> list[Restored]:
    """For each unfinished trial whose named checkpoint is gone (or cut short) while a newer whole one is
    on storage: the newest whole one copied to the named one's place, the newer folders removed."""
    fs = store.storage.fs
    restored = []
    for record in records:
        if record.status == "TERMINATED" or not record.checkpoint:
            continue
        named = store.fs_path(record.checkpoint)
        base = _index(named)
        if base is None or _is_whole(fs, named):
            continue
        trial_folder = posixpath.dirname(named)
        newer = sorted(((i, info.path) for info in fs.get_file_info(pafs.FileSelector(trial_folder))
                        if info.type == pafs.FileType.Directory
                        and (i := _index(info.path)) is not None and i > base), reverse=True)
        source = next((path for _, path in newer if _is_whole(fs, path)), None)
        if source is None:
            continue  # nothing to go on from: Tune's restore names the missing checkpoint
        fs.create_dir(named, recursive=True)
        for name in _FILES:
            fs.copy_file(posixpath.join(source, name), posixpath.join(named, name))
        for _, path in newer:
            fs.delete_dir(path)
        restored.append(Restored(record.trial_id, record.checkpoint, posixpath.basename(source)))
    return restored

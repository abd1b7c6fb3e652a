"""Where a sweep's state lives and how to read and write it: a local folder or object storage (s3://, gs://).

The ONE module that knows a sweep's layout. Every command that touches a sweep (run, resume, show, export,
list, report, compare) opens it through here, so a sweep started on one machine reads the same from any
other that can reach its storage. Files go through pyarrow.fs (the filesystems Ray Tune itself uses):

    <storage>/                       --storage / spec storage: / $FWSWEEP_STORAGE; else $FWSWEEP_HOME/sweeps
      <name>/                        Ray Tune's experiment folder (RunConfig storage_path + name)
        sweep_spec.yaml              the spec the sweep was started with (resume and every reader use it)
        experiment_state-*.json      Tune's experiment state; tuner.pkl, searcher state (Optuna study)
        trial_<id>/result.json       one JSON line per epoch; checkpoint_*/ the trial's checkpoints
        trial_<id>/error.txt         why a trial failed
        exports/                     best.yaml, top<i>.yaml, best_<model>.yaml, index.json (`sweep export`)
        comparison.json              `sweep compare`: the manifest; seed_runs.jsonl its finished seed runs

Credentials are never part of the location: S3 reads them from the environment / AWS config (the standard
chain), and an S3-compatible store (MinIO, Ceph, moto) is reached through $FWSWEEP_S3_ENDPOINT (or the
standard $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from sweep import events, paths
from sweep.config import SweepSpec, TrialConfig, dump_yaml, load_saved_spec
from sweep.errors import Problem, UserError
from sweep.space import MODEL_KEY, trial_config

T = TypeVar("T")

if TYPE_CHECKING:
    import pyarrow.fs

STORAGE_ENV = "FWSWEEP_STORAGE"
ENDPOINT_ENVS = ("FWSWEEP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
SPEC_FILE = "sweep_spec.yaml"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
EXPORT_DIR = "exports"
EXPERIMENT_STATE_GLOB = "experiment_state-"
# A reader of the experiment state while a driver replaces it (in object storage, a read in ranges that
# straddles an upload) can get a torn copy: it is read again after these pauses before it counts as damaged.
STATE_REREAD_S = (0.5, 1.0, 2.0)
PICKLED_STATE = ("tuner.pkl", "searcher-state-")  # Tune's pickles a resume unpickles (exact name, prefix)
STORAGE_FIX = ("give --storage (or the spec's storage:, or $FWSWEEP_STORAGE) a writable folder or "
               "s3://BUCKET/PREFIX")
READ_FIX = ("give --storage (or the spec's storage:, or $FWSWEEP_STORAGE) the folder or s3://BUCKET/PREFIX "
            "the sweeps were run with")
OBJECT_STORES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # URI schemes sweeps may live in
GCS_RETRY_S = 20  # pyarrow's GCS client retries for 15 minutes by default, deaf to Ctrl-C meanwhile


def storage_setting(given: str | None = None) -> str:
    """Where sweeps live, as the user would write it: the given value, else $FWSWEEP_STORAGE, else local."""
    return given or os.environ.get(STORAGE_ENV) or str(paths.sweeps_dir())


def is_uri(location: str) -> bool:
    """s3://, gs://, file://...; a Windows drive letter or a plain path is not."""
    scheme = urlparse(location).scheme
    return len(scheme) > 1


# ---------------------------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class Storage:
    """The place that holds every sweep: a pyarrow filesystem and the root path inside it."""

    uri: str  # as shown to people: /abs/folder or s3://bucket/prefix
    fs: pyarrow.fs.FileSystem
    root: str  # the same place as a path inside `fs` (bucket/prefix for S3)

    @property
    def remote(self) -> bool:
        import pyarrow.fs as pafs

        return not isinstance(self.fs, pafs.LocalFileSystem)

    def sweep(self, name: str) -> SweepStore:
        return SweepStore(self, name)

    def sweep_names(self) -> list[str]:
        """Every sweep in this storage (a folder holding a sweep_spec.yaml), sorted."""
        import pyarrow.fs as pafs

        try:
            entries = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as err:
            raise _storage_error(self.uri, err, reading=True) from None
        dirs = [e.base_name for e in entries if e.type == pafs.FileType.Directory]
        specs = self.fs.get_file_info([posixpath.join(self.root, d, SPEC_FILE) for d in dirs]) if dirs else []
        return sorted(d for d, info in zip(dirs, specs, strict=True) if info.type == pafs.FileType.File)

    def check(self) -> None:
        """Write and delete a probe object: an unreachable endpoint, missing credentials or bucket, or a
        read-only folder fails here with one message, before any trial starts."""
        if not self.remote:
            paths.check_writable_folder(Path(self.root), "--storage", STORAGE_FIX)
            return
        if self.fs.type_name == "s3":
            _check_s3_credentials(self.uri)
        try:
            self.write_probe()
        except OSError as err:
            raise _storage_error(self.uri, err) from None

    def write_probe(self) -> None:
        """Write and delete a small object at the root; the store's own OSError if it cannot."""
        probe = posixpath.join(self.root, f"{paths.PROBE}-{secrets.token_hex(4)}")
        with self.fs.open_output_stream(probe) as out:
            out.write(b"probe")
        self.fs.delete_file(probe)


def open_storage(given: str | None = None) -> Storage:
    """The storage at `given` (or $FWSWEEP_STORAGE, or $FWSWEEP_HOME/sweeps); nothing is contacted yet."""
    location = storage_setting(given)
    if not is_uri(location) or location.startswith("file://"):
        import pyarrow.fs as pafs

        folder = Path(location.removeprefix("file://")).expanduser().absolute()
        return Storage(str(folder), pafs.LocalFileSystem(), folder.as_posix())
    parsed = urlparse(location)
    uri = location.rstrip("/")
    store = OBJECT_STORES.get(parsed.scheme.lower())
    if store is None:  # others pyarrow knows (hdfs, abfs, ...) are untested here, and may hang or crash
        raise UserError(Problem("--storage", f"{parsed.scheme}:// is not a storage sweeps can live in",
                                "use s3://BUCKET/PREFIX (any S3-compatible store), gs://BUCKET/PREFIX or a "
                                "folder every node shares"))
    if not parsed.netloc:
        raise UserError(Problem("--storage", f"{location!r} names no bucket",
                                f"write it as {parsed.scheme}://BUCKET/PREFIX"))
    fs = _s3_filesystem() if store == "s3" else _gcs_filesystem()
    return Storage(uri, fs, f"{parsed.netloc}{parsed.path}".rstrip("/"))


def _endpoint_setting() -> tuple[str, str] | None:
    """(the variable, its value) of the first endpoint variable set, in ENDPOINT_ENVS' order."""
    return next(((k, os.environ[k]) for k in ENDPOINT_ENVS if os.environ.get(k)), None)


def _s3_filesystem() -> pyarrow.fs.FileSystem:
    """pyarrow's S3 filesystem; credentials resolved by the AWS SDK on each process (never pickled, so each
    Ray worker uses its own role or environment), the endpoint from $FWSWEEP_S3_ENDPOINT when given."""
    import pyarrow.fs as pafs

    options: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
                               "connect_timeout": 5, "request_timeout": 30}
    setting = _endpoint_setting()
    if setting:
        name, endpoint = setting
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        try:
            parsed.port  # noqa: B018  (raises on a port that is not a number)
            valid = bool(parsed.hostname) and parsed.scheme in ("http", "https")
        except ValueError:
            valid = False
        if not valid:
            raise UserError(Problem(name, f"{endpoint!r} is not an endpoint", "give HOST:PORT, or "
                                    "http://HOST:PORT for a plain-HTTP store (https://HOST:PORT otherwise)"))
        options |= {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https",
                    "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                    or "us-east-1"}
    return pafs.S3FileSystem(**options)


def _gcs_filesystem() -> pyarrow.fs.FileSystem:
    """pyarrow's GCS filesystem (credentials: Google's default chain on each process), its retries bounded
    so that a missing credential or an unreachable endpoint is an error in seconds, not a hang."""
    import pyarrow.fs as pafs

    return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=GCS_RETRY_S))


def _check_s3_credentials(uri: str) -> None:
    """The AWS SDK's own credential chain (env, profile, SSO, web identity, instance role), via botocore."""
    try:
        import botocore.session
    except ImportError:  # the probe write below still fails with the server's own answer
        return
    if botocore.session.get_session().get_credentials() is None:
        raise UserError(Problem("AWS credentials", f"none found for {uri}",
                                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run on "
                                "a machine with an instance role); they are never given on the command line"))


def _storage_error(uri: str, err: OSError, reading: bool = False) -> UserError:
    """One message for a store's OSError; `reading`: what failed was a read (a listing, a file), so the
    message and fix speak of reading, not of a place to write."""
    text = str(err)
    setting = _endpoint_setting()  # (the variable that set it, the endpoint)
    endpoint = setting[1] if setting else None
    if "OAuth2 access token" in text:  # GCS: no usable Google credential
        return UserError(Problem("Google Cloud credentials", f"none usable for {uri}",
                                 "set GOOGLE_APPLICATION_CREDENTIALS to a service account's key file (or run "
                                 "`gcloud auth application-default login`, or on a machine with a service "
                                 "account); they are never given on the command line"))
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return UserError(Problem("--storage", f"the bucket of {uri} does not exist",
                                 "create it (e.g. `aws s3 mb s3://BUCKET`) or give an existing bucket"))
    # The network first: the message of an unreachable endpoint quotes its URL, whose port may hold '403'.
    if any(s in text.lower() for s in ("connect", "network", "resolve host", "timed out", "timeout")):
        where = f"endpoint {endpoint}" if endpoint else "its endpoint"
        return UserError(Problem(setting[0] if setting else "--storage",
                                 f"cannot reach {uri} at {where} ({text.splitlines()[0][:200]})",
                                 "start the object store or fix FWSWEEP_S3_ENDPOINT / AWS_ENDPOINT_URL "
                                 "(host:port, http:// for a plain-HTTP store)"))
    if any(s in text for s in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")) or \
            re.search(r"(?<![\d:])403(?!\d)", text):  # the HTTP status, not digits of a port or an id
        return UserError(Problem("AWS credentials", f"{uri} refused them ({text.splitlines()[0][:200]})",
                                 "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to keys that "
                                 f"may {'read' if reading else 'write'} there"))
    first = text.splitlines()[0][:300] if text else type(err).__name__
    if reading:
        return UserError(Problem("--storage", f"cannot read {uri}: {first}", READ_FIX))
    return UserError(Problem("--storage", f"cannot write to {uri}: {first}", STORAGE_FIX))


# ---------------------------------------------------------------------------------------------- trials


def trial_threads(spec: SweepSpec, trial: TrialConfig) -> int:
    """Torch CPU threads of a trial: the config's own value, else the CPUs Ray reserves for it."""
    return trial.train.num_threads or max(1, int(spec.resources.cpu))


@dataclass
class TrialRecord:
    trial_id: str
    model: str
    config: TrialConfig  # the trial's exact config, epochs = the epochs it ran (re-runnable by `sweep train`)
    metrics: dict[str, Any]  # the last report
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch
    status: str = "PENDING"  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    params: dict[str, Any] = field(default_factory=dict)  # the sampled Tune config
    path: str = ""  # the trial's folder in the sweep's storage (URI or local path)
    checkpoint: str = ""  # the newest checkpoint Tune's state names, relative to the sweep's folder
    started: bool = False  # its result.json exists: Tune started it (one still waiting has an empty folder)

    @property
    def epochs(self) -> int:
        return int(self.metrics.get("epoch", self.metrics.get("training_iteration", 0)) or 0)

    def value(self, metric: str) -> float | None:
        v = self.metrics.get(metric)
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    def state(self, max_epochs: int) -> str:
        """In users' words: done, stopped early, diverged, failed, running, pending, paused, interrupted."""
        return events.trial_state(self.status, self.metrics, max_epochs)

    def stopped_early(self, max_epochs: int) -> bool:
        """Stopped by the scheduler before max epochs (not by the target accuracy, not failed)."""
        return self.state(max_epochs) == events.STOPPED_EARLY

    @classmethod
    def of_trial(cls, spec: SweepSpec, trial_id: str, params: dict[str, Any], metrics: dict[str, Any],
                 history: list[dict[str, Any]] | None = None, status: str = "PENDING", path: str = ""
                 ) -> TrialRecord:
        """A trial as Tune has it (sampled config, last report): its config re-runnable by `sweep train`,
        with the threads it had and the epochs it ran."""
        tc = trial_config(spec, params)
        epochs = int(metrics.get("epoch", metrics.get("training_iteration", 0)) or 0)
        train = {"num_threads": trial_threads(spec, tc)} | ({"epochs": epochs} if epochs else {})
        tc = tc.model_copy(update={"train": tc.train.model_copy(update=train)})
        return cls(trial_id=trial_id, model=params.get(MODEL_KEY, tc.model.name), config=tc, metrics=metrics,
                   history=list(history or []), status=status, params=params, path=path)


def parse_history(text: str) -> list[dict[str, Any]]:
    """result.json's lines, one per epoch. A line cut short by a kill ends it (everything before it is
    valid); an epoch reported again (a trial re-run from an earlier checkpoint after its driver died)
    replaces the rows from that epoch on, so the history is the one path that led to the trial's end."""
    rows: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        while rows and _epoch_of(rows[-1]) >= _epoch_of(row) > 0:
            rows.pop()
        rows.append(row)
    return rows


def _epoch_of(row: dict[str, Any]) -> int:
    return int(row.get("epoch", row.get("training_iteration", 0)) or 0)


def hush_missing_results() -> None:
    """Trials that never reported have no result.json: Tune's ExperimentAnalysis warns about each (in
    load_trials, and when Tuner.fit builds its ResultGrid after a Ctrl-C); for a sweep they are pending,
    and their histories are read from result.json directly."""
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------- one sweep


@dataclass(frozen=True)
class SweepStore:
    """One sweep's folder in a Storage: its spec, Tune's state, trials, exports and manifests."""

    storage: Storage
    name: str

    @property
    def path(self) -> str:
        """The folder as a path inside storage.fs (what Tune's storage_filesystem APIs take)."""
        return posixpath.join(self.storage.root, self.name)

    @property
    def uri(self) -> str:
        """The folder as people (and `--storage` on another machine) name it."""
        return f"{self.storage.uri.rstrip('/')}/{self.name}"

    def local_path(self) -> Path | None:
        """The folder on this machine's disk, or None in object storage."""
        return None if self.storage.remote else Path(self.path)

    def fs_path(self, rel: str) -> str:
        """`rel` (relative to the sweep's folder) as a path on the storage's filesystem."""
        return posixpath.join(self.path, rel)

    def where(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    # -- files ------------------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        try:
            return self.storage.fs.get_file_info(self.fs_path(rel)).type != pafs.FileType.NotFound
        except OSError as err:
            raise _storage_error(self.storage.uri, err, reading=True) from None

    def read_text(self, rel: str) -> str | None:
        """A file's text, or None if it is not there."""
        try:
            with self.storage.fs.open_input_stream(self.fs_path(rel)) as f:
                raw = f.read()
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(Problem(self.where(rel), f"is damaged: not UTF-8 text (byte {err.start} of "
                                    f"{len(raw)} is {raw[err.start]:#04x})",
                                    "restore it from a copy (nothing was changed)")) from None
        except FileNotFoundError:
            return None
        except OSError as err:
            if "not found" in str(err).lower() or "NoSuchKey" in str(err):
                return None
            raise _storage_error(self.storage.uri, err, reading=True) from None

    def write_text(self, rel: str, text: str) -> str:
        """Write a whole file: an object is replaced in one put; a local file via a temp file and rename, so
        no reader ever sees half of it. Returns where it went."""
        target = self.fs_path(rel)
        local = self.local_path()
        if local is not None:
            path = local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
            return str(path)
        try:
            with self.storage.fs.open_output_stream(target) as out:
                out.write(text.encode("utf-8"))
        except OSError as err:
            raise _storage_error(self.storage.uri, err) from None
        return self.where(rel)

    def upload(self, local_dir: Path, rel: str) -> None:
        """Copy a local folder's files into this sweep's folder (a no-op when they are already there)."""
        import pyarrow.fs as pafs

        dest = self.fs_path(rel)
        if not self.storage.remote and Path(dest).resolve() == local_dir.resolve():
            return
        pafs.copy_files(str(local_dir), dest, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.storage.fs)

    def _experiment_states(self, infos: list[pyarrow.fs.FileInfo] | None = None) -> list[tuple[float, str]]:
        """(mtime, file name) of each experiment state Tune saved here, oldest first (from `infos`, a
        listing of the sweep's folder already made, else from a new one)."""
        import pyarrow.fs as pafs

        if infos is None:
            try:
                infos = self.storage.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
            except OSError:
                return []
        return sorted((i.mtime.timestamp(), i.base_name) for i in infos
                      if i.base_name.startswith(EXPERIMENT_STATE_GLOB) and i.mtime is not None)

    def check_resumable(self, spec: SweepSpec) -> None:
        """Before a resume starts anything: every file of Tune's state it will read parses, or a UserError
        names the damaged one. The pickles are only walked (pickletools), never loaded."""
        import pickletools

        import pyarrow.fs as pafs

        try:
            infos = self.storage.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as err:
            raise _storage_error(self.storage.uri, err, reading=True) from None
        states = self._experiment_states(infos)
        if states:  # the trials' result.json are read (and checked) as the resume reads its progress
            self._read_state(lambda: json.loads(self.read_text(states[-1][1]) or ""))
        for info in infos:
            name = info.base_name
            if info.type != pafs.FileType.File or not (name == PICKLED_STATE[0] or (
                    name.startswith(PICKLED_STATE[1]) and name.endswith(".pkl"))):
                continue
            with self.storage.fs.open_input_stream(self.fs_path(name)) as f:
                raw = f.read()
            try:
                for _ in pickletools.genops(raw):
                    pass
            except Exception as err:  # noqa: BLE001  (genops raises ValueError, and others on garbage)
                raise self._damaged_state(name, err) from None

    def _read_state(self, read: Callable[[], T]) -> T | None:
        """read() of the experiment state; None when there is none yet. One that does not parse is read
        again after each pause of STATE_REREAD_S (a torn copy read during the driver's upload) before it
        is a UserError naming the newest state file."""
        for wait in (*STATE_REREAD_S, None):
            try:
                return read()
            except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSON and decoding errors too
                states = self._experiment_states()
                if not states:
                    return None
                if wait is None:
                    raise self._damaged_state(states[-1][1], err) from None
                time.sleep(wait)
        return None

    def _damaged_state(self, name: str, err: Exception) -> UserError:
        return UserError(Problem(self.where(name), f"Tune's state file is damaged ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:160] if str(err) else '-'})",
                                 f"restore it from a copy, or {self.how_to_remove()} to start over "
                                 "(nothing was changed)"))

    def state_mtime(self) -> float | None:
        """When Tune last saved the experiment state (seconds since the epoch), None if never."""
        states = self._experiment_states()
        return states[-1][0] if states else None

    # -- the spec -----------------------------------------------------------------------------------------

    def read_spec(self) -> SweepSpec | None:
        """The spec the sweep was started with, or None if there is no sweep here."""
        text = self.read_text(SPEC_FILE)
        if text is None:
            return None
        return load_saved_spec(text, self.where(SPEC_FILE), self.how_to_remove())

    def how_to_remove(self) -> str:
        """Words that tell a person how to delete this sweep (to start it over)."""
        local = self.local_path()
        return f"remove the sweep (rm -r {local})" if local is not None else f"delete {self.uri}"

    def load_spec(self) -> SweepSpec:
        spec = self.read_spec()
        if spec is None:
            raise UserError(Problem(self.name, f"no sweep named {self.name!r} in {self.storage.uri}",
                                    "see `sweep list` for the sweeps there (or give --storage / "
                                    f"${STORAGE_ENV} / FWSWEEP_HOME)"))
        return spec

    def write_spec(self, spec: SweepSpec) -> None:
        self.storage.fs.create_dir(self.path, recursive=True)
        self.write_text(SPEC_FILE, dump_yaml(spec.model_dump(mode="json")))

    # -- Tune's state -------------------------------------------------------------------------------------

    def can_restore(self) -> bool:
        from ray import tune

        return self.exists("") and tune.Tuner.can_restore(self.path, storage_filesystem=self.storage.fs)

    def load_trials(self, spec: SweepSpec | None = None) -> list[TrialRecord]:
        """Every trial Tune knows for this sweep, from its experiment state and each trial's result.json."""
        from ray.tune import ExperimentAnalysis

        spec = spec or self.load_spec()
        hush_missing_results()
        try:
            analysis = self._read_state(
                lambda: ExperimentAnalysis(self.path, storage_filesystem=self.storage.fs))
        except FileNotFoundError:
            return []
        if analysis is None:
            return []  # started, but interrupted before Tune saved any state
        records = []
        for trial in analysis.trials:
            rel = posixpath.relpath(trial.storage.trial_fs_path, self.path)
            log = self.read_text(posixpath.join(rel, RESULT_FILE))
            history = parse_history(log or "")
            metrics = dict(trial.last_result or {}) or (history[-1] if history else {})
            record = TrialRecord.of_trial(spec, trial.trial_id, dict(trial.config), metrics, history,
                                          trial.status, self.where(rel))
            record.started = log is not None
            if trial.checkpoint is not None:
                record.checkpoint = posixpath.join(rel, posixpath.basename(trial.checkpoint.path.rstrip("/")))
            records.append(record)
        return records

    # -- exports ------------------------------------------------------------------------------------------

    def export_index(self) -> dict[str, Any] | None:
        text = self.read_text(f"{EXPORT_DIR}/index.json")
        with contextlib.suppress(ValueError):
            return json.loads(text) if text else None
        return None


def open_sweep(name: str, storage: str | None = None) -> SweepStore:
    """Sweep `name` in the storage given (or $FWSWEEP_STORAGE, or $FWSWEEP_HOME/sweeps)."""
    return open_storage(storage).sweep(name)

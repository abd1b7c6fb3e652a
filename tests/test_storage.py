"""Sweep storage as a URI: one layout (sweep.store) in a local folder or in S3 (moto's server on loopback),
and bad storage settings refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures_s3 import CREDENTIALS, S3Store, s3_store  # noqa: F401  (real S3-compatible server)

from sweep.config import SweepSpec
from sweep.store import SPEC_FILE, open_storage, open_sweep
from sweep.tracking import free_port

ROOT = Path(__file__).resolve().parents[1]
SWEEP = Path(sys.executable).with_name("sweep")
SPEC = yaml.safe_load((ROOT / "search_spaces/tests/multinode.yaml").read_text())


@pytest.fixture
def s3_env(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> S3Store:  # noqa: F811
    for key, value in s3_store.env.items():
        monkeypatch.setenv(key, value)
    return s3_store


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_layout_for_a_folder_and_a_bucket(where: str, s3_env: S3Store, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    uri = str(tmp_path / "store") if where == "local" else s3_env.uri(f"layout-{where}")
    storage = open_storage(uri)
    assert storage.remote == (where == "s3")
    storage.check()
    spec = SweepSpec.model_validate(SPEC | {"name": "layout"})
    store = storage.sweep("layout")
    assert store.read_spec() is None and storage.sweep_names() == []
    store.write_spec(spec)
    store.write_text("exports/index.json", '{"exports": [{"file": "best.yaml"}]}')

    # Read back through a fresh handle, as another machine would.
    again = open_sweep("layout", uri)
    assert again.read_spec() == spec
    assert open_storage(uri).sweep_names() == ["layout"]
    assert again.export_index() == {"exports": [{"file": "best.yaml"}]}
    assert again.uri == f"{storage.uri}/layout"
    assert again.load_trials() == []  # no Tune state yet: nothing, not an error
    if where == "s3":
        assert sorted(s3_env.keys("layout-s3/")) == ["layout-s3/layout/exports/index.json",
                                                     f"layout-s3/layout/{SPEC_FILE}"]
    else:
        assert (tmp_path / "store" / "layout" / SPEC_FILE).is_file()
        assert not (tmp_path / "home").exists()  # an explicit storage leaves FWSWEEP_HOME alone


def test_storage_setting_order_flag_then_env_then_home(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FWSWEEP_STORAGE", raising=False)
    assert open_storage().uri == str(tmp_path / "home" / "sweeps")
    monkeypatch.setenv("FWSWEEP_STORAGE", "s3://from-env/p")
    assert open_storage().uri == "s3://from-env/p" and open_storage().root == "from-env/p"
    assert open_storage(str(tmp_path / "flag")).uri == str(tmp_path / "flag")


def _sweep_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FWSWEEP_", "RAY_", "MLFLOW_"))}
    return subprocess.run([str(SWEEP), *args], env=base | env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


BAD_STORAGE = {
    # id: (what changes in the environment, what the message must name)
    "unreachable endpoint": (lambda s3: s3.env | {"FWSWEEP_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
                             ["FWSWEEP_S3_ENDPOINT", "cannot reach"]),
    "missing credentials": (lambda s3: {k: v for k, v in s3.env.items()
                                        if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                            ["AWS credentials", "AWS_ACCESS_KEY_ID"]),
    "missing bucket": (lambda s3: s3.env, ["--storage", "does not exist", "create it"]),
}


@pytest.mark.parametrize("case", list(BAD_STORAGE))
def test_bad_storage_fails_before_anything_starts(case: str, s3_store: S3Store, tmp_path: Path) -> None:  # noqa: F811
    make_env, expected = BAD_STORAGE[case]
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    bucket = "no-such-bucket" if case == "missing bucket" else s3_store.bucket
    env = make_env(s3_store) | {"FWSWEEP_HOME": str(tmp_path / "home"), "HOME": str(tmp_path),
                                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    before = set(s3_store.keys())
    result = _sweep_cli(["run", str(spec_file), "--storage", f"s3://{bucket}/bad-{case.replace(' ', '-')}"],
                        env, tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out
    for text in expected:
        assert text.lower() in out.lower(), (text, out)
    assert set(s3_store.keys()) == before  # nothing written to the store
    assert not (tmp_path / "home").exists()  # no MLflow server, no local sweep folder
    assert "ray" not in {p.name for p in tmp_path.iterdir()}


def test_gcs_without_credentials_is_an_error_in_seconds_not_a_hang(tmp_path: Path) -> None:
    """pyarrow's GCS client retries for 15 minutes by default, and the process ignores SIGTERM meanwhile;
    sweeps bound its retries (store.GCS_RETRY_S), so no credential (and no network) is exit 2, named."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    env = {"FWSWEEP_HOME": str(tmp_path / "home"), "HOME": str(tmp_path),
           "GOOGLE_APPLICATION_CREDENTIALS": "", "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}
    start = time.monotonic()
    result = _sweep_cli(["run", str(spec_file), "--storage", "gs://fwsweep-no-such-bucket/x"], env, tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in out, out
    assert "Google Cloud credentials" in out and "GOOGLE_APPLICATION_CREDENTIALS" in out, out
    assert time.monotonic() - start < 90
    assert not (tmp_path / "home").exists()


def test_fwsweep_home_must_be_a_folder_not_a_uri(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    result = _sweep_cli(["run", str(spec_file)], {"FWSWEEP_HOME": "s3://bucket/home"}, tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "FWSWEEP_HOME" in out and "FWSWEEP_STORAGE" in out and "Traceback" not in out
    assert not (tmp_path / "s3:").exists()  # not mangled into a relative folder


def test_ray_client_addresses_are_refused_with_the_alternative(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    result = _sweep_cli(["run", str(spec_file), "--address", "ray://127.0.0.1:10001"],
                        {"FWSWEEP_HOME": str(tmp_path / "home")}, tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "--address" in out and "ray job submit" in out and "HEAD:6379" in out
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("tracking", [None, "http://127.0.0.1:5000", "sqlite:///mlflow.db"])
def test_compare_on_other_machines_refuses_a_tracking_store_only_this_one_reaches(
    tracking: str | None, tmp_path: Path
) -> None:
    """Seed runs log from the workers: a remote cluster + the local server (or 127.0.0.1, or a local file)
    is refused before anything starts, naming --tracking-uri."""
    args = ["compare", str(ROOT / "search_spaces/compare_quick.yaml"), "--address", "10.255.255.1:6379"]
    result = _sweep_cli(args + (["--tracking-uri", tracking] if tracking else []),
                        {"FWSWEEP_HOME": str(tmp_path / "home")}, tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "--tracking-uri" in out and "10.255.255.1:6379" in out and "Traceback" not in out
    assert not (tmp_path / "home").exists()  # no local server started, no manifest written


def test_compare_accepts_a_tracking_server_every_node_reaches() -> None:
    from sweep.compare import check_workers_reach_tracking

    check_workers_reach_tracking("10.0.0.5:6379", "http://mlflow.internal:5000")  # a shared server
    check_workers_reach_tracking("127.0.0.1:6379", None)  # nodes on this machine reach 127.0.0.1
    check_workers_reach_tracking(None, None)  # a local Ray


@pytest.mark.parametrize("message, field", [
    # a CI run: the unreachable endpoint's port (40353) made this read as a refused key
    ("When initiating multiple part upload for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
     "CreateMultipartUpload operation: curlCode: 7, Couldn't connect to server http://127.0.0.1:40353",
     "FWSWEEP_S3_ENDPOINT"),
    ("AWS Error ACCESS_DENIED during PutObject operation: HTTP response code 403", "AWS credentials"),
    ("AWS Error UNKNOWN (HTTP status 403) during HeadObject operation", "AWS credentials"),
    ("InvalidAccessKeyId: the key 4031 does not exist", "AWS credentials"),
    ("AWS Error NO_SUCH_BUCKET: NoSuchBucket", "--storage"),
    ("google::cloud::Status(UNAVAILABLE: Retry policy exhausted, with a last message of Could not create a "
     "OAuth2 access token to authenticate the request.", "Google Cloud credentials"),
])
def test_a_storage_error_is_named_by_what_failed_not_by_digits_in_it(message: str, field: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from sweep.store import _storage_error

    monkeypatch.setenv("FWSWEEP_S3_ENDPOINT", "http://127.0.0.1:40353")
    err = _storage_error("s3://b/x", OSError(message))
    assert err.problems[0].where == field, err.render()


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FWSWEEP_S3_ENDPOINT"])
def test_an_unreachable_endpoint_names_the_variable_that_set_it(variable: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from sweep.store import ENDPOINT_ENVS, _storage_error

    for name in ENDPOINT_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "http://127.0.0.1:9")
    err = _storage_error("s3://b/x", OSError("AWS Error NETWORK_CONNECTION: curlCode: 7, Could not connect"))
    assert err.problems[0].where == variable, err.render()
    assert "endpoint http://127.0.0.1:9" in err.problems[0].message


def test_tunes_state_upload_race_is_one_line_and_other_errors_keep_their_traceback() -> None:
    """Tune's background upload of its state can find one of its own snapshot's temp files renamed (the
    message it logged in a real sweep, below); that becomes one warning line, any other error stays."""
    import logging

    from sweep.storage_watch import (
        STATE_SYNC_RACE,
        STORAGE_TRACEBACKS,
        TUNE_STATE_LOGGER,
        hush_state_upload_messages,
    )

    STORAGE_TRACEBACKS.watch = None  # no sweep running in this process now (an earlier test's has ended)
    hush_state_upload_messages()
    hush_state_upload_messages()
    logger = logging.getLogger(TUNE_STATE_LOGGER)
    assert logger.filters.count(STATE_SYNC_RACE) == 1
    seen = ("[Errno 2] Failed to open local file '/tmp/ray/session_x/artifacts/2026-11-30_10-16-12/sweep/"
            "driver_artifacts/.3b3fa524-49a1-4f3f-bb11-98067b8c4a40-tmp-searcher-state-2026-11-30.pkl'. "
            "Detail: [errno 2] No such file or directory")
    errors = [FileNotFoundError(seen), FileNotFoundError("[Errno 2] /tmp/ray/sweep/experiment_state.json"),
              PermissionError(13, "Permission denied", "/tmp/ray/driver_artifacts/.1-tmp-x")]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # on this logger itself: Ray's "ray" logger may not propagate
    logger.addHandler(handler)
    try:
        for err in errors:
            try:
                raise err
            except OSError:
                logger.error("Saving experiment state to storage at '/x' failed with exception: ",
                             exc_info=True)
    finally:
        logger.removeHandler(handler)
    race, missing, denied = records
    assert race.levelname == "WARNING" and race.exc_info is None and "raced" in race.getMessage()
    for kept in (missing, denied):
        assert kept.levelname == "ERROR" and kept.exc_info is not None

    # While a sweep runs, its storage watch drops the traceback of a failed upload and probes next step
    from sweep.storage_watch import StorageWatch

    watch = StorageWatch(uri="s3://bucket/sweeps/x")
    watch.setup()
    records.clear()
    logger.addHandler(handler)
    try:
        try:
            raise OSError("When uploading part for key 'sweeps/x/experiment_state.json' in bucket 'b': "
                          "AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 7")
        except OSError:
            logger.error("Saving experiment state to storage at '/x' failed with exception: ", exc_info=True)
        watch.on_experiment_end([])
        try:
            raise OSError("AWS Error NETWORK_CONNECTION (after the sweep)")
        except OSError:
            logger.error("Saving experiment state failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert watch.suspect and [r.getMessage() for r in records] == ["Saving experiment state failed"]


def test_tunes_slow_state_upload_warnings_are_one_line_now_and_then() -> None:
    """While an object store does not answer, Tune warns every 2 s in four lines that saving its state
    takes long (its words, below); that becomes one line at most once a minute; other warnings pass."""
    import logging

    from sweep.storage_watch import SLOW_STATE_UPLOAD, TUNE_STATE_LOGGER, hush_state_upload_messages

    hush_state_upload_messages()
    logger = logging.getLogger(TUNE_STATE_LOGGER)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    SLOW_STATE_UPLOAD._last = float("-inf")
    tune_said = ("Saving the experiment state (which holds a global view of trial statuses and is used to "
                 "restore the experiment) has already taken {:.2f} seconds, which may cause consistency "
                 "issues upon restoration if your driver script ungracefully exits.\nThis could be ...")
    try:
        for seconds in (30.23, 32.25, 34.26):
            logger.warning(tune_said.format(seconds))
        logger.warning("Experiment state snapshotting has been triggered multiple times")
    finally:
        logger.removeHandler(handler)
    slow, other = records
    assert slow.getMessage() == ("the sweep's storage has taken 30 s so far to save Tune's state (slow or "
                                 "not answering); the sweep goes on when it answers")
    assert other.getMessage().startswith("Experiment state snapshotting")


@pytest.mark.slow  # a local Ray session
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_trial_restored_without_a_checkpoint_keeps_the_result_rows_it_uploaded(
        where: str, s3_env: S3Store, tmp_path: Path) -> None:
    """Tune snapshots its state apart from the results it logs. A driver killed in between comes back
    with a trial that has no checkpoint in Tune's state but result rows already uploaded; Tune's own JSON
    logger starts that trial's staging file empty, and its next upload replaced the rows (seen once as a
    trial recorded as epochs [2, 3] after `sweep resume`). sweep.result_log.ResultLog keeps them."""
    import ray
    from ray import tune
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial
    from ray.tune.logger import JsonLoggerCallback

    from sweep.result_log import ResultLog
    from sweep.runner import tune_trial

    storage = open_storage(str(tmp_path / "store") if where == "local" else s3_env.uri("result-log"))
    fs = storage.fs if storage.remote else None
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tune.register_trainable("fwsweep_trial", tune_trial)
        lines = {}
        for logger in (JsonLoggerCallback(), ResultLog()):
            name = type(logger).__name__
            trial = Trial("fwsweep_trial", config={}, trial_id=name.lower(),
                          storage=StorageContext(storage.root, name, storage_filesystem=fs))
            trial.init_local_path()
            storage.fs.create_dir(trial.path)
            with storage.fs.open_output_stream(f"{trial.path}/result.json") as out:  # what the dead driver
                out.write(b'{"epoch": 1}\n')  # uploaded
            assert trial.checkpoint is None
            logger.log_trial_start(trial)
            logger.log_trial_result(1, trial, {"epoch": 2})
            logger.on_experiment_end([trial])
            lines[name] = Path(trial.local_path, "result.json").read_text().splitlines()
    finally:
        if started:
            ray.shutdown()
    assert lines["JsonLoggerCallback"] == ['{"epoch": 2}']  # Tune's own: the uploaded row would be lost
    assert lines["ResultLog"] == ['{"epoch": 1}', '{"epoch": 2}']


def test_a_start_that_fails_under_the_driver_lock_leaves_no_folder(tmp_path: Path) -> None:
    """The driver's lock makes the sweep's folder; a start that fails before writing anything (a tracking
    store MLflow cannot open, say) removes it again, so the name is free and nothing half-made stays.
    A folder that held more (an earlier sweep's files) keeps everything."""
    from sweep.runner import DRIVER_LOCK, driver_lock

    store = open_storage(str(tmp_path / "sweeps")).sweep("failed-start")
    with pytest.raises(RuntimeError), driver_lock(store):
        assert (tmp_path / "sweeps" / "failed-start" / DRIVER_LOCK).exists()
        raise RuntimeError("the start failed")
    assert not (tmp_path / "sweeps" / "failed-start").exists()

    kept = tmp_path / "sweeps" / "kept"
    kept.mkdir(parents=True)
    (kept / SPEC_FILE).write_text("name: kept\n")
    with pytest.raises(RuntimeError), driver_lock(open_storage(str(tmp_path / "sweeps")).sweep("kept")):
        raise RuntimeError("the resume failed")
    assert (kept / SPEC_FILE).exists()


@pytest.mark.parametrize(("command", "spec_file", "again"), [
    ("run", "search_spaces/tests/faults_tiny.yaml", "sweep resume {name}"),
    ("compare", "search_spaces/compare_quick.yaml", "sweep compare SPEC"),
])
def test_a_second_driver_is_refused_before_ray_or_mlflow_start(command: str, spec_file: str, again: str,
                                                               tmp_path: Path, monkeypatch, capsys) -> None:
    """Two `sweep run` (or `sweep compare`) of one spec a few seconds apart: the first holds the sweep's
    driver lock from its first step, so the second is exit 2 at once, without starting a Ray or a local
    MLflow server of its own (a second run did both, 15 s, before it found the lock, and a second compare
    found none: both would have run the same seeds, until 2026-12-02)."""
    import ray
    from conftest import ROOT, lock_held_elsewhere, run_cli_in_process, snapshot

    home = tmp_path / "home"
    monkeypatch.setenv("FWSWEEP_HOME", str(home))
    name = SweepSpec.model_validate(yaml.safe_load((ROOT / spec_file).read_text())).name
    lock_path = home / "sweeps" / name / ".driver.lock"  # the first driver's folder, so far only its lock
    lock_path.parent.mkdir(parents=True)
    with lock_held_elsewhere(lock_path):
        before = snapshot(home)
        code, output = run_cli_in_process([command, str(ROOT / spec_file)], monkeypatch, capsys)
        assert code == 2 and "this sweep is running" in " ".join(output.split()), output
        assert again.format(name=name) in output, output
        assert not ray.is_initialized(), "a Ray was started before the lock was tried"
        assert snapshot(home) == before and not (home / "mlflow").exists(), "something was started or written"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_named_checkpoint_tune_deleted_is_replaced_by_the_newest_whole_one(
        where: str, s3_env: S3Store, tmp_path: Path) -> None:  # noqa: F811
    """The copy a resume makes before Tune restores (sweep.tune_checkpoints), on a folder and on S3: the
    newest whole checkpoint under the name Tune's state holds, the newer folders gone; a trial whose named
    checkpoint is there, or that ended, is left alone."""
    from sweep.store import TrialRecord
    from sweep.tune_checkpoints import restore_named_checkpoints

    uri = str(tmp_path / "store") if where == "local" else s3_env.uri(f"repair-{where}")
    store = open_storage(uri).sweep("repair")
    whole = {"state.pt": "S", "config.yaml": "C", "meta.json": '{"epoch": 3}'}
    layout = {"trial_a/checkpoint_000003": whole,  # trial a's state names checkpoint_000004: gone
              "trial_a/checkpoint_000005": whole | {"meta.json": '{"epoch": 5}'},
              "trial_a/checkpoint_000006": {"state.pt": "cut short"},  # no meta.json: not whole
              "trial_b/checkpoint_000001": whole, "trial_b/checkpoint_000002": whole,  # named one is there
              "trial_c/checkpoint_000007": whole}  # ended: Tune restores nothing
    for folder, files in layout.items():
        for name, text in files.items():
            store.write_text(f"{folder}/{name}", text)

    def record(tid: str, named: str, status: str = "RUNNING") -> TrialRecord:
        return TrialRecord(tid, "lstm", None, {}, status=status, checkpoint=f"trial_{tid}/{named}")  # type: ignore[arg-type]

    restored = restore_named_checkpoints(store, [record("a", "checkpoint_000004"),
                                                record("b", "checkpoint_000001"),
                                                record("c", "checkpoint_000002", "TERMINATED")])
    assert [(r.trial_id, r.source) for r in restored] == [("a", "checkpoint_000005")]
    assert "deleted after that state was saved" in restored[0].message()
    assert store.read_text("trial_a/checkpoint_000004/meta.json") == '{"epoch": 5}'
    assert store.read_text("trial_a/checkpoint_000004/state.pt") == "S"
    assert not store.exists("trial_a/checkpoint_000005") and not store.exists("trial_a/checkpoint_000006")
    assert store.exists("trial_a/checkpoint_000003")  # older ones are Tune's to delete
    assert store.exists("trial_b/checkpoint_000002") and store.exists("trial_c/checkpoint_000007")


def test_a_storage_watch_pickled_by_an_older_version_still_probes(tmp_path: Path) -> None:
    """Tune pickles its callbacks with the Tuner: a sweep started before the watch knew object stores
    (its state: folder, every_s, _next) is resumed with that watch, which must still work."""
    import pickle

    from sweep.storage_watch import StorageWatch

    older = pickle.loads(pickle.dumps(StorageWatch(folder=str(tmp_path))))
    older.__dict__ = {"folder": str(tmp_path), "every_s": 2.0, "_next": 0.0}  # what it pickled then
    older._probe(force=True)  # an AttributeError (uri, suspect) if it needed what it never pickled
    older.on_trial_error(0, [], None)
    assert older.uri is None and not older.suspect and list(tmp_path.iterdir()) == []

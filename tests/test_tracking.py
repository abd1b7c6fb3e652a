"""The MLflow server side: URI checks, the local server (started, reused, watched, restarted, stopped)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_until

from sweep import paths
from sweep.errors import UserError
from sweep.tracking import (
    _descendants,
    _exists,
    check_store,
    ensure_server,
    failing_reason,
    free_port,
    is_healthy,
    is_ready,
    launch_server,
    read_state,
    remembered_port,
    resolve_tracking_uri,
    stop_local_server,
    stop_process_tree,
    stop_unless_used,
    store_damage,
    tracking_server,
    wait_ready,
)

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[1]
SWEEP = Path(sys.executable).with_name("sweep")


def _listen_address(port: int) -> str | None:
    """The IPv4 address a local TCP port listens on, from /proc/net/tcp (None if not listening)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
            return ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return None


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FWSWEEP_HOME in a temporary folder, no MLflow URI from the environment."""
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def test_unreachable_uri_is_a_user_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as err:
        ensure_server(url)
    text = str(err.value)
    assert url in text and "--tracking-uri" in text and "MLFLOW_TRACKING_URI" in text
    assert "Fix:" in text


@pytest.mark.parametrize(("given", "env", "setting"), [
    ("ftp://files.example/runs", None, "--tracking-uri"),
    ("::not a uri::", None, "--tracking-uri"),
    ("http://", None, "--tracking-uri"),
    (None, "garbage://", "MLFLOW_TRACKING_URI"),
])
def test_uri_mlflow_cannot_use_is_refused(given: str | None, env: str | None, setting: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    with pytest.raises(UserError) as err:
        resolve_tracking_uri(given, spec_uri="http://spec-is-overridden:1")
    text = str(err.value)
    assert text.count(f"{setting}:") == 1 and "Fix:" in text and "MLFLOW_TRACKING_URI" in text


def test_uris_that_need_no_server_pass_and_precedence_holds(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert resolve_tracking_uri(f"sqlite:///{tmp_path}/a.db") == f"sqlite:///{tmp_path}/a.db"
    assert (tmp_path / "a.db").is_file()  # opened (and queried) once before anything starts
    with pytest.raises(UserError) as err:  # no driver installed here: said now, the password not shown
        resolve_tracking_uri("postgresql+psycopg2://u:hunter2@db/x")
    text = str(err.value)
    assert "cannot open postgresql+psycopg2://u:***@db/x" in text and "hunter2" not in text
    with pytest.raises(UserError, match="cannot write /proc"):  # MLflow would retry for a minute
        resolve_tracking_uri("sqlite:////proc/fwsweep.db")
    monkeypatch.chdir(tmp_path)
    for folder in (f"file://{tmp_path}/mlruns", "mlruns"):  # MLflow 3 refuses its file store by default
        with pytest.raises(UserError, match="MLFLOW_ALLOW_FILE_STORE=true"):
            resolve_tracking_uri(folder)
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        assert resolve_tracking_uri(folder) == folder
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    assert resolve_tracking_uri(None, spec_uri="sqlite:///spec.db") == "sqlite:///spec.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None, spec_uri="sqlite:///spec.db") == "sqlite:///env.db"
    assert resolve_tracking_uri("sqlite:///flag.db", spec_uri="sqlite:///spec.db") == "sqlite:///flag.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert resolve_tracking_uri(None) is None  # empty: unset, the local server


@pytest.mark.slow  # runs the CLI in a subprocess
@pytest.mark.parametrize(("argv", "env"), [
    (["run", "search_spaces/tests/faults_tiny.yaml", "--tracking-uri", "ftp://files.example/runs"], {}),
    (["run", "search_spaces/tests/faults_tiny.yaml"], {"MLFLOW_TRACKING_URI": "garbage://"}),
    (["ui"], {"MLFLOW_TRACKING_URI": "::not a uri::"}),
])
def test_cli_refuses_a_bad_uri_before_anything_starts(argv: list[str], env: dict[str, str],
                                                      tmp_path: Path) -> None:
    """Exit 2 with one message naming the setting, before Ray, a sweep folder or a local server exists."""
    home = tmp_path / "home"
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env |= {"FWSWEEP_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1", "TMPDIR": str(tmp_path)}
    started = time.monotonic()
    result = subprocess.run([str(SWEEP), *argv], cwd=ROOT, env=full_env | env, capture_output=True, text=True,
                            timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert ("--tracking-uri" if "--tracking-uri" in argv else "MLFLOW_TRACKING_URI") in output
    assert "Fix:" in output.replace("\n", " ") or "fix" in output.lower()
    assert "Traceback" not in output
    assert not home.exists(), "the command wrote state although the URI cannot work"
    assert not list(tmp_path.glob("ray*")), "Ray was started"
    assert time.monotonic() - started < 60


def test_given_uri_that_answers_is_used_as_is(mlflow_server: str) -> None:
    server = ensure_server(mlflow_server + "/")
    assert (server.url, server.started_here, server.pid) == (mlflow_server, False, None)


def test_environment_uri_is_used_when_none_is_given(mlflow_server: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert ensure_server(None).url == mlflow_server


@pytest.mark.slow  # starts a local MLflow server
def test_local_server_is_started_on_loopback_reused_and_stopped(home: Path) -> None:
    first = ensure_server(None)
    try:
        assert first.started_here and first.url.startswith("http://127.0.0.1:")
        port = int(first.url.rsplit(":", 1)[1])
        if Path("/proc/net/tcp").exists():
            assert _listen_address(port) == "127.0.0.1"
        folder = paths.mlflow_dir()
        assert (folder / "mlflow.db").exists()
        assert read_state(folder) == {**read_state(folder), "url": first.url, "pid": first.pid}

        again = ensure_server(None)
        assert (again.url, again.pid, again.started_here) == (first.url, first.pid, False)
        crashed = [first.pid, *_descendants(first.pid)]
        assert len(crashed) >= 2  # the launcher and its uvicorn worker

        stop_process_tree(first.pid)  # the server dies; its record stays behind
        revived = ensure_server(None)
        assert revived.started_here and revived.pid != first.pid
        assert revived.url == first.url  # same port: running sweeps and open links keep working
        tree = [revived.pid, *_descendants(revived.pid)]
    finally:
        stopped = stop_local_server()
    assert stopped
    assert not any(_exists(pid) for pid in crashed + tree), "a server process survived"
    assert read_state(paths.mlflow_dir()) is None
    assert stop_local_server() is False
    assert remembered_port() == port  # a clean stop forgets the process, not the port


@pytest.mark.slow  # starts local MLflow servers
def test_a_server_whose_launcher_alone_was_killed_leaves_no_worker_behind(home: Path) -> None:
    """`kill PID` of the recorded pid (the launcher) leaves its uvicorn worker serving the port: the next
    start stops it and takes the port back, and a stop stops it too; no server runs unrecorded."""
    first = ensure_server(None)
    workers = _descendants(first.pid)
    assert workers
    try:
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: not _exists(first.pid), timeout=10, what="the launcher to die")
        assert all(_exists(pid) for pid in workers) and is_healthy(first.url)  # the worker serves on

        second = ensure_server(None)
        assert second.started_here and second.pid != first.pid
        assert second.url == first.url  # the same port: links and running sweeps keep working
        assert not any(_exists(pid) for pid in workers), "the killed launcher's worker still runs"

        workers = _descendants(second.pid)
        os.kill(second.pid, signal.SIGKILL)
        wait_until(lambda: not _exists(second.pid), timeout=10, what="the launcher to die")
    finally:
        stopped = stop_local_server()
    assert stopped  # `sweep ui --stop`, or the last command out, stops what was left behind
    assert not any(_exists(pid) for pid in workers) and not is_healthy(first.url)


@pytest.mark.slow  # starts a local MLflow server
def test_ui_comes_back_on_the_same_port_after_a_clean_stop(home: Path) -> None:
    """`sweep ui`, Ctrl-C, `sweep ui` again: the link printed the first time works again."""
    with tracking_server(None) as first:
        assert is_healthy(first.url)
    assert not _exists(first.pid) and not is_healthy(first.url)
    with tracking_server(None) as second:
        assert second.url == first.url and second.pid != first.pid and is_healthy(second.url)
    assert not _exists(second.pid)


@pytest.mark.slow  # starts a local MLflow server
def test_watchdog_restarts_a_killed_server_on_the_same_port(home: Path) -> None:
    """The server dies while a command uses it: the command's watchdog brings it back over the same store."""
    with tracking_server(None) as server:
        import mlflow

        client = mlflow.MlflowClient(server.url)
        experiment = client.create_experiment("survives-restarts")
        stop_process_tree(server.pid)  # kill it for real; nobody in the test restarts it
        killed = time.monotonic()
        assert not is_healthy(server.url)
        deadline = time.monotonic() + 120
        while not is_healthy(server.url) and time.monotonic() < deadline:
            time.sleep(0.2)
        restart_s = time.monotonic() - killed
        assert is_healthy(server.url), "the watchdog did not restart the server"
        assert wait_ready(server.url, timeout=10) and is_ready(server.url)
        state = read_state()
        assert state["url"] == server.url and state["pid"] != server.pid
        assert client.get_experiment(experiment).name == "survives-restarts"  # same store
        print(f"restart after kill: {restart_s:.1f} s")
    assert not _exists(state["pid"]) and read_state() is None


@pytest.mark.slow  # starts a local MLflow server
def test_a_sweep_need_not_wait_for_the_server(home: Path) -> None:
    """`wait=False`: the command goes on while the server boots; `is_ready` says when writes may start."""
    started = time.monotonic()
    with tracking_server(None, wait=False) as server:
        entered_s = time.monotonic() - started
        assert server.started_here and not is_ready(server.url)
        assert wait_ready(server.url, timeout=120) and is_healthy(server.url)
        boot_s = time.monotonic() - started
        print(f"context entered after {entered_s:.2f} s; server ready after {boot_s:.1f} s")
        assert entered_s < boot_s
    assert not _exists(server.pid)


@pytest.mark.slow  # starts local MLflow servers that fail
def test_a_server_that_cannot_start_is_named_once_and_not_waited_for(
        home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A local server that exits at every start (here: an MLflow setting it cannot read): a command that
    waits for it gets one line naming the cause (exit 2); a sweep, which trains meanwhile, hears the cause
    once and stops waiting after FAILED_STARTS starts, instead of for the 180 s a slow boot may take."""
    cause = "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"
    monkeypatch.setenv(cause, "abc")
    with pytest.raises(UserError) as info:
        ensure_server(None)
    message = info.value.render()
    assert "exited while starting" in message and cause in message and "Traceback" not in message, message
    assert len(message) < 700, message

    started = time.monotonic()
    with caplog.at_level("WARNING", logger="sweep.tracking"), tracking_server(None, wait=False) as server:
        assert not wait_ready(server.url, timeout=150)
        waited = time.monotonic() - started
        assert cause in (failing_reason(server.url) or "")
    said = [r.getMessage() for r in caplog.records if "did not start" in r.getMessage()]
    assert len(said) == 1 and cause in said[0], said  # the cause once, not once per try
    assert waited < 100, f"waited {waited:.0f} s for a server that cannot start"


@pytest.mark.slow  # starts a local MLflow server
def test_local_server_lives_while_a_command_uses_it(home: Path) -> None:
    """The last command out stops the local server; a nested user, a kept server and a dead lease differ."""
    try:
        with tracking_server(None) as outer:
            with tracking_server(None) as inner:  # e.g. `sweep compare` running its sweeps
                assert inner.url == outer.url and not inner.started_here
            assert _exists(outer.pid), "an inner user stopped the server under the outer one"
            assert stop_unless_used() == (False, [os.getpid()])  # `sweep ui --stop` during a sweep
            assert _exists(outer.pid) and is_healthy(outer.url)
            dead = paths.mlflow_dir() / "users" / "999999999-dead"  # a killed driver's lease
            dead.touch()
        assert not _exists(outer.pid) and read_state(paths.mlflow_dir()) is None
        assert not dead.exists()

        with tracking_server(None, keep=True) as kept:  # `sweep ui --detach`
            pass
        assert _exists(kept.pid) and read_state(paths.mlflow_dir())["pid"] == kept.pid
        assert stop_unless_used() == (True, [])
    finally:
        stop_local_server()
    assert not _exists(kept.pid)
    assert not (paths.mlflow_dir() / "keep").exists()


@pytest.mark.slow  # starts a local MLflow server
def test_a_server_killed_while_it_makes_its_database_leaves_none_half_made(home: Path) -> None:
    """MLflow makes a new SQLite database by migrations outside one transaction: a server stopped during
    that first boot left one that no later server could open (and every later command's server died at
    boot). It is now made in a side file and moved into place whole."""
    folder = paths.mlflow_dir()
    folder.mkdir(parents=True)
    proc, _ = launch_server(folder)
    building = wait_until(lambda: [p for p in folder.glob("mlflow.db.building-*")  # not SQLite's journal
                                   if not p.name.endswith(("-journal", "-wal", "-shm"))], 120,
                          "the database's build", interval=0.02)  # (which comes and goes with each write)
    stop_process_tree(proc.pid, grace_s=0)  # SIGKILL mid-build, as a closed terminal or `kill -9` does
    assert not (folder / "mlflow.db").exists(), "a half-made database took the store's place"
    assert building[0].exists()  # the abandoned side file, for the next start to clear

    server = ensure_server(None)
    try:
        assert store_damage(folder / "mlflow.db") is None
        assert not list(folder.glob("mlflow.db.building-*")), "the abandoned build was left behind"
        import mlflow

        assert mlflow.MlflowClient(server.url).create_experiment("after-a-killed-boot")
    finally:
        stop_local_server()


VERSIONED = ("CREATE TABLE experiments (id INTEGER); CREATE TABLE alembic_version (version_num TEXT); "
             "INSERT INTO alembic_version VALUES ('c8d9e0f1a2b3')")


@pytest.mark.parametrize(("content", "why"), [
    (None, None),  # no database yet: the server makes it
    (b"", None),  # an empty file: made whole too
    (f"{VERSIONED}; CREATE TABLE _alembic_tmp_experiments (id INTEGER)",
     "_alembic_tmp_experiments is left over"),
    ("CREATE TABLE experiments (id INTEGER)", "no schema version"),
    ("CREATE TABLE experiments (id INTEGER); CREATE TABLE alembic_version (version_num TEXT)",
     "no schema version"),
    (VERSIONED, None),
    (b"SQLite format 3\x00" + b"\xff" * 4000, "SQLite cannot read it"),
    (b"not a database\n" * 300, "SQLite cannot read it"),
])
def test_a_damaged_local_database_is_named_before_a_server_dies_on_it(content: str | bytes | None,
                                                                      why: str | None, tmp_path: Path
                                                                      ) -> None:
    import sqlite3

    db = tmp_path / "mlflow.db"
    if isinstance(content, bytes):
        db.write_bytes(content)
    elif content is not None:
        with sqlite3.connect(db) as con:
            con.executescript(content)
        con.close()
    found = store_damage(db)
    assert (found is None) if why is None else (why in (found or "")), found
    if why is not None:
        with pytest.raises(UserError, match="move it aside") as info:
            check_store(tmp_path)
        assert info.value.problems[0].where == str(db)


def test_a_restart_that_cannot_be_tried_backs_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A database damaged while a command runs: the watchdog cannot restart the server, and says so at the
    restarts' back-off (2, 4, ... s), not every 0.25 s."""
    from sweep.tracking import Watchdog

    (tmp_path / "mlflow.db").write_bytes(b"not a database\n" * 300)
    watchdog = Watchdog(tmp_path, f"http://127.0.0.1:{free_port()}")
    with caplog.at_level("WARNING", logger="sweep.tracking"):
        watchdog.start()
        time.sleep(3.5)
        watchdog.stop()
    said = [r for r in caplog.records if "could not restart" in r.getMessage()]
    assert 1 <= len(said) <= 2, [r.getMessage() for r in said]
    assert "damaged" in said[0].getMessage()


def test_a_database_busy_with_another_write_is_not_called_damaged(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from sweep import local_mlflow

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.executescript(VERSIONED)
    con.close()
    monkeypatch.setattr(local_mlflow, "READ_TIMEOUT_S", 0.2)
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")  # a live server's long write
        assert store_damage(db) is None
    finally:
        writer.close()


def test_stale_record_of_a_foreign_pid_is_not_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded pid now used by another program (here: this test) is left alone, not signalled."""
    folder = tmp_path / "home" / "mlflow"
    folder.mkdir(parents=True)
    record = {"url": f"http://127.0.0.1:{free_port()}", "pid": os.getpid()}
    (folder / "server.json").write_text(json.dumps(record))
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    assert stop_local_server() is False  # not an mlflow server: nothing to stop, and we are still alive
    assert read_state(folder) is None


def test_unwritable_home_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FWSWEEP_HOME", str(blocker))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="FWSWEEP_HOME"):
        ensure_server(None)


def test_sweep_link_saves_the_view_and_falls_back_to_url_state(mlflow_server: str) -> None:
    """The link opens a saved view (sort, filter, columns); without an experiment there is no link."""
    import urllib.parse

    import mlflow
    import yaml

    from sweep.config import SweepSpec
    from sweep.tracking import (
        SHARED_VIEW_TAG,
        run_link,
        runs_table_link,
        runs_view,
        searched_params,
        sweep_link,
    )

    data = yaml.safe_load((ROOT / "search_spaces/tests/faults_tiny.yaml").read_text())
    data |= {"name": "link-check", "models": ["lstm", "fw_lstm"],
             "metric": {"name": "val_loss", "mode": "min"}}
    spec = SweepSpec.model_validate(data)
    assert searched_params(spec) == ["model.name", "train.lr"]
    assert sweep_link(mlflow_server, spec) is None  # nothing logged yet: no experiment to link to
    assert sweep_link("sqlite:///x.db", spec) is None and sweep_link(None, spec) is None

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.create_experiment(spec.experiment)
    link = sweep_link(mlflow_server, spec)
    assert link == (f"{mlflow_server}/#/experiments/{experiment}/runs?workflowType=machine_learning"
                    "&viewStateShareKey=fwsweep-link-check")
    saved = json.loads(client.get_experiment(experiment).tags[SHARED_VIEW_TAG + "fwsweep-link-check"])
    assert saved == {"searchFilter": "tags.sweep = 'link-check' and tags.`mlflow.parentRunId` IS NOT NULL",
                     "orderByKey": "metrics.`val_loss`", "orderByAsc": True,
                     "selectedColumns": ["metrics.`val_loss`", "params.`model.name`", "params.`train.lr`"]}

    plain = runs_table_link(mlflow_server, experiment, runs_view("s", "val_accuracy", "max", []))
    query = urllib.parse.parse_qs(plain.split("?", 1)[1])
    assert query["orderByKey"] == ["metrics.`val_accuracy`"] and query["orderByAsc"] == ["false"]
    assert run_link(mlflow_server, "7", "abc", "model-metrics") == (
        f"{mlflow_server}/#/experiments/7/runs/abc/model-metrics?workflowType=machine_learning")


@pytest.mark.slow
def test_trials_train_while_the_local_server_does_not_answer_yet(home: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`sweep run` does not wait for its local server: trials train while it is frozen from its launch
    (SIGSTOP, a real process that does not answer), their reports wait, and all arrive once it answers."""
    import contextlib
    import signal
    import threading

    import mlflow
    import psutil
    import yaml

    from sweep.config import SweepSpec
    from sweep.runner import run_sweep

    data = yaml.safe_load((ROOT / "search_spaces/tests/faults_tiny.yaml").read_text())
    data["name"] = "boot-overlap"
    data["budget"] |= {"num_samples": 2}
    spec = SweepSpec.model_validate(data)
    checkpoints = paths.sweeps_dir() / spec.name
    seen: dict[str, object] = {}

    def freeze_until_trials_report() -> None:
        deadline = time.monotonic() + 600
        while (state := read_state()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        frozen = [psutil.Process(state["pid"])]
        frozen[0].send_signal(signal.SIGSTOP)
        frozen += frozen[0].children(recursive=True)
        for proc in frozen[1:]:
            proc.send_signal(signal.SIGSTOP)
        seen["healthy_when_frozen"] = is_healthy(state["url"], timeout=1.0)
        while not list(checkpoints.glob("trial_*/checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        seen["trained_while_frozen"] = bool(list(checkpoints.glob("trial_*/checkpoint_*")))
        seen["ready_while_frozen"] = is_ready(state["url"])
        for proc in frozen:  # (the watchdog may have replaced a server frozen for longer than HUNG_AFTER_S)
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)

    freezer = threading.Thread(target=freeze_until_trials_report, daemon=True)
    freezer.start()
    result = run_sweep(spec)
    freezer.join(timeout=60)
    assert seen == {"healthy_when_frozen": False, "trained_while_frozen": True, "ready_while_frozen": False}
    assert sum(result.status_counts.values()) == 2 and result.best is not None

    with tracking_server(None) as server:  # the sweep stopped it: bring it back to read what it holds
        client = mlflow.MlflowClient(server.url)
        experiment = client.get_experiment_by_name(spec.experiment).experiment_id
        trials = client.search_runs([experiment], "tags.`mlflow.parentRunId` IS NOT NULL")
        assert len(trials) == 2
        for run in trials:
            history = client.get_metric_history(run.info.run_id, spec.metric.name)
            steps = [data["train"]["steps_per_epoch"] * epoch for epoch in (1, 2, 3)]  # optimizer steps
            assert sorted(m.step for m in history) == steps, run.info.run_name  # no report lost


@pytest.mark.slow  # starts a local MLflow server
def test_ui_prints_a_link_per_sweep_and_keeps_its_port(home: Path) -> None:
    """`sweep ui --detach` prints the server's URL and each sweep's runs-table link; `--stop` stops it;
    the next `sweep ui` comes back on the same port, so the printed links work again."""
    import mlflow

    spec_text = (ROOT / "search_spaces/tests/faults_tiny.yaml").read_text()
    (paths.sweeps_dir() / "faults-tiny").mkdir(parents=True)
    (paths.sweeps_dir() / "faults-tiny" / "sweep_spec.yaml").write_text(spec_text)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"COLUMNS": "300"}

    def ui(*flags: str) -> str:
        result = subprocess.run([str(SWEEP), "ui", *flags], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    try:
        first = ui("--detach")
        url = read_state()["url"]
        assert f"MLflow UI: {url}" in first and "faults-tiny" not in first  # no runs yet: no link
        experiment = mlflow.MlflowClient(url).create_experiment("faults-tiny")
        assert "local MLflow server stopped" in ui("--stop") and not is_healthy(url)
        again = ui("--detach")
        link = (f"faults-tiny: {url}/#/experiments/{experiment}/runs?workflowType=machine_learning"
                "&viewStateShareKey=fwsweep-faults-tiny")
        assert f"MLflow UI: {url}" in again and link in again
    finally:
        stop_local_server()


@pytest.mark.slow  # a real `sweep ui` process and its server
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_ui_stopped_by_a_signal_stops_its_server(home: Path, sig: int) -> None:
    """`kill` (SIGTERM) or a closed terminal (SIGHUP) ends `sweep ui` as Ctrl-C does: its server stops too.
    (Before: the process died on the spot and the server ran on, used by no command.) Started the way a
    shell starts a background job, with SIGINT ignored, so Ctrl-C's own handler is not there to call."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([str(SWEEP), "ui"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        state = wait_until(lambda: read_state(paths.mlflow_dir()), timeout=120, what="the server's record")
        wait_until(lambda: is_healthy(state["url"]), timeout=120, what="the server to answer")
        tree = [state["pid"], *_descendants(state["pid"])]
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        outlived = [pid for pid in tree if _exists(pid)]
        record = read_state(paths.mlflow_dir())
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_local_server()
    assert "Traceback" not in out, out
    assert not outlived, f"the server outlived `sweep ui`: {outlived}"
    assert record is None


def test_watchdog_sleeps_while_the_server_answers_and_probes_when_a_writer_suspects_it(
        tmp_path: Path) -> None:
    """A live, answering server is asked for /health once per PROBE_EVERY_S, not every WATCH_EVERY_S (the
    driver shares its cores with the trials); a writer's failed request (`suspect`) makes it ask at once."""
    from http_stub import answering_200

    from sweep import tracking

    hits: list[float] = []
    with answering_200(lambda: hits.append(time.monotonic())) as port:
        url = f"http://127.0.0.1:{port}"
        (tmp_path / tracking.STATE_FILE).write_text(json.dumps({"url": url, "pid": os.getpid(),
                                                                  "started_at": time.time()}))
        watchdog = tracking.Watchdog(tmp_path, url)
        try:
            watchdog.start()
            time.sleep(3 * tracking.WATCH_EVERY_S + 0.5)  # three process checks
            assert len(hits) == 1, f"{len(hits)} /health requests in {3 * tracking.WATCH_EVERY_S} s: it polls"
            assert tracking.is_ready(url)
            asked = time.monotonic()
            tracking.suspect(url)
            deadline = asked + 5
            while len(hits) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(hits) == 2 and hits[1] - asked < 1.0, "a suspected server was not probed at once"
        finally:
            watchdog.stop()
    assert watchdog.restarts == 0

"""Finding or starting the MLflow server: real `mlflow server` processes, real health checks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from sweep import paths
from sweep.curves import plot_learning_curve, plot_sweep_curves
from sweep.errors import UserError
from sweep.tracking import (
    _descendants,
    _exists,
    ensure_server,
    free_port,
    read_state,
    stop_local_server,
    stop_process_tree,
    tracking_server,
)

pytestmark = pytest.mark.timeout(180)


def _listen_address(port: int) -> str | None:
    """The IPv4 address a local TCP port listens on, from /proc/net/tcp (None if not listening)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
            return ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return None


def test_unreachable_uri_is_a_user_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as err:
        ensure_server(url)
    text = str(err.value)
    assert url in text and "--tracking-uri" in text and "MLFLOW_TRACKING_URI" in text
    assert "Fix:" in text


def test_given_uri_that_answers_is_used_as_is(mlflow_server: str) -> None:
    server = ensure_server(mlflow_server + "/")
    assert (server.url, server.started_here, server.pid) == (mlflow_server, False, None)


def test_environment_uri_is_used_when_none_is_given(mlflow_server: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert ensure_server(None).url == mlflow_server


def test_local_server_is_started_on_loopback_reused_and_stopped(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
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


def test_local_server_lives_while_a_command_uses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last command out stops the local server; a nested user, a kept server and a dead lease differ."""
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        with tracking_server(None) as outer:
            with tracking_server(None) as inner:  # e.g. `sweep compare` running its sweeps
                assert inner.url == outer.url and not inner.started_here
            assert _exists(outer.pid), "an inner user stopped the server under the outer one"
            dead = paths.mlflow_dir() / "users" / "999999999-dead"  # a killed driver's lease
            dead.touch()
        assert not _exists(outer.pid) and read_state(paths.mlflow_dir()) is None
        assert not dead.exists()

        with tracking_server(None, keep=True) as kept:  # `sweep ui --detach`
            pass
        assert _exists(kept.pid) and read_state(paths.mlflow_dir())["pid"] == kept.pid
    finally:
        stop_local_server()
    assert not _exists(kept.pid)
    assert not (paths.mlflow_dir() / "keep").exists()


def test_stale_record_of_a_foreign_pid_is_not_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded pid now used by another program (here: this test) is left alone, not signalled."""
    folder = tmp_path / "home" / "mlflow"
    folder.mkdir(parents=True)
    record = {"url": f"http://127.0.0.1:{free_port()}", "pid": os.getpid()}
    (folder / "server.json").write_text(json.dumps(record))
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    assert stop_local_server() is False  # not an mlflow server: nothing to stop, and we are still alive
    assert read_state(folder) is None


def test_learning_curve_pngs(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.2 * e}
               for e in (1, 2, 3)]
    history.append({"epoch": 4, "train_loss": math.nan, "val_accuracy": None, "diverged": 1})
    one = plot_learning_curve(history, tmp_path / "a" / "curve.png", title="t")
    many = plot_sweep_curves({"t1": ("lstm", history), "t2": ("fw_lstm", [])}, "val_accuracy",
                             tmp_path / "sweep.png")
    empty = plot_learning_curve([], tmp_path / "empty.png")
    for png in (one, many, empty):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unwritable_home_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FWSWEEP_HOME", str(blocker))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="FWSWEEP_HOME"):
        ensure_server(None)

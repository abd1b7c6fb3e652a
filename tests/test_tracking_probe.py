"""A given tracking server is asked through MLflow's API, with the client's credentials, before anything
starts; a server that refuses the sweep's writes mid-sweep stops it (exit 2) without losing anything.

Real servers: the compose file's MLflow command with basic auth (an admin and a read-only user), and loopback
web servers that are not MLflow (a page for every path, a 500 for every request).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SweepProcess, epoch_steps, metric_steps, mlflow_runs, tune_trials, write_spec
from http_stub import answering_everything

from sweep.errors import UserError
from sweep.tracking import check_tracking_uri

pytestmark = pytest.mark.slow  # starts MLflow servers

LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
READER = {"MLFLOW_TRACKING_USERNAME": "reader", "MLFLOW_TRACKING_PASSWORD": "reader-password-0123"}
SHARED = "admins-experiment"  # created by the admin: the reader may read it, not write to it


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """(url, the admin's credentials) of the compose file's MLflow server with basic auth on, with a
    read-only user READER and an experiment SHARED of the admin's."""
    pytest.importorskip("flask_wtf", reason="MLflow basic auth needs mlflow[auth] (Flask-WTF)")
    from compose_stack import compose_mlflow_server
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    with compose_mlflow_server(tmp_path_factory.mktemp("auth-mlflow")) as (url, password):
        admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        with pytest.MonkeyPatch.context() as env:
            for name, value in admin.items():
                env.setenv(name, value)
            get_app_client("basic-auth", tracking_uri=url).create_user(*READER.values())
            MlflowClient(url).create_experiment(SHARED)
        yield url, admin


def login(monkeypatch: pytest.MonkeyPatch, credentials: dict[str, str]) -> None:
    for name in LOGIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)


def refusal(uri: str) -> str:
    with pytest.raises(UserError) as err:
        check_tracking_uri(uri)
    return err.value.render()


def test_a_server_that_asks_for_a_login_is_checked_with_the_clients_credentials(
        auth_server: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, admin = auth_server
    login(monkeypatch, {})
    said = refusal(url)  # /health answers 200 without a login: the API does not
    assert "MLFLOW_TRACKING_USERNAME: MLflow at" in said and "asks for a login and none is set" in said, said
    assert "HTTP 401" in said and "not on the command line" in said, said
    login(monkeypatch, {**admin, "MLFLOW_TRACKING_PASSWORD": "not-the-password"})
    said = refusal(url)
    assert "does not accept these credentials" in said and "not-the-password" not in said, said
    for credentials in (admin, READER):  # reading is all the check asks
        login(monkeypatch, credentials)
        assert check_tracking_uri(url) == url


@pytest.mark.parametrize(("status", "body", "expected"), [
    (200, b"<html>a dashboard</html>", "is not an MLflow tracking server"),
    (404, b"<html>not found</html>", "is not an MLflow tracking server"),
    (500, b'{"error_code": "INTERNAL_ERROR", "message": "database is locked"}', "fails requests"),
])
def test_a_web_server_that_is_not_a_working_mlflow_is_named_before_anything_starts(
        status: int, body: bytes, expected: str) -> None:
    with answering_everything(status, body) as url:
        said = refusal(url)
    assert f"--tracking-uri: the server at {url}" in said or f"--tracking-uri: MLflow at {url}" in said, said
    assert expected in said and f"HTTP {status}" in said, said
    if status == 500:
        assert "database is locked" in said, said  # MLflow's own error message, not its JSON


def test_a_sweep_without_a_login_stops_before_anything_is_written(
        auth_server: tuple[str, dict[str, str]], home: Path, tmp_path: Path) -> None:
    url, _ = auth_server
    spec = write_spec(tmp_path, "probe-nologin")
    env = {name: "" for name in LOGIN_VARIABLES}
    proc = SweepProcess(["run", str(spec), "--tracking-uri", url], home, env)
    assert proc.wait(60) == 2
    out = proc.output()
    assert "asks for a login and none is set" in out and "Traceback" not in out, out
    assert not any(home.iterdir()), "something was written"


def test_a_user_who_may_not_write_stops_the_sweep_and_resume_goes_on(
        auth_server: tuple[str, dict[str, str]], home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-only user passes the check but every write is refused (403): before, the sweep trained to
    its end unrecorded and said the server 'did not answer' (exit 3). Now it stops at once (exit 2) naming
    the experiment and the fix; `sweep sync` as that user says the same in one line; the admin's `sweep
    resume` finishes it with MLflow level."""
    url, admin = auth_server
    name = "probe-reader"
    spec = write_spec(tmp_path, name, tracking={"experiment": SHARED})
    proc = SweepProcess(["run", str(spec), "--tracking-uri", url], home, READER)
    assert proc.wait(120) == 2
    out = proc.output()
    assert "refuses this sweep's writes (HTTP 403" in out and f"experiment '{SHARED}'" in out, out
    assert f"`sweep resume {name}`" in out and "Traceback" not in out, out
    ended = [t for t in tune_trials(home, name).values() if t["status"] == "TERMINATED"]
    assert len(ended) < 4, "the sweep trained to its end unrecorded"

    proc = SweepProcess(["sync", name, "--tracking-uri", url], home, READER)
    assert proc.wait(60) == 2
    out = proc.output()
    assert "refused a request (HTTP 403: Permission denied)" in out and "Traceback" not in out, out

    proc = SweepProcess(["resume", name, "--tracking-uri", url], home, admin)
    assert proc.wait(240) == 0, proc.output()[-3000:]
    login(monkeypatch, admin)
    parents, children = mlflow_runs(url, SHARED)
    trials = tune_trials(home, name)
    assert len(trials) == 4 and all(t["status"] == "TERMINATED" for t in trials.values()), trials
    assert len(parents) == 1 and {r.data.tags["trial_id"] for r in children} == set(trials)
    for run in children:
        epochs = len(trials[run.data.tags["trial_id"]]["epochs"])
        assert metric_steps(url, run.info.run_id, "val_accuracy") == epoch_steps(epochs)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(url, the CA certificate) of a real MLflow server on HTTPS with a self-signed certificate (a lab's
    private CA)."""
    import subprocess
    import sys
    import time

    from sweep.tracking import free_port, stop_process_tree

    folder = tmp_path_factory.mktemp("tls-mlflow")
    cert, key = folder / "cert.pem", folder / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
                           "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {made.stderr[-300:]}")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--uvicorn-opts",
             f"--ssl-keyfile {key} --ssl-certfile {cert}"], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
            env=env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while "Application startup complete" not in (folder / "server.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
            time.sleep(0.3)
        yield url, cert
    finally:
        stop_process_tree(proc.pid, grace_s=5)


def test_an_https_server_with_a_private_ca_is_asked_with_mlflows_tls_settings(
        tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, /health was asked with urllib, which knows nothing of MLFLOW_TRACKING_SERVER_CERT_PATH: such a
    server was 'not answering' whatever the user set, and could not be used at all."""
    from sweep.tracking import is_healthy

    url, cert = tls_server
    for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS"):
        monkeypatch.delenv(name, raising=False)
    said = refusal(url)
    assert f"the TLS certificate of {url} is not trusted here (certificate verify failed" in said, said
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in said, said
    assert not is_healthy(url)
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
    assert check_tracking_uri(url) == url and is_healthy(url)
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    assert check_tracking_uri(url) == url

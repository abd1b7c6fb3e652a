"""docker-compose.yml as the tests read and run it: its parsed form, an environment without the variables
it reads, dummy secrets, and its exact `mlflow server` options started for real on loopback (SQLite standing
in for PostgreSQL, a local folder for the S3 artifact store)."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from conftest import http_status

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_SECRETS = ("MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY", "RAY_AUTH_TOKEN")  # in .env
DUMMY_SECRETS = {k: f"test-{k.lower()}-0123456789abcdef" for k in ENV_SECRETS}
START_TIMEOUT_S = 120


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything the compose file reads, plus `extra`."""
    names = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    return {k: v for k, v in os.environ.items() if k not in names} | extra


def with_defaults(value: str) -> str:
    """`${NAME:-default}` -> default, as Compose expands it with NAME unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def basic_auth_status(url: str, user: str | None = None, password: str = "", **headers: str) -> int:
    """Status of GET `url` with HTTP basic auth (when `user`) and extra headers (host=..., origin=...)."""
    sent = {k.capitalize(): v for k, v in headers.items()}
    if user:
        sent["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return http_status(url, sent)


@contextlib.contextmanager
def compose_mlflow_server(folder: Path) -> Iterator[tuple[str, str]]:
    """The compose file's own `mlflow server` options, run here (loopback, one worker, SQLite as the backend
    the entrypoint would build from the PostgreSQL secret, a local artifact folder instead of the bucket,
    CORS origins for this port); yields (url, admin password). Needs mlflow[auth] (Flask-WTF)."""
    from sweep.tracking import free_port, stop_process_tree

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    overrides = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1",
                 "--artifacts-destination": str(folder / "artifacts"),
                 "--cors-allowed-origins": f"{url},http://localhost:{port}"}
    args = []
    for arg in compose()["services"]["mlflow"]["command"]:
        key = arg.split("=", 1)[0]
        args.append(f"{key}={overrides[key]}" if key in overrides else with_defaults(arg))
    password = DUMMY_SECRETS["MLFLOW_ADMIN_PASSWORD"]
    env = clean_env(MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD=password,
                    MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                    MLFLOW_BACKEND_STORE_URI=f"sqlite:///{folder}/mlflow.db")
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_")}
    log = folder / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args], cwd=folder, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while basic_auth_status(url + "/health") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-3000:]
                raise RuntimeError(f"the compose file's mlflow server did not start:\n{tail}")
            time.sleep(0.5)
        yield url, password
    finally:
        stop_process_tree(proc.pid, grace_s=5)

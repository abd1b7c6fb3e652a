"""A real MLflow tracking server for tests: one per test session, on a free loopback port.

Started lean (one worker, no job-execution processes: ~4-8 s, ~0.5 GB) with a temporary SQLite backend
and artifact folder; its whole process tree is killed at teardown. Tests that share it should use their
own experiment names.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sweep.tracking import start_server, stop_process_tree, stop_servers_under


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (http://127.0.0.1:PORT) of a running MLflow server."""
    server = start_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.url
    finally:
        stop_process_tree(server.pid)


@pytest.fixture(scope="session", autouse=True)
def stop_leftover_mlflow_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session, stop local servers that sweeps started under the session's temp folders
    (`ensure_server(None)` with FWSWEEP_HOME=tmp_path starts a detached server meant to be reused)."""
    yield
    stop_servers_under(tmp_path_factory.getbasetemp())

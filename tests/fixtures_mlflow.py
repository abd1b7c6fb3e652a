"""A real MLflow tracking server for tests: one per test session, on a free loopback port.

Started lean (one worker, no job-execution processes: ~4-8 s, ~0.5 GB) with a temporary SQLite backend
and artifact folder; its whole process tree is killed at teardown. Tests that share it should use their
own experiment names.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sweep.tracking import start_server, stop_process_tree


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (http://127.0.0.1:PORT) of a running MLflow server."""
    server = start_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.url
    finally:
        stop_process_tree(server.pid)

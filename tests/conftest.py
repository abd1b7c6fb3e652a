"""Shared fixtures and helpers: the one MLflow server fixture, a tiny trial, the tiny sweep spec, running the
CLI in-process, HTTP probes and folder snapshots. Test modules import helpers from here (`from conftest
import ...`), never from one another.

Tiers: tests that start Ray, an MLflow server, a subprocess or train to a target are marked `slow`;
`make test-fast` runs the rest (`-m "not slow"`), `make test` runs everything.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sweep.config import TrialConfig
from sweep.tracking import start_server, stop_process_tree, stop_servers_under

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC_TEXT = (ROOT / "search_spaces/tests/faults_tiny.yaml").read_text()

TINY_TRIAL: dict[str, Any] = {
    "task": {"name": "art", "pairs": 2, "train_size": 2000, "val_size": 400, "test_size": 400, "seed": 1},
    "model": {"name": "lstm", "hidden_size": 16, "embed_size": 16, "head_size": 16},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.003, "seed": 0, "device": "cpu", "num_threads": 1},
}


# Fixtures that start a real MLflow server or Ray: a test using one is slow whatever its module says, so
# the fast tier never starts either.
SLOW_FIXTURES = {"mlflow_server", "own_mlflow", "local_ray", "first_sweep", "cluster"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# ---------------------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (http://127.0.0.1:PORT) of a real MLflow server, one per test session.

    Started lean (one worker, no job-execution processes: ~4-8 s, ~0.5 GB) with a temporary SQLite backend
    and artifact folder; its whole process tree is killed at teardown. Tests sharing it use their own
    experiment names.
    """
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


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> int:
    """The status code of GET `url` (an HTTP error's code too); 0 when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------- configs


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merge(base[key], value) if nested else value
    return out


@pytest.fixture
def tiny_trial():
    """tiny_trial(train={"epochs": 2}) -> TrialConfig of a ~1 s LSTM run on a small ART, overrides merged."""

    def make(**sections: dict[str, Any]) -> TrialConfig:
        return TrialConfig.model_validate(_merge(TINY_TRIAL, sections))

    return make


def spec_text(**changes: str) -> str:
    """The tiny valid spec (search_spaces/tests/faults_tiny.yaml) with top-level keys replaced or added:
    spec_text(budget="{num_samples: 3}")."""
    lines = TINY_SPEC_TEXT.splitlines()
    for key, value in changes.items():
        kept, skipping = [], False
        for line in lines:
            if line.startswith(f"{key}:"):
                skipping = True  # drop the key and its indented block
            elif skipping and line.startswith(" "):
                continue
            else:
                skipping = False
                kept.append(line)
        lines = [*kept, f"{key}: {value}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- CLI


def run_cli_in_process(args: list[str], monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`sweep ARGS` through the console-script entry point in this process: (exit code, stdout + stderr)."""
    from sweep.cli import main

    monkeypatch.setattr(sys, "argv", ["sweep", *args])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else int(code)), out.out + out.err


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root, with size and modification time for files (a folder's own mtime moves
    when a probe file comes and goes, which changes nothing the user sees)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if p.is_file() else (0, 0)
    return out

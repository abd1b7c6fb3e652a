"""Shared fixtures and helpers: the one MLflow server fixture, a tiny trial, the tiny sweep spec, running the
CLI in-process, HTTP probes and folder snapshots. Test modules import helpers from here (`from conftest
import ...`), never from one another.

Tiers: tests that start Ray, an MLflow server, a subprocess or train to a target are marked `slow`;
`make test-fast` runs the rest (`-m "not slow"`), `make test` runs everything.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sweep.config import TrialConfig
from sweep.tracking import start_server, stop_process_tree, stop_servers_under

ROOT = Path(__file__).resolve().parents[1]
SWEEP = Path(sys.executable).with_name("sweep")  # the installed console script
TINY_SPEC = ROOT / "search_spaces/tests/faults_tiny.yaml"  # a sweep whose trials take seconds
TINY_SPEC_TEXT = TINY_SPEC.read_text()

TINY_TRIAL: dict[str, Any] = {
    "task": {"name": "art", "pairs": 2, "train_size": 2000, "val_size": 400, "test_size": 400, "seed": 1},
    "model": {"name": "lstm", "hidden_size": 16, "embed_size": 16, "head_size": 16},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.003, "seed": 0, "device": "cpu", "num_threads": 1},
}


# Fixtures that start a real MLflow server or Ray: a test using one is slow whatever its module says, so
# the fast tier never starts either.
SLOW_FIXTURES = {"mlflow_server", "own_mlflow", "local_ray", "first_sweep", "cluster"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks set here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if _uses_module_fixture(item):  # `make test` runs pytest-xdist with --dist loadgroup: keep a
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))  # module's cluster in one worker
    # Slow tests first: xdist hands out work in this order, so the minute-long sweeps start at once and
    # the second-long ones fill the gaps at the end, instead of a long sweep starting last and running
    # alone (a stable sort: each module's tests keep their order).
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    """Under `--dist loadgroup`, pytest-xdist groups tests by a suffix it writes into their node ids; pytest
    9.2 ignores that write (pytest-xdist#1386, open for xdist 3.8), so the groups silently fall apart and
    every worker starts its own copy of a module's cluster or sweep. Stop at once instead."""
    from importlib.metadata import version

    from packaging.version import Version  # pytest's own dependency

    def release(name: str) -> tuple[int, ...]:  # major.minor: a 9.2 pre-release has the change too
        return Version(version(name)).release[:2]

    if config.getoption("dist", "no") == "loadgroup" and release("pytest") >= (9, 2) \
            and release("pytest-xdist") <= (3, 8):
        raise pytest.UsageError(f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} "
                                "does not group tests under --dist loadgroup (pytest-xdist#1386): run "
                                "`make setup`, which installs pytest < 9.2 as pyproject.toml asks")


def _uses_module_fixture(item: pytest.Item) -> bool:
    """A test whose module-scoped fixture (a Ray cluster, an S3 server) its module's other tests share: run
    them in one xdist worker, or each worker would start its own copy. Other tests spread one by one."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else ()
    return any(d[-1].scope in ("module", "class", "package") for d in defs if d)


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


@contextlib.contextmanager
def lock_held_elsewhere(path: Path) -> Iterator[None]:
    """`path`'s OS file lock held by another live process, as a sweep's driver or a training process
    holds its folder's lock."""
    hold = (f"from filelock import FileLock; import time; lock = FileLock({str(path)!r}); "
            "lock.acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


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


# ---------------------------------------------------------------------------------------------- sweeps
# `sweep` in a subprocess, and reading back the three records (Tune's state, MLflow), for the fault and
# signal tests.


def write_spec(folder: Path, name: str, **sections: dict[str, Any]) -> Path:
    """The tiny spec under a new name, with some sections updated."""
    data = yaml.safe_load(TINY_SPEC.read_text())
    data["name"] = name
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class SweepProcess:
    """`sweep ARGS` in its own session with FWSWEEP_HOME=home; output goes to a log file."""

    def __init__(self, args: list[str], home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.log = home.parent / f"sweep-{int(time.monotonic() * 1000)}.log"
        full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        full_env |= {"FWSWEEP_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
        full_env |= env or {}
        self.started = time.monotonic()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([str(SWEEP), *args], cwd=home.parent, env=full_env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tail = self.output()[-3000:]
            raise AssertionError(f"`sweep` still running after {timeout} s:\n{tail}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)


def local_ray_process(driver: int, kind: str) -> int | None:
    """The pid of the local Ray's `kind` (raylet, gcs_server) that the `sweep` process `driver` started."""
    from sweep.tracking import _descendants

    for pid in _descendants(driver):
        with contextlib.suppress(OSError):
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            if Path(argv0).name == kind:
                return pid
    return None


def processes_of(home: Path) -> list[int]:
    """Every process whose environment carries FWSWEEP_HOME=home: the sweep, its local Ray (GCS, raylet,
    workers), its local MLflow server and anything else it started. Matching on our own unique folder
    never touches another helper's processes."""
    marker = f"FWSWEEP_HOME={home}".encode() + b"\0"
    found = []
    for env_file in glob.glob("/proc/[0-9]*/environ"):
        pid = int(env_file.split("/")[2])
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(env_file).read_bytes() + b"\0" and \
                    Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(pid)
    return found


def kill_processes_of(home: Path) -> list[int]:
    """SIGKILL every process of `processes_of(home)`."""
    killed = []
    for pid in processes_of(home):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "home"
    root.mkdir()
    yield root
    kill_processes_of(root)


def experiment_dir(home: Path, name: str) -> Path:
    return home / "sweeps" / name


def tune_trials(home: Path, name: str) -> dict[str, dict[str, Any]]:
    """trial_id -> {status, num_failures, epochs (every result row, in order), checkpoints} from Tune's
    experiment state and trial folders on disk."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_dir(home, name)))
    out = {}
    for trial in analysis.trials:
        folder = experiment_dir(home, name) / trial.storage.trial_dir_name
        rows = []
        result_file = folder / "result.json"
        if result_file.exists():
            rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        out[trial.trial_id] = {
            "status": trial.status,
            "num_failures": trial.num_failures,
            "epochs": [r.get("epoch") for r in rows],
            "diverged": any(r.get("diverged") for r in rows),
            "checkpoints": sorted(p.name for p in folder.glob("checkpoint_*")),
        }
    return out


def mlflow_runs(url: str, experiment: str) -> tuple[list[Any], list[Any]]:
    """(parent runs, trial runs) of a sweep's experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "trial_id" in r.data.tags]
    parents = [r for r in runs if "trial_id" not in r.data.tags]
    return parents, children


STEPS_PER_EPOCH = 4  # the tiny spec's train.steps_per_epoch: MLflow's step is the optimizer step


def epoch_steps(epochs: int) -> list[int]:
    """The MLflow steps of a tiny-spec trial that ran `epochs` epochs."""
    return [STEPS_PER_EPOCH * e for e in range(1, epochs + 1)]


def metric_steps(url: str, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(url).get_metric_history(run_id, key))


def run_to_end(args: list[str], home: Path, env: dict[str, str] | None = None, timeout: float = 240) -> str:
    proc = SweepProcess(args, home, env)
    rc = proc.wait(timeout)
    out = proc.output()
    assert rc == 0, f"`sweep {' '.join(args)}` exited {rc}:\n{out[-4000:]}"
    return out  # (tracebacks of failed trials in this log are Tune's error report, expected here)


def started_trials_on_disk(home: Path, name: str) -> set[str]:
    return {p.parent.name.removeprefix("trial_")
            for p in experiment_dir(home, name).glob("trial_*/result.json") if p.stat().st_size}


def trial_rows(home: Path, name: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for result in experiment_dir(home, name).glob("trial_*/result.json"):
        out[result.parent.name.removeprefix("trial_")] = [
            json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return out


RESULT_KEYS = ("epoch", "step", "val_accuracy", "test_accuracy", "elapsed_s")


def repeats_only_the_final_row(before: list[dict], after: list[dict]) -> bool:
    """A finished trial's result.json after `sweep resume`: the rows it had, then at most the same final
    result again (Tune closes a trial restored from an older checkpoint with it), never a re-trained
    epoch (which would differ in elapsed_s at least)."""
    final = [before[-1].get(k) for k in RESULT_KEYS]
    return after[: len(before)] == before and all(
        [row.get(k) for k in RESULT_KEYS] == final for row in after[len(before):])

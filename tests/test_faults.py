"""Faults injected for real into running sweeps, and what survives them.

Every sweep here is the tiny spec search_spaces/tests/faults_tiny.yaml (LSTM, hidden 8, 256 sequences,
3 epochs of 4 steps) run by the real `sweep` CLI in a subprocess against a real MLflow server on a free
loopback port; faults come from sweep/testing_faults.py (FWSWEEP_FAULT), from signals sent to real
processes, or from stopping real servers. Afterwards Ray Tune's experiment state, the Optuna study and
the MLflow runs are read back and compared. docs/reliability.md records the results.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SWEEP,
    TINY_SPEC,
    SweepProcess,
    epoch_steps,
    experiment_dir,
    kill_processes_of,
    local_ray_process,
    metric_steps,
    mlflow_runs,
    repeats_only_the_final_row,
    run_to_end,
    started_trials_on_disk,
    trial_rows,
    tune_trials,
    wait_until,
    write_spec,
)
from ray_cluster import port_clash

from sweep import testing_faults
from sweep.store import parse_history
from sweep.tracking import free_port

# ---------------------------------------------------------------------------------------------- helpers


class MlflowServer:
    """A real `mlflow server` (SQLite + artifact folder) that can be stopped and restarted on its port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port: int | None = None
        self.pid: int | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from sweep.tracking import start_server

        server = start_server(self.folder, port=self.port)
        self.port = int(server.url.rsplit(":", 1)[1])
        self.pid = server.pid

    def stop(self) -> None:
        from sweep.tracking import stop_process_tree

        if self.pid:
            stop_process_tree(self.pid, grace_s=5)
            self.pid = None


@pytest.fixture
def own_mlflow(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server of this test's own (the shared session server must not be stopped by a test)."""
    server = MlflowServer(tmp_path / "mlflow")
    yield server
    server.stop()


# -- reading the three records back


def optuna_trials(home: Path, name: str, retried: bool = True) -> list[Any]:
    """The Optuna study's trials, from the newest searcher state Tune saved; `retried=False` leaves out
    the failed ones that a later trial ran again (system attribute `failed_trial`, Optuna's convention)."""
    files = sorted(experiment_dir(home, name).glob("searcher-state-*.pkl"))  # newest session last
    assert files, f"no saved searcher state in {experiment_dir(home, name)}"
    with open(files[-1], "rb") as fh:
        state = pickle.load(fh)
    trials = state["_ot_study"].get_trials(deepcopy=False)
    again = {t.system_attrs.get("failed_trial") for t in trials}
    return trials if retried else [t for t in trials if t.number not in again]


# ---------------------------------------------------------------------------------------------- disk


def _tiny_state() -> dict[str, Any]:
    import torch

    return {"w": torch.arange(1000, dtype=torch.float32)}


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (disk full) leaves the earlier checkpoint whole and no partial one."""
    import torch

    from sweep import checkpoint as ck

    good = ck.save_checkpoint(tmp_path, 1, _tiny_state(), {"epoch": 1}, "a: 1\n")
    real_save = torch.save

    def disk_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # leave a truncated file behind, as a full disk does
            fh.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    for step in (2, 1):  # a new step, and the same step written again after a resume
        with pytest.raises(OSError, match="No space left"):
            ck.save_checkpoint(tmp_path, step, {"w": torch.zeros(1000)}, {"epoch": step}, "a: 1\n")
        assert ck.list_checkpoints(tmp_path) == [good]
        assert ck.find_checkpoint(tmp_path) == good
        assert sorted(p.name for p in tmp_path.iterdir()) == [good.name], "a partial checkpoint was left"
        state, meta = ck.load_checkpoint(good)
        assert torch.equal(state["w"], _tiny_state()["w"]) and meta == {"epoch": 1}


def test_a_killed_workers_scratch_folder_is_removed_by_the_next_trial(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial's scratch folder (its checkpoints before Tune persists them) outlives a worker killed
    mid-trial; the next trial on the node removes it, and only folders whose process is gone."""
    from sweep import paths

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen(["true"])  # a process that has ended: nothing runs under its pid
    ended.wait()
    folders = {
        "dead": tmp_path / f"{paths.TRIAL_SCRATCH_PREFIX}{ended.pid}-abc",
        "alive": tmp_path / f"{paths.TRIAL_SCRATCH_PREFIX}{os.getppid()}-def",  # another live process's
        "unnamed": tmp_path / f"{paths.TRIAL_SCRATCH_PREFIX}k2j4_x9q",  # no pid in its name: left alone
        "other": tmp_path / "somebody-else",
    }
    for folder in folders.values():
        (folder / "checkpoints").mkdir(parents=True)
    new = paths.trial_scratch_dir()
    assert new.is_dir() and new.parent == tmp_path and new.name.startswith(f"fwsweep-trial-{os.getpid()}-")
    assert not folders["dead"].exists(), "the dead worker's folder was kept"
    assert all(folders[k].is_dir() for k in ("alive", "unnamed", "other"))


def test_only_the_last_k_checkpoints_are_kept(tmp_path: Path) -> None:
    from sweep import checkpoint as ck

    for step in range(1, 6):
        ck.save_checkpoint(tmp_path, step, _tiny_state(), {"epoch": step}, "")
        ck.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [ck.checkpoint_name(4), ck.checkpoint_name(5)]


def test_keep_checkpoints_reaches_tune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.keep_checkpoints is Tune's CheckpointConfig(num_to_keep) too, so Tune's copies stay bounded."""
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path))
    from sweep.config import load_spec
    from sweep.runner import build_tuner

    spec = load_spec(TINY_SPEC).model_copy(deep=True)
    spec.train.keep_checkpoints = 3
    tuner = build_tuner(spec)
    assert tuner._local_tuner.get_run_config().checkpoint_config.num_to_keep == 3


# ---------------------------------------------------------------------------------------------- sweeps


def trial_runs_by_id(url: str, experiment: str) -> dict[str, Any]:
    parents, children = mlflow_runs(url, experiment)
    ids = [r.data.tags["trial_id"] for r in children]
    assert len(ids) == len(set(ids)), f"duplicated MLflow runs: {sorted(ids)}"
    return {r.data.tags["trial_id"]: r for r in children}


def artifact_text(url: str, run_id: str, path: str) -> str:
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=url)).read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failing_trials_are_recorded_everywhere_and_retried_from_checkpoints(
        mlflow_server: str, home: Path, tmp_path: Path) -> None:
    """One sweep, four trials run one at a time, three faults (retries.max_failures: 1):
    a trial whose loss goes NaN at epoch 1 (not retried), one that raises at epoch 2 twice (retried once,
    then failed), one whose worker process dies at epoch 3 (retried from its epoch-2 checkpoint, finishes),
    and one untouched. The sweep must go on past all of them."""
    spec = write_spec(tmp_path, "faults-fail", budget={"num_samples": 4, "max_concurrent": 1},
                      retries={"max_failures": 1})
    env = {"FWSWEEP_FAULT": "nan@1x1;raise@2x2;crash@3x1", "FWSWEEP_FAULT_STATE": str(tmp_path / "faults")}
    copies_before = restored_copies_in_temp()
    run_to_end(["run", str(spec), "--tracking-uri", mlflow_server], home, env)
    assert restored_copies_in_temp() <= copies_before, "a restored checkpoint was left in the temp folder"

    trials = tune_trials(home, "faults-fail")
    assert len(trials) == 4
    diverged = [t for t, v in trials.items() if v["diverged"]]
    errored = [t for t, v in trials.items() if v["status"] == "ERROR"]
    crashed = [t for t, v in trials.items() if v["status"] == "TERMINATED" and v["num_failures"] == 1]
    clean = [t for t, v in trials.items() if v["num_failures"] == 0 and not v["diverged"]]
    assert len(diverged) == len(errored) == len(crashed) == len(clean) == 1, trials
    nan_trial = trials[diverged[0]]
    assert (nan_trial["status"], nan_trial["num_failures"], nan_trial["epochs"]) == ("TERMINATED", 0, [1])
    assert trials[errored[0]]["num_failures"] == 2 and trials[errored[0]]["epochs"] == [1]
    assert trials[crashed[0]]["epochs"] == [1, 2, 3], "the retry did not continue from the epoch-2 checkpoint"
    assert trials[clean[0]]["epochs"] == [1, 2, 3]
    assert all(len(v["checkpoints"]) <= 2 for v in trials.values()), "more than keep_checkpoints kept"

    study = optuna_by_tune_trial(home, "faults-fail")
    assert set(study) == set(trials)
    assert study[errored[0]].state.name == "FAIL"
    assert all(study[t].state.name == "COMPLETE" for t in (crashed[0], clean[0]))

    runs = trial_runs_by_id(mlflow_server, "faults-fail")
    assert set(runs) == set(trials)
    failed = runs[errored[0]]
    assert failed.info.status == "FAILED"
    assert "InjectedFault" in failed.data.tags.get("error", "")
    assert "fault injected on purpose" in artifact_text(mlflow_server, failed.info.run_id, "error.txt")
    assert runs[crashed[0]].info.status == "FINISHED" and runs[crashed[0]].data.tags.get("retries") == "1"
    assert "worker process has died" in runs[crashed[0]].data.tags.get("last_error", "")
    for tid in (crashed[0], clean[0]):
        assert metric_steps(mlflow_server, runs[tid].info.run_id, "val_accuracy") == epoch_steps(3)
    nan_run = runs[diverged[0]]
    assert nan_run.info.status == "FAILED", "a diverged trial must be FAILED in MLflow"
    assert "diverged" in nan_run.data.tags.get("error", "").lower()
    parents, _ = mlflow_runs(mlflow_server, "faults-fail")
    assert [p.info.status for p in parents] == ["FINISHED"]


def restored_copies_in_temp() -> set[str]:
    """Folders Tune's Checkpoint.to_directory() makes when given no path (trial workers share our temp)."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("checkpoint_tmp_*")}


def optuna_by_tune_trial(home: Path, name: str) -> dict[str, Any]:
    """Tune trial id -> its Optuna trial, from the searcher state Tune saved."""
    files = sorted(experiment_dir(home, name).glob("searcher-state-*.pkl"))  # newest session last
    with open(files[-1], "rb") as fh:
        state = pickle.load(fh)
    study_trials = {t.number: t for t in state["_ot_study"].get_trials(deepcopy=False)}
    return {tid: study_trials[ot.number] for tid, ot in state["_ot_trials"].items()}


def finished_trials_on_disk(home: Path, name: str, epochs: int) -> dict[str, list[int]]:
    """trial_id -> epochs in result.json, for trials whose last epoch is on disk (read without Ray)."""
    out = {}
    for result in experiment_dir(home, name).glob("trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows and rows[-1].get("epoch") == epochs:
            out[result.parent.name.removeprefix("trial_")] = [r.get("epoch") for r in rows]
    return out


def saved_as_terminated(home: Path, name: str) -> set[str]:
    """The trials Tune's last saved experiment state holds as finished (none while it is being replaced)."""
    states = sorted(experiment_dir(home, name).glob("experiment_state-*.json"))
    try:
        saved = json.loads(states[-1].read_text())["trial_data"] if states else []
        trials = [json.loads(entry[0]) for entry in saved]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return set()
    return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}


def trial_runs_so_far(url: str, name: str) -> list[Any]:
    """The trial runs of sweep `name` in MLflow (none while its experiment does not exist yet)."""
    from mlflow import MlflowClient

    if MlflowClient(url).get_experiment_by_name(name) is None:
        return []
    return mlflow_runs(url, name)[1]


def running_trial_runs(url: str, name: str) -> list[str]:
    """The RUNNING trial runs of sweep `name` in MLflow."""
    return [r.info.run_id for r in trial_runs_so_far(url, name) if r.info.status == "RUNNING"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_driver_is_resumed_without_rerunning_or_duplicating(
        mlflow_server: str, home: Path, tmp_path: Path) -> None:
    """SIGKILL to `sweep run` once a trial has finished and others are mid-way; `sweep resume` then
    finishes the sweep: the finished trial does not run again, no MLflow run is duplicated or left
    RUNNING, every metric step is logged once, and Optuna's study holds each trial exactly once."""
    name, epochs = "faults-driver", 3
    spec = write_spec(tmp_path, name, budget={"num_samples": 3, "max_concurrent": 2})
    env = {"FWSWEEP_FAULT": "slow=3"}  # ~10 s per trial: time to kill the sweep mid-way, even when loaded
    run = SweepProcess(["run", str(spec), "--tracking-uri", mlflow_server], home, env)
    wait_until(lambda: finished_trials_on_disk(home, name, epochs) and
               len(started_trials_on_disk(home, name)) >= 2 or run.proc.poll() is not None,
               150, "a finished trial and a running one")
    wait_until(lambda: set(finished_trials_on_disk(home, name, epochs)) <= saved_as_terminated(home, name) or
               run.proc.poll() is not None, 60, "Tune's saved experiment state to hold the finished trial")
    # the live logging runs behind the trials (more so on a loaded machine): wait for a run it opened
    wait_until(lambda: running_trial_runs(mlflow_server, name) or run.proc.poll() is not None, 60,
               "an MLflow run of a running trial")
    assert run.proc.poll() is None, f"the sweep ended before it could be killed:\n{run.output()[-3000:]}"
    run.signal(signal.SIGKILL)
    run.wait(10)
    time.sleep(1)
    kill_processes_of(home)  # the dead driver's local Ray goes with it, as when its machine dies
    finished_before = finished_trials_on_disk(home, name, epochs)
    _, runs_before = mlflow_runs(mlflow_server, name)
    running_before = [r.info.run_id for r in runs_before if r.info.status == "RUNNING"]
    assert running_before, "no MLflow run was RUNNING when the driver died"

    run_to_end(["resume", name, "--tracking-uri", mlflow_server], home, env)

    trials = tune_trials(home, name)
    assert len(trials) == 3 and all(t["status"] == "TERMINATED" for t in trials.values()), trials
    for tid, epochs_before in finished_before.items():
        assert trials[tid]["epochs"] == epochs_before, f"finished trial {tid} ran again"
    for tid, t in trials.items():
        assert t["epochs"] == [1, 2, 3], f"trial {tid}: epochs {t['epochs']} (repeated or missing)"
    runs = trial_runs_by_id(mlflow_server, name)
    assert set(runs) == set(trials)
    assert {r.info.run_id for r in runs_before} <= {r.info.run_id for r in runs.values()}, "runs replaced"
    parents, children = mlflow_runs(mlflow_server, name)
    assert len(parents) == 1 and all(r.info.status == "FINISHED" for r in parents + children)
    for tid, run_ in runs.items():  # one value per step, none missing (also for trials in flight at the kill)
        assert metric_steps(mlflow_server, run_.info.run_id, "val_accuracy") == epoch_steps(3), tid
    study = optuna_by_tune_trial(home, name)
    assert set(study) == set(trials) and all(t.state.name == "COMPLETE" for t in study.values())
    assert len(optuna_trials(home, name)) == 3, "the Optuna study lost or repeated a trial"


class RayNode:
    """`ray start --block` in its own session; killing it takes its raylet and workers with it."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([str(SWEEP.with_name("ray")), "start", "--block", *args], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: "Ray runtime started" in log.read_text(errors="replace") or
                   self.proc.poll() is not None, 90, f"`ray start` ({log.name})")
        assert self.proc.poll() is None, log.read_text()[-3000:]

    def processes(self) -> set[int]:
        from sweep.tracking import _descendants

        return {self.proc.pid, *_descendants(self.proc.pid)}

    def kill(self) -> None:
        """SIGKILL the node's process tree by pid (never `ray stop`: other Ray clusters share this host)."""
        victims = self.processes()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)


def _start_head(args: list[str], env: dict[str, str], log: Path, tries: int = 3) -> int:
    """A head node on a free port; its GCS port. A port taken by another process between free_port() and
    Ray's bind (a race on a busy machine) is retried on another one, never anything else."""
    for attempt in range(tries):
        port = free_port()
        try:
            RayNode(["--head", f"--port={port}", f"--ray-client-server-port={free_port()}", *args], env, log)
            return port
        except AssertionError:
            if attempt == tries - 1 or not port_clash(log.read_text(errors="replace")):
                raise
    raise AssertionError("unreachable")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lost_worker_node_trials_finish_on_the_remaining_node(
        mlflow_server: str, home: Path, tmp_path: Path) -> None:
    """A two-node local Ray cluster (head + worker, one CPU each); once the trial on the worker node has a
    checkpoint, the worker node's processes are SIGKILLed. Its trial must be rescheduled on the head
    from its last checkpoint and finish; the other trial is untouched."""
    name = "faults-node"
    temp_dir = Path(f"/tmp/fwr{os.getpid()}")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"FWSWEEP_HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "4",
            "FWSWEEP_FAULT": "slow=2"}  # trials run in the nodes' worker processes: their env counts
    try:
        port = _start_head(["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp_dir}",
                            "--include-dashboard=false", "--disable-usage-stats"], env, tmp_path / "head.log")
        worker = RayNode([f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1"], env,
                         tmp_path / "worker.log")
        spec = write_spec(tmp_path, name, budget={"num_samples": 2, "max_concurrent": 2},
                          train={"epochs": 4}, retries={"max_failures": 2})
        run = SweepProcess(["run", str(spec), "--address", f"127.0.0.1:{port}",
                            "--tracking-uri", mlflow_server],
                           home, {"RAY_AUTH_MODE": "disabled"})

        def trial_on_worker() -> str | None:
            pids = worker.processes()
            return next((tid for tid, rows in trial_rows(home, name).items()
                         if rows and rows[-1]["pid"] in pids and rows[-1].get("checkpoint_dir_name")), None)

        lost = wait_until(lambda: trial_on_worker() or run.proc.poll() is not None, 150,
                          "a checkpointed trial on the worker node")
        assert run.proc.poll() is None, run.output()[-3000:]
        lost_node = trial_rows(home, name)[lost][-1]["node_id"]
        worker.kill()
        assert run.wait(200) == 0, run.output()[-4000:]
    finally:
        kill_processes_of(home)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)

    trials = tune_trials(home, name)
    assert all(t["status"] == "TERMINATED" for t in trials.values()), trials
    assert trials[lost]["num_failures"] >= 1, "the lost node's trial was never seen to fail"
    assert trials[lost]["epochs"] == [1, 2, 3, 4], f"not resumed from a checkpoint: {trials[lost]['epochs']}"
    nodes = [r["node_id"] for r in trial_rows(home, name)[lost]]
    assert nodes[0] == lost_node and nodes[-1] != lost_node, f"did not move off the lost node: {nodes}"
    print(f"lost trial ran its epochs on nodes {[n[:8] for n in nodes]}")
    runs = trial_runs_by_id(mlflow_server, name)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert metric_steps(mlflow_server, runs[lost].info.run_id, "val_accuracy") == epoch_steps(4)


def logged_steps(url: str, name: str) -> dict[str, list[int]]:
    """trial_id -> val_accuracy steps in MLflow; {} while the server does not answer."""
    try:
        runs = trial_runs_by_id(url, name)
        return {tid: metric_steps(url, r.info.run_id, "val_accuracy") for tid, r in runs.items()}
    except Exception:  # noqa: BLE001 - not there yet, or the server is down
        return {}


def sweep_holding_its_last_epoch(url: str, name: str, epochs: int, faults: str, home: Path, tmp_path: Path
                                 ) -> tuple[SweepProcess, Path]:
    """`sweep run` of 2 tiny trials logging to `url`, their last epoch held back until the test deletes the
    returned hold file, once a first metric is in MLflow; `faults`: more FWSWEEP_FAULT directives."""
    spec = write_spec(tmp_path, name, budget={"num_samples": 2, "max_concurrent": 2},
                      train={"epochs": epochs})
    state = tmp_path / "faults"
    state.mkdir()
    hold = state / testing_faults.HOLD_FILE
    hold.touch()
    directives = ";".join(d for d in (faults, f"hold@{epochs}") if d)
    run = SweepProcess(["run", str(spec), "--tracking-uri", url], home,
                       {"FWSWEEP_FAULT": directives, "FWSWEEP_FAULT_STATE": str(state)})
    wait_until(lambda: any(logged_steps(url, name).values()) or run.proc.poll() is not None, 150,
               "a first metric in MLflow")
    assert run.proc.poll() is None, run.output()[-3000:]
    return run, hold


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tracking_server_outage_loses_no_metric(own_mlflow: MlflowServer, home: Path, tmp_path: Path) -> None:
    """The MLflow server process tree is stopped for >= 20 s mid-sweep and restarted on the same port and
    database. Trials keep training meanwhile; what they reported during the outage reaches MLflow once it
    is back, and no step is missing or logged twice."""
    # 3 s per epoch (slow=3): trials train on during the outage. Their last epoch waits (hold) until the
    # server is back, so the sweep is still running then however long a loaded machine takes to restart it
    # (under load the sweep had ended and given up on MLflow while the server was still booting).
    name, epochs, outage_s = "faults-mlflow", 16, 20  # epochs: room to train on during the outage
    run, hold = sweep_holding_its_last_epoch(own_mlflow.url, name, epochs, "slow=3", home, tmp_path)
    own_mlflow.stop()
    down_at = time.monotonic()
    rows_at_stop = {tid: len(rows) for tid, rows in trial_rows(home, name).items()}
    time.sleep(outage_s)
    rows_at_restart = {tid: len(rows) for tid, rows in trial_rows(home, name).items()}
    own_mlflow.start()
    down_s = time.monotonic() - down_at
    assert run.proc.poll() is None, run.output()[-3000:]
    hold.unlink()
    assert run.wait(200) == 0, run.output()[-4000:]

    grew = {tid: rows_at_restart.get(tid, 0) - rows_at_stop.get(tid, 0) for tid in rows_at_restart}
    assert sum(grew.values()) >= 2, f"trials did not train during the outage: {grew}"
    steps = logged_steps(own_mlflow.url, name)
    assert len(steps) == 2
    for tid, logged in steps.items():
        assert logged == epoch_steps(epochs), f"trial {tid}: steps in MLflow {logged}"
    parents, children = mlflow_runs(own_mlflow.url, name)
    assert all(r.info.status == "FINISHED" for r in parents + children)
    print(f"MLflow down {down_s:.0f} s; epochs reported meanwhile: {grew}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_tracking_server_is_not_waited_for_at_the_end(own_mlflow: MlflowServer, home: Path,
                                                              tmp_path: Path) -> None:
    """The server's processes stopped (SIGSTOP: it accepts connections and never answers, as behind a
    network that drops packets) mid-sweep: the sweep ends soon after its trials, exit 3 with the `sweep
    sync` to run. Before, its end waited ~95 s on one request's retries (15 s timeouts, 3 retries) after the
    last trial; then `sweep sync` with the server back makes MLflow level."""
    import psutil

    name, epochs = "faults-hung", 3
    server = psutil.Process(own_mlflow.pid)
    tree = [server, *server.children(recursive=True)]
    try:
        run, hold = sweep_holding_its_last_epoch(own_mlflow.url, name, epochs, "", home, tmp_path)
        for proc in tree:
            proc.suspend()
        hold.unlink()
        released = time.monotonic()
        assert run.wait(120) == 3, run.output()[-4000:]
        ended_s = time.monotonic() - released
    finally:
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.resume()
    assert ended_s < 60, f"the sweep's end waited {ended_s:.0f} s on a hung server"
    out = run.output()
    assert "no answer to GET /health for 10 s" in out and f"sweep sync {name}" in out, out[-3000:]
    run_to_end(["sync", name, "--tracking-uri", own_mlflow.url], home)
    assert logged_steps(own_mlflow.url, name) == {tid: epoch_steps(epochs) for tid in tune_trials(home, name)}
    print(f"ended {ended_s:.0f} s after the last epoch was released")


@pytest.mark.slow
def test_unreachable_tracking_server_refuses_to_start(home: Path, tmp_path: Path) -> None:
    """An explicit tracking URI nobody answers: exit 2 before Ray starts or anything is written."""
    spec = write_spec(tmp_path, "faults-nosrv")
    proc = SweepProcess(["run", str(spec), "--tracking-uri", f"http://127.0.0.1:{free_port()}"], home)
    assert proc.wait(60) == 2
    out = proc.output()
    assert "no MLflow server answers" in out and "Traceback" not in out, out
    assert not any(home.iterdir()), "something was written"


def test_fault_directives_fire_as_often_as_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook itself: `raise@2x1` fails one report of epoch 2 across all reporters, then lets it pass;
    `hold@2` keeps the report of epoch 2 back while the hold file exists."""
    import threading

    from sweep.reporter import NullReporter

    fault = testing_faults.Fault
    assert testing_faults.parse("nan@1x1; raise@2x2;crash@3;slow=0.5") == [
        fault("nan", 1, 1), fault("raise", 2, 2), fault("crash", 3), fault("slow", value=0.5)]
    with pytest.raises(ValueError, match="KIND"):
        testing_faults.parse("explode@1")
    inner = NullReporter()
    monkeypatch.delenv(testing_faults.ENV, raising=False)
    assert testing_faults.wrap(inner) is inner  # off unless asked for
    monkeypatch.setenv(testing_faults.ENV, "raise@2x1")
    monkeypatch.setenv(testing_faults.STATE_ENV, str(tmp_path))
    first, second = testing_faults.wrap(inner), testing_faults.wrap(inner)
    first.report({"epoch": 1})
    with pytest.raises(testing_faults.InjectedFault):
        first.report({"epoch": 2})
    second.report({"epoch": 2})  # the budget of one is spent
    assert [m["epoch"] for m in inner.history] == [1, 2]

    monkeypatch.setenv(testing_faults.ENV, "hold@2")
    held, hold = NullReporter(), tmp_path / testing_faults.HOLD_FILE
    hold.touch()
    reporter = testing_faults.wrap(held)
    reporter.report({"epoch": 1})
    waiting = threading.Thread(target=reporter.report, args=({"epoch": 2},))
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive() and [m["epoch"] for m in held.history] == [1]
    hold.unlink()
    waiting.join(5.0)
    assert not waiting.is_alive() and [m["epoch"] for m in held.history] == [1, 2]


# ---------------------------------------------------------------------------------------------- agreement


def assert_records_agree(home: Path, name: str, url: str) -> dict[str, int]:
    """After `resume`/`sync`: Tune trials = Optuna trials = MLflow child runs, one parent, no run RUNNING,
    every result row of every trial in MLflow at its step exactly once, and no step there that the records
    lack. Returns the counts (for the docs)."""
    trials = tune_trials(home, name)
    study = optuna_by_tune_trial(home, name)
    parents, children = mlflow_runs(url, name)
    ids = [r.data.tags["trial_id"] for r in children]
    rows = trial_rows(home, name)
    duplicate = missing = extra = 0
    for run in children:
        logged = metric_steps(url, run.info.run_id, "val_accuracy")
        expected = {r["step"] for r in rows.get(run.data.tags["trial_id"], []) if "val_accuracy" in r}
        duplicate += len(logged) - len(set(logged))
        missing += len(expected - set(logged))
        extra += len(set(logged) - expected)  # a step MLflow got live that the records lost
    counts = {"tune": len(trials), "optuna": len(optuna_trials(home, name, retried=False)),
              "mlflow_children": len(children),
              "parents": len(parents), "running": sum(r.info.status == "RUNNING" for r in parents + children),
              "duplicate_steps": duplicate, "missing_steps": missing, "extra_steps": extra}
    print(f"{name}: {counts}")
    assert set(study) == set(trials), "Tune and Optuna disagree"
    assert sorted(ids) == sorted(trials), f"MLflow runs {sorted(ids)} vs Tune trials {sorted(trials)}"
    assert counts["tune"] == counts["optuna"] == counts["mlflow_children"]
    assert (counts["parents"], counts["running"], duplicate, missing, extra) == (1, 0, 0, 0, 0), counts
    return counts


def any_trial_started(home: Path, name: str) -> bool:
    return any(experiment_dir(home, name).glob("trial_*"))


KILL_POINTS: dict[str, Callable[[Path, str], bool]] = {
    # right after Tune started a trial (its folder exists), before it reported anything
    "trial started": any_trial_started,
    # a first epoch reported (Tune's result row on disk)
    "first result": lambda home, name: bool(started_trials_on_disk(home, name)),
    # one trial finished and another is running
    "trial finished": lambda home, name: bool(finished_trials_on_disk(home, name, 3))
    and len(started_trials_on_disk(home, name)) >= 2,
    # every trial of the budget started
    "all started": lambda home, name: len(started_trials_on_disk(home, name)) >= 3,
    # Tune is done: the driver exports and brings MLflow level (the kill lands in that reconcile)
    "in the final sync": lambda home, name: (experiment_dir(home, name) / "exports" / "best.yaml").exists(),
}


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_driver_killed_at_any_point_then_resume_agrees(point: str, mlflow_server: str, home: Path,
                                                       tmp_path: Path) -> None:
    """`kill -9` of the driver (and its local Ray) at five points of a 3-trial sweep; then `sweep resume`
    (or `sweep run` again when Tune had saved no state yet). The three records must agree, every trial
    ends with epochs [1, 2, 3] once, a trial finished before the kill does not run again, and the MLflow
    runs of the killed driver are the ones continued, not replaced."""
    name = "kill-" + point.replace(" ", "-")
    spec = write_spec(tmp_path, name, budget={"num_samples": 3, "max_concurrent": 2})
    env = {"FWSWEEP_FAULT": "slow=1.5"}
    run = SweepProcess(["run", str(spec), "--tracking-uri", mlflow_server], home, env)
    wait_until(lambda: KILL_POINTS[point](home, name) or run.proc.poll() is not None, 240, point)
    assert run.proc.poll() is None, f"the sweep ended before {point}:\n{run.output()[-3000:]}"
    run.signal(signal.SIGKILL)
    run.wait(10)
    kill_processes_of(home)  # its local Ray goes with it, as when the machine dies
    from ray.tune import Tuner

    finished_before = {tid: rows for tid, rows in trial_rows(home, name).items()
                       if tid in finished_trials_on_disk(home, name, 3)}
    runs_before = {r.info.run_id for r in trial_runs_so_far(mlflow_server, name)}
    saved = Tuner.can_restore(str(experiment_dir(home, name)))
    again = ["resume", name] if saved else ["run", str(spec)]
    run_to_end([*again, "--tracking-uri", mlflow_server], home, env)
    counts = assert_records_agree(home, name, mlflow_server)
    assert counts["tune"] == 3
    trials, rows = tune_trials(home, name), trial_rows(home, name)
    assert all(t["status"] == "TERMINATED" for t in trials.values()), trials
    for tid, before in finished_before.items():  # a kill before Tune's snapshot: the final row once more
        assert repeats_only_the_final_row(before, rows[tid]), f"finished trial {tid} ran again"
    for tid in trials:
        mine = rows.get(tid, [])
        epochs = [row["epoch"] for row in mine]
        once = epochs[:-1] if len(mine) > 1 and repeats_only_the_final_row(mine[:-1], mine) else epochs
        assert once == [1, 2, 3], f"trial {tid}: epochs {epochs} (repeated or missing)"
    assert runs_before <= {r.info.run_id for r in trial_runs_so_far(mlflow_server, name)}, "runs replaced"
    assert len(optuna_trials(home, name)) == 3, "the Optuna study lost or repeated a trial"


def checkpoint_ahead_of_records(home: Path, name: str) -> bool:
    """A trial whose newest whole checkpoint on the sweep's storage is of a later epoch than the rows of its
    saved result.json (at least one): Tune registered it after its last save of the experiment state."""
    for folder in experiment_dir(home, name).glob("trial_*"):
        result = folder / "result.json"
        rows = len(parse_history(result.read_text())) if result.exists() else 0  # a torn last line: not saved
        whole = [int(meta.parent.name.removeprefix("checkpoint_"))
                 for meta in folder.glob("checkpoint_*/meta.json")]
        if rows and max(whole, default=-1) + 1 > rows:  # checkpoint_00000K holds epoch K + 1
            return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_killed_after_a_checkpoint_newer_than_the_records_resumes_without_a_gap(
        mlflow_server: str, home: Path, tmp_path: Path) -> None:
    """Tune saves its results with its experiment state, on a timer (every 4 s here); with one checkpoint
    kept, a driver killed after a trial's next checkpoint and before the next save leaves records that end
    an epoch (or more) before the only checkpoint left. `sweep resume` goes on from that checkpoint and
    reports the epochs between from its history: the trial's records hold every epoch once."""
    name = "kill-ahead"
    spec = write_spec(tmp_path, name, train={"epochs": 6, "keep_checkpoints": 1},
                      budget={"num_samples": 1, "max_concurrent": 1})
    env = {"FWSWEEP_FAULT": "slow=1.0", "TUNE_GLOBAL_CHECKPOINT_S": "4"}
    run = SweepProcess(["run", str(spec), "--tracking-uri", mlflow_server], home, env)
    wait_until(lambda: checkpoint_ahead_of_records(home, name) or run.proc.poll() is not None, 240,
               "a checkpoint newer than the saved records", interval=0.1)
    assert run.proc.poll() is None, f"the sweep ended first:\n{run.output()[-3000:]}"
    run.signal(signal.SIGKILL)
    run.wait(10)
    kill_processes_of(home)
    (before,) = trial_rows(home, name).values()
    assert len(before) < 6, before
    run_to_end(["resume", name, "--tracking-uri", mlflow_server], home, env)
    assert_records_agree(home, name, mlflow_server)
    (result,) = experiment_dir(home, name).glob("trial_*/result.json")
    rows = result.read_text()
    assert [row["epoch"] for row in parse_history(rows)] == [1, 2, 3, 4, 5, 6], rows


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_tracking_server_gone_for_good_exits_nonzero_then_sync_completes(
        own_mlflow: MlflowServer, home: Path, tmp_path: Path) -> None:
    """The sweep's (explicit) MLflow server is killed mid-sweep and not brought back while it runs: the
    sweep trains on, then exits 3 saying how many results MLflow lacks and to run `sweep sync`. Once the
    server is back, `sweep sync` makes the three records agree."""
    name = "faults-gone"
    spec = write_spec(tmp_path, name, budget={"num_samples": 3, "max_concurrent": 2})
    run = SweepProcess(["run", str(spec), "--tracking-uri", own_mlflow.url], home,
                       {"FWSWEEP_FAULT": "slow=1.5"})
    wait_until(lambda: any(logged_steps(own_mlflow.url, name).values()) or run.proc.poll() is not None, 240,
               "a first metric in MLflow")
    assert run.proc.poll() is None, run.output()[-3000:]
    own_mlflow.stop()  # for good, as far as this sweep is concerned
    rc = run.wait(300)
    out = run.output()
    assert rc == 3, f"exit {rc}:\n{out[-3000:]}"
    assert "not in MLflow yet" in out and f"sweep sync {name}" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    own_mlflow.start()  # the user brings it back (same port, same database)
    run_to_end(["sync", name, "--tracking-uri", own_mlflow.url], home)
    assert_records_agree(home, name, own_mlflow.url)
    again = run_to_end(["sync", name, "--tracking-uri", own_mlflow.url], home)
    assert "0 run(s) created, 0 result row(s) backfilled, 0 status(es) set" in again, again


def _mount_read_only(folder: Path) -> bool:
    """Bind-mount `folder` read-only over itself (root with CAP_SYS_ADMIN); False where not permitted."""
    proc = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True)
    return proc.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_read_only_sweeps_folder_ends_with_one_message_and_resume_agrees(
        mlflow_server: str, home: Path, tmp_path: Path) -> None:
    """The sweeps folder turns read-only mid-sweep (a read-only bind mount over it): the sweep stops with
    one message naming the folder and `sweep resume`, exit 2, no traceback. Writable again, `sweep resume`
    finishes it and the three records agree."""
    name = "faults-ro"
    spec = write_spec(tmp_path, name, budget={"num_samples": 3, "max_concurrent": 2})
    env = {"FWSWEEP_FAULT": "slow=1.5"}
    run = SweepProcess(["run", str(spec), "--tracking-uri", mlflow_server], home, env)
    wait_until(lambda: started_trials_on_disk(home, name) or run.proc.poll() is not None, 240,
               "a first result")
    assert run.proc.poll() is None, run.output()[-3000:]
    sweeps = home / "sweeps"
    if not _mount_read_only(sweeps):
        run.signal(signal.SIGKILL)
        pytest.skip("a read-only bind mount needs root with CAP_SYS_ADMIN")
    try:
        rc = run.wait(300)
    finally:
        subprocess.run(["umount", str(sweeps)], check=True)
    out = run.output()
    assert rc == 2, f"exit {rc}:\n{out[-3000:]}"
    assert "writing the sweep's state failed" in out and f"sweep resume {name}" in out, out[-3000:]
    assert "Traceback" not in out and "Unhandled error" not in out, out[-3000:]
    kill_processes_of(home)
    run_to_end(["resume", name, "--tracking-uri", mlflow_server], home, env)
    counts = assert_records_agree(home, name, mlflow_server)
    assert counts["tune"] == 3


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_object_store_outage_ends_with_one_message_and_resume_agrees(
        mlflow_server: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's object store (moto's S3 server) stops answering mid-sweep: the sweep stops with one
    message naming the store and `sweep resume`, exit 2, no traceback (not a cascade of failed trials and
    Tune's upload errors). The store back on the same port with its data, `sweep resume` finishes the
    sweep: every trial done, none failed, MLflow level."""
    import boto3
    from fixtures_s3 import CREDENTIALS
    from moto.server import ThreadedMotoServer

    from sweep.store import open_sweep

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                 region_name="us-east-1").create_bucket(Bucket="outage")
    name, uri = "faults-s3-outage", "s3://outage/sweeps"
    spec = write_spec(tmp_path, name, budget={"num_samples": 3, "max_concurrent": 2})
    env = CREDENTIALS | {"FWSWEEP_S3_ENDPOINT": endpoint, "FWSWEEP_FAULT": "slow=1.5"}
    args = ["--storage", uri, "--tracking-uri", mlflow_server]
    try:
        run = SweepProcess(["run", str(spec), *args], home, env)
        wait_until(lambda: "started " in run.output() or run.proc.poll() is not None, 240, "a first trial")
        time.sleep(2)  # a first epoch reported and uploaded
        assert run.proc.poll() is None, run.output()[-3000:]
        server.stop()  # connections refused from now on; moto keeps the bucket's objects in this process
        stopped = time.monotonic()
        rc = run.wait(180)
        out = run.output()
        assert rc == 2, f"exit {rc}:\n{out[-3000:]}"
        assert time.monotonic() - stopped < 90, "took too long to notice the outage"
        flat = " ".join(out.split())
        assert uri in flat and f"sweep resume {name}" in flat and "did not answer" in flat, out[-3000:]
        assert "invalid input" not in out, out[-3000:]  # an outage, not the user's mistake
        assert "Traceback" not in out and "\nfailed " not in out, out[-3000:]  # no trial counted failed
        assert "Unhandled error" not in out and "pyarrow" not in out, out[-3000:]
        kill_processes_of(home)

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        out = run_to_end(["resume", name, *args], home, env)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        records = open_sweep(name, uri).load_trials()
        assert len(records) == 3 and all(r.status == "TERMINATED" for r in records), \
            [(r.trial_id, r.status) for r in records]
        assert all([row["epoch"] for row in r.history] == [1, 2, 3] for r in records), \
            {r.trial_id: [row["epoch"] for row in r.history] for r in records}
        parents, children = mlflow_runs(mlflow_server, name)
        assert len(parents) == 1 and len(children) == 3
        assert all(r.info.status == "FINISHED" for r in parents + children), \
            [(r.data.tags.get("trial_id"), r.info.status) for r in parents + children]
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize(("process", "sig"), [("raylet", signal.SIGTERM), ("gcs_server", signal.SIGKILL)])
def test_local_ray_losing_its_node_ends_with_one_message_and_resume_agrees(
        process: str, sig: int, mlflow_server: str, home: Path, tmp_path: Path) -> None:
    """The local Ray's raylet stopped (as `ray stop` does) or its GCS server killed (as the out-of-memory
    killer does) mid-sweep: the sweep ends
    with one message naming the process and `sweep resume`, exit 2, no trial counted failed, no
    traceback and no Ray process left (not exit 1 from inside Ray, with Ray's agents and the local MLflow
    server left running). `sweep resume` then finishes every trial once, with Tune, Optuna and MLflow
    level."""
    name = f"faults-lost-{process.replace('_', '-')}"
    spec = write_spec(tmp_path, name, budget={"num_samples": 3, "max_concurrent": 2})
    env = {"FWSWEEP_FAULT": "slow=1.5"}
    run = SweepProcess(["run", str(spec), "--tracking-uri", mlflow_server], home, env)
    wait_until(lambda: "started " in run.output() or run.proc.poll() is not None, 240, "a first trial")
    time.sleep(2)  # a first epoch reported
    victim = local_ray_process(run.proc.pid, process)
    assert run.proc.poll() is None and victim, run.output()[-3000:]
    os.kill(victim, sig)
    rc = run.wait(120)
    out = run.output()
    assert rc == 2, f"exit {rc}:\n{out[-3000:]}"
    flat = " ".join(out.split())
    assert f"local Ray: its {process} (pid {victim})" in flat and f"sweep resume {name}" in flat, out[-3000:]
    assert "Traceback" not in out and "\nfailed " not in out, out[-3000:]  # no trial counted failed
    left = kill_processes_of(home)
    assert not left, f"processes {left} of the sweep's Ray were left running:\n{out[-3000:]}"

    run_to_end(["resume", name, "--tracking-uri", mlflow_server], home, env)
    trials = tune_trials(home, name)
    assert len(trials) == 3 and all(t["status"] == "TERMINATED" for t in trials.values()), trials
    assert all(t["epochs"] == [1, 2, 3] for t in trials.values()), trials
    assert_records_agree(home, name, mlflow_server)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_trial_that_resume_runs_again_is_told_to_optuna(mlflow_server: str, home: Path,
                                                                 tmp_path: Path) -> None:
    """`sweep resume` runs a failed trial again (Tune's resume_errored). Optuna had recorded it as FAIL;
    its new run's result must reach the study too (a new trial with the same parameters, `failed_trial`
    naming the first, as Optuna's RetryFailedTrialCallback does), not be dropped with a warning per
    epoch ("Received additional result ... already finished")."""
    name = "faults-rerun"
    spec = write_spec(tmp_path, name, budget={"num_samples": 2, "max_concurrent": 1})
    env = {"FWSWEEP_FAULT": "raise@2x1", "FWSWEEP_FAULT_STATE": str(tmp_path / "faults")}
    run_to_end(["run", str(spec), "--tracking-uri", mlflow_server], home, env)
    (failed,) = [t for t, v in tune_trials(home, name).items() if v["status"] == "ERROR"]
    assert optuna_by_tune_trial(home, name)[failed].state.name == "FAIL"

    out = run_to_end(["resume", name, "--tracking-uri", mlflow_server], home, env)
    assert "Received additional" not in out, out[-3000:]
    trials = tune_trials(home, name)
    assert trials[failed]["status"] == "TERMINATED" and trials[failed]["epochs"] == [1, 2, 3], trials
    rerun = optuna_by_tune_trial(home, name)[failed]
    assert rerun.state.name == "COMPLETE", rerun
    last = trial_rows(home, name)[failed][-1]
    assert rerun.value == last["val_accuracy"], (rerun.value, last)
    first = next(t for t in optuna_trials(home, name) if t.number == rerun.system_attrs["failed_trial"])
    assert first.state.name == "FAIL" and first.params == rerun.params
    assert_records_agree(home, name, mlflow_server)

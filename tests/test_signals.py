"""Ctrl-C (SIGINT), SIGTERM and SIGHUP sent to a running `sweep run`: it stops within seconds, saves Tune's
state, marks the open MLflow runs KILLED, prints the resume command and exits 130 / 143 / 129; `sweep
resume` then finishes the sweep without repeating an epoch. A closed terminal (a real pty hung up) too."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import signal
import sqlite3
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    SWEEP,
    SweepProcess,
    epoch_steps,
    experiment_dir,
    metric_steps,
    mlflow_runs,
    processes_of,
    repeats_only_the_final_row,
    run_to_end,
    started_trials_on_disk,
    trial_rows,
    tune_trials,
    wait_until,
    write_spec,
)

STOP_WITHIN_S = 30  # from the signal to the process exit, on a loaded 2-core machine


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])  # SIGHUP: the terminal was closed
def test_signal_stops_saves_and_resumes(sig: int, code: int, mlflow_server: str,
                                        home: Path, tmp_path: Path) -> None:
    name = f"faults-{signal.Signals(sig).name.lower()}"
    spec = write_spec(tmp_path, name, budget={"num_samples": 2, "max_concurrent": 2})
    env = {"FWSWEEP_FAULT": "slow=2"}
    run = SweepProcess(["run", str(spec), "--tracking-uri", mlflow_server], home, env)
    wait_until(lambda: len(started_trials_on_disk(home, name)) >= 1 or run.proc.poll() is not None, 150,
               "a trial's first epoch")
    assert run.proc.poll() is None, run.output()[-3000:]
    sent = time.monotonic()
    run.signal(sig)
    rc = run.wait(STOP_WITHIN_S + 30)
    stop_s = time.monotonic() - sent
    out = run.output()
    assert rc == code, f"exit {rc}, expected {code}:\n{out[-3000:]}"
    assert stop_s < STOP_WITHIN_S, f"took {stop_s:.0f} s to stop"
    assert f"sweep resume {name}" in out, out[-2000:]
    print(f"{signal.Signals(sig).name}: stopped in {stop_s:.1f} s")

    assert list(experiment_dir(home, name).glob("experiment_state-*.json")), "no Tune state saved"
    parents, children = mlflow_runs(mlflow_server, name)
    statuses = sorted(r.info.status for r in parents + children)
    assert "RUNNING" not in statuses, statuses
    assert [p.info.status for p in parents] == ["KILLED"]
    assert any(r.info.status == "KILLED" for r in children), statuses
    rows_before = {tid: [r["epoch"] for r in rows] for tid, rows in trial_rows(home, name).items()}
    if sig != signal.SIGINT:
        return  # the same orderly stop as SIGINT: resuming it is checked once, below, in the SIGINT case

    run_to_end(["resume", name, "--tracking-uri", mlflow_server], home, env)
    trials = tune_trials(home, name)
    assert len(trials) == 2 and all(t["status"] == "TERMINATED" for t in trials.values()), trials
    for tid, t in trials.items():
        assert t["epochs"] == [1, 2, 3], f"trial {tid}: {t['epochs']} (before: {rows_before.get(tid)})"
    parents, children = mlflow_runs(mlflow_server, name)
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in parents + children)
    for r in children:
        assert metric_steps(mlflow_server, r.info.run_id, "val_accuracy") == epoch_steps(3)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_closed_terminal_stops_the_sweep_and_all_it_started(home: Path, tmp_path: Path) -> None:
    """`sweep run` in a terminal that is closed (its pty hangs up): SIGHUP reaches the driver and the local
    Ray it started, in the same process group. The sweep ends within seconds, Tune's state saved, no
    MLflow run left RUNNING, no process of its own left (its local MLflow server included). (Before: the
    driver died on the spot, its runs stayed RUNNING and the local server ran on; with a SIGHUP handler but
    writes to the dead terminal failing, the driver waited a minute on Ray's dead GCS.)"""
    name = "faults-hangup"
    spec = write_spec(tmp_path, name, budget={"num_samples": 2, "max_concurrent": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"FWSWEEP_HOME": str(home), "FWSWEEP_FAULT": "slow=2", "PYTHONUNBUFFERED": "1"}
    master, slave = pty.openpty()

    def in_its_own_terminal() -> None:  # a session whose controlling terminal is the pty, as a shell's
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([str(SWEEP), "run", str(spec)], cwd=tmp_path, env=env, stdin=slave, stdout=slave,
                            stderr=slave, preexec_fn=in_its_own_terminal)
    os.close(slave)
    shown: list[bytes] = []
    closing = threading.Event()

    def read_the_terminal() -> None:  # as a terminal does: its writes must not block
        while not closing.is_set():
            if select.select([master], [], [], 0.2)[0]:
                try:
                    shown.append(os.read(master, 1 << 16))
                except OSError:
                    return

    reader = threading.Thread(target=read_the_terminal, daemon=True)
    reader.start()
    try:
        wait_until(lambda: started_trials_on_disk(home, name) or proc.poll() is not None, 150,
                   "a trial's first epoch")
        assert proc.poll() is None, b"".join(shown).decode(errors="replace")[-3000:]
        closing.set()
        reader.join(timeout=10)
        os.close(master)  # the terminal closes: the kernel hangs up its session
        closed = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_WITHIN_S + 30)
        stop_s = time.monotonic() - closed
        assert proc.returncode is not None, "`sweep run` still running a minute after its terminal closed"
        assert stop_s < STOP_WITHIN_S, f"took {stop_s:.0f} s to stop"
        wait_until(lambda: not processes_of(home), 15, "its processes (Ray, local MLflow server) to end")
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"closed terminal: stopped in {stop_s:.1f} s, exit {proc.returncode}")
    # 129: Tune's orderly stop; 2: the local Ray, hung up too, was lost first (sweep.ray_watch). Not 1: an
    # error (a write to the closed terminal) that cut the stop short
    assert proc.returncode in (129, 2), proc.returncode
    assert list(experiment_dir(home, name).glob("experiment_state-*.json")), "no Tune state saved"
    with contextlib.closing(sqlite3.connect(home / "mlflow" / "mlflow.db")) as db:
        statuses = [row[0] for row in db.execute("SELECT status FROM runs")]
    assert statuses and "RUNNING" not in statuses, statuses


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interrupt_between_a_logged_result_and_tunes_snapshot(mlflow_server: str, home: Path,
                                                              tmp_path: Path) -> None:
    """Ctrl-C lands the moment Tune has logged a trial's last result, before its state holds that
    epoch's checkpoint or the trial's end: `sweep resume` must neither train that trial again nor
    report any of its epochs twice."""
    name = "faults-interrupt-window"
    spec = write_spec(tmp_path, name, budget={"num_samples": 2, "max_concurrent": 1})
    run = SweepProcess(["run", str(spec), "--tracking-uri", mlflow_server], home,
                       {"FWSWEEP_FAULT": "interrupt@3", "FWSWEEP_FAULT_STATE": str(tmp_path / "faults")})
    rc = run.wait(200)
    assert rc == 130, f"exit {rc}:\n{run.output()[-3000:]}"
    before = trial_rows(home, name)
    done = [tid for tid, rows in before.items() if rows and "test_accuracy" in rows[-1]]  # its final report
    assert len(done) == 1 and [r["epoch"] for r in before[done[0]]] == [1, 2, 3], before
    saved = tune_trials(home, name)
    assert saved[done[0]]["status"] != "TERMINATED", "the interrupt missed the window this test is about"

    out = run_to_end(["resume", name, "--tracking-uri", mlflow_server], home)
    trials = tune_trials(home, name)
    assert len(trials) == 2 and all(t["status"] == "TERMINATED" for t in trials.values()), trials
    for tid, t in trials.items():
        # the ended trial's final row may be reported once more (Tune closes a trial with what it restored)
        epochs = t["epochs"][:-1] if t["epochs"][-2:] == [3, 3] and tid == done[0] else t["epochs"]
        assert epochs == [1, 2, 3], f"trial {tid}: {t['epochs']} (before: {before.get(tid)})"
    final, after = before[done[0]][-1], trial_rows(home, name)[done[0]]
    assert repeats_only_the_final_row(before[done[0]], after), (before[done[0]], after)
    assert "stopped early" not in out, out  # the ended trial closes as done, at its final epoch
    assert "Warning" not in out, out  # e.g. Optuna's note on the step reported again
    from sweep.store import open_sweep

    record = next(r for r in open_sweep(name, str(home / "sweeps")).load_trials() if r.trial_id == done[0])
    assert record.epochs == 3 and record.metrics["test_accuracy"] == final["test_accuracy"], record.metrics
    parents, children = mlflow_runs(mlflow_server, name)
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in parents + children)
    for r in children:
        assert metric_steps(mlflow_server, r.info.run_id, "val_accuracy") == epoch_steps(3)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_when_tune_deleted_the_checkpoint_its_state_names(mlflow_server: str, home: Path,
                                                                tmp_path: Path) -> None:
    """Tune deletes a trial's older checkpoints the moment it registers a new one, but saves the state that
    names the newest on a timer: a driver killed in between leaves a state naming a deleted checkpoint
    beside a newer one. `sweep resume` goes on from the newest whole checkpoint (not failing the trial
    with Tune's 'Could not recover from checkpoint', not training it from scratch)."""
    import shutil

    name = "faults-deleted-checkpoint"
    spec = write_spec(tmp_path, name, budget={"num_samples": 1, "max_concurrent": 1},
                      train={"keep_checkpoints": 1})
    run = SweepProcess(["run", str(spec), "--tracking-uri", mlflow_server], home,
                       {"FWSWEEP_FAULT": "interrupt@2", "FWSWEEP_FAULT_STATE": str(tmp_path / "faults")})
    rc = run.wait(200)
    assert rc == 130, f"exit {rc}:\n{run.output()[-3000:]}"
    (tid, saved), = tune_trials(home, name).items()
    folder = experiment_dir(home, name) / f"trial_{tid}"
    # The state names epoch 1's checkpoint; epoch 2's is on storage, not yet registered. Delete the named
    # one, as Tune does when it registers epoch 2's (keep_checkpoints: 1) before the state is saved again.
    assert saved["checkpoints"] == ["checkpoint_000000", "checkpoint_000001"], saved
    shutil.rmtree(folder / "checkpoint_000000")
    partial = folder / "checkpoint_000002"  # a newer upload cut short: not a checkpoint to restore from
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\x80")

    out = run_to_end(["resume", name, "--tracking-uri", mlflow_server], home)
    trials = tune_trials(home, name)
    assert trials[tid]["status"] == "TERMINATED" and trials[tid]["num_failures"] == 0, (trials, out[-3000:])
    assert trials[tid]["epochs"] == [1, 2, 3], trials  # went on after epoch 2: nothing trained twice
    assert trials[tid]["checkpoints"] == ["checkpoint_000001"], trials  # keep_checkpoints: 1, no strays
    assert "Could not recover" not in out and "Traceback" not in out, out[-3000:]
    assert "resuming from the newer checkpoint_000001" in " ".join(out.split()), out[-3000:]
    parents, children = mlflow_runs(mlflow_server, name)
    assert all(r.info.status == "FINISHED" for r in parents + children)
    assert metric_steps(mlflow_server, children[0].info.run_id, "val_accuracy") == epoch_steps(3)

"""Sweeps end to end on real parts: a local Ray (2 CPUs), a real MLflow server on a free loopback port,
real Optuna. A tiny ART task so a trial takes seconds; ASHA must stop the slow learners early."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import repeats_only_the_final_row

from sweep import events, paths
from sweep.config import SweepSpec, load_trial_config
from sweep.export import load_trials
from sweep.runner import JSON_LOGGER_MARK, run_sweep

pytestmark = pytest.mark.slow

# The learning rate spans 300x: the low-rate trials are far behind after one epoch, so ASHA (rung at
# epoch 1, keep the top half) stops some of them, whatever order the trials finish in.
TINY_SPEC = {
    "name": "e2e",
    "task": {"name": "art", "pairs": 2, "train_size": 2000, "val_size": 300, "test_size": 300, "seed": 1},
    "train": {"batch_size": 64, "steps_per_epoch": 25, "eval_batch_size": 300, "seed": 0,
              "keep_checkpoints": 1},
    "models": ["lstm", "fw_lstm"],
    "space": {
        "common": {"lr": {"loguniform": [1.0e-4, 3.0e-2]}, "hidden_size": 16, "embed_size": 16,
                   "head_size": 16},
        "fw_lstm": {"decay": {"uniform": [0.8, 0.95]}},
    },
    "searcher": {"name": "optuna", "sampler": "tpe", "seed": 0, "n_startup_trials": 3},
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "budget": {"num_samples": 6, "max_epochs": 4, "max_concurrent": 2},
    "resources": {"cpu": 1, "gpu": 0},
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Each test's own FWSWEEP_HOME: the tests are self-contained, so xdist may spread them over workers
    (a module-scoped home made the module one unit of work, minutes of sweeps on one worker)."""
    folder = tmp_path / "home"
    monkeypatch.setenv("FWSWEEP_HOME", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


def _runs(url: str, sweep: str) -> tuple[list, list]:
    client = mlflow.MlflowClient(url)
    exp = client.get_experiment_by_name(sweep)
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep}'", max_results=1000)
    parents = [r for r in runs if r.data.tags.get("fwsweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("fwsweep.role") == "trial"]
    return parents, children


def test_sweep_end_to_end_tracks_stops_early_and_exports(home, mlflow_server):
    spec = SweepSpec.model_validate(TINY_SPEC)
    seen: list[events.Event] = []
    result = run_sweep(spec, tracking_uri=mlflow_server, on_event=seen.append)

    n = spec.budget.num_samples
    assert set(result.status_counts) <= {"done", "stopped early"}, result.status_counts
    assert sum(result.status_counts.values()) == n and result.status_counts.get("stopped early")
    assert not result.interrupted
    records = load_trials(spec.name)
    assert len(records) == n and len({r.trial_id for r in records}) == n
    assert {r.model for r in records} == {"lstm", "fw_lstm"}
    assert all(r.started for r in records)  # each has its result log (`sweep show`: running, not pending)
    stopped = [r for r in records if r.stopped_early(spec.max_epochs)]
    assert stopped, "ASHA stopped no trial: " + str([(r.epochs, r.value("val_accuracy")) for r in records])
    assert any(r.epochs == spec.max_epochs for r in records)

    # The live view's events, from Tune's hooks: every trial started and ended once, in users' words
    assert isinstance(seen[0], events.Phase) and isinstance(seen[-1], events.SweepEnded)
    ended = {e.trial_id: e for e in seen if isinstance(e, events.TrialEnded)}
    assert ended.keys() == {r.trial_id for r in records}
    assert len([e for e in seen if isinstance(e, events.TrialEnded)]) == n
    assert {e.trial_id for e in seen if isinstance(e, events.TrialStarted)} == ended.keys()
    for r in records:
        assert (ended[r.trial_id].state, ended[r.trial_id].epochs) == (r.state(spec.max_epochs), r.epochs)
    assert all(e.reason == "by ASHA" for e in ended.values() if e.state == "stopped early")
    assert [e for e in seen if isinstance(e, events.Counts)][-1] == events.Counts(n, 0, 0, n)
    reports = [e for e in seen if isinstance(e, events.TrialReport)]
    assert {r.trial_id: r.epochs for r in records} == {
        tid: max(e.epoch for e in reports if e.trial_id == tid) for tid in ended}

    # MLflow: one parent, one child per trial under it, every run terminal, metrics per epoch, artifacts
    parents, children = _runs(mlflow_server, spec.name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n
    assert {c.data.tags["trial_id"] for c in children} == {r.trial_id for r in records}
    assert all(c.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]
    client = mlflow.MlflowClient(mlflow_server)
    by_id = {r.trial_id: r for r in records}
    for child in children:
        record = by_id[child.data.tags["trial_id"]]
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert len(history) == record.epochs
        assert child.data.metrics["val_accuracy"] == pytest.approx(record.value("val_accuracy"))
        assert client.list_artifacts(child.info.run_id), "a trial run has no artifacts"
    assert result.mlflow_url and f"/experiments/{parents[0].info.experiment_id}/runs" in result.mlflow_url

    # Export: the best config re-runs to the same validation accuracy (same seed, same device)
    best = result.best
    assert best.value("val_accuracy") == max(r.value("val_accuracy") for r in records)
    assert result.exported and result.exported[0].name == "best.yaml"
    text = result.exported[0].read_text()
    assert text.startswith("# fwsweep export") and best.trial_id in text
    config = load_trial_config(result.exported[0])
    assert config.train.epochs == best.epochs
    rerun = home / "rerun"
    _cli(["train", "--config", str(result.exported[0]), "--out", str(rerun)])  # the user's path
    final = json.loads((rerun / "metrics.json").read_text())["final"]
    assert final["val_accuracy"] == pytest.approx(best.value("val_accuracy"), abs=1e-9)

    # the other commands on the finished sweep
    out = _cli(["export", spec.name, "--per-model", "--top-k", "2"])
    assert "best_lstm.yaml" in out and "best_fw_lstm.yaml" in out and "top2.yaml" in out
    out = _cli(["show", spec.name], width=80)
    assert best.trial_id in out and "stopped early" in out and "TERMINATED" not in out
    # the states' counts on a line of their own, whole (in the header line they wrapped mid-count at 80)
    assert re.search(r"^trials: \d+ [a-z ]+(, \d+ [a-z ]+)*$", out, re.M) and "trials ended" in out, out
    # only a path or URL ("folder: PATH", "MLflow: URL") may be longer: it is printed whole, never cut
    too_wide = [ln for ln in out.splitlines() if len(ln) > 80 and " " in ln.split(": ", 1)[-1].strip()]
    assert not too_wide and "…" not in out, out
    out = _cli(["list", "--tracking-uri", mlflow_server], width=80)
    assert spec.name in out and "finished" in out and "FINISHED" not in out


def _cli(args: list[str], width: int = 250) -> str:
    """Run a `sweep` command in this process; its output (exit code 0 required); wide: cells unwrapped."""
    import contextlib
    import io

    from sweep.cli import main
    from sweep.cli.output import console

    buffer = io.StringIO()
    console.file, console.width = buffer, width
    try:
        with contextlib.redirect_stdout(buffer), pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["sweep", *args])
            try:
                main()
            except SystemExit as exit_:
                assert exit_.code in (0, None), buffer.getvalue()
    finally:
        # None: follow sys.stdout and the terminal's width again, as sweep.cli.output's console does
        # (restoring the values read before pinned this test's stdout: later tests' capsys read nothing)
        console.file, console.width = None, None
    return buffer.getvalue()


def _finished_trials(folder: Path) -> dict[str, list[dict]]:
    """trial dir -> its result rows, for the trials whose last report says done."""
    out = {}
    for result in folder.glob("trial_*/result.json"):
        lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        if lines and lines[-1].get("done"):
            out[result.parent.name] = lines
    return out


def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(home, mlflow_server, tmp_path):
    data = TINY_SPEC | {"name": "e2e-resume"}
    data["budget"] = data["budget"] | {"num_samples": 6}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    folder = home / "sweeps" / "e2e-resume"
    env = os.environ | {"FWSWEEP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "from sweep.cli import main; main()", "run", str(spec_file),
           "--tracking-uri", mlflow_server]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    second_finished = threading.Event()

    def read_output() -> None:  # the CLI's own progress lines: "[2/6]" ends the second finished trial's line
        for line in proc.stdout:
            lines.append(line)
            if "[2/6]" in line:
                second_finished.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        # interrupt as soon as the CLI reports the second finished trial: polling the trial folders instead
        # (their result.json rows) saw it too late once trials took a second or two, after the last trial
        assert second_finished.wait(timeout=240), "no two trials finished in time:\n" + "".join(lines)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
        proc.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert proc.returncode == 130, out
    assert "sweep resume e2e-resume" in out
    # piped: plain lines, one per trial event; none of Ray's tables or hints
    assert "== Status ==" not in out and "Tuner.restore" not in out and "\x1b[" not in out, out
    assert "Failed to fetch metrics" not in out and "Stop signal received" not in out, out
    assert "e2e-resume started: 6 trials" in out and out.count("\nstarted ") >= 2, out
    summary = out.split("\nsweep e2e-resume: ")[-1].splitlines()[0]
    assert re.match(r"\d/6 trials finished \(", summary) and "pending" not in summary, out
    before = _finished_trials(folder)
    assert 2 <= len(before) < 6

    parents, children = _runs(mlflow_server, "e2e-resume")
    assert all(r.info.status != "RUNNING" for r in parents + children)  # closed as KILLED, not left open

    from sweep.export import load_spec_of

    result = run_sweep(load_spec_of("e2e-resume"), tracking_uri=mlflow_server, resume=True)
    assert sum(result.status_counts.values()) == 6 and not result.interrupted, result.status_counts
    after = _finished_trials(folder)
    assert len(after) == 6
    for trial, rows in before.items():
        assert repeats_only_the_final_row(rows, after[trial]), f"{trial} was re-run after resume"
    for result in folder.glob("trial_*/result.json"):  # ASHA's rungs count training_iteration: = the epoch
        rows = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        assert [r["training_iteration"] for r in rows] == [r["epoch"] for r in rows], result
    # Tune's JSON results only, in the first session and after the resume: no CSV or TensorBoard copies
    assert (folder / JSON_LOGGER_MARK).exists()
    assert not list(folder.glob("trial_*/progress.csv")) and not list(folder.glob("trial_*/events.out.*"))

    parents, children = _runs(mlflow_server, "e2e-resume")
    assert len(parents) == 1, "resume created a second parent run"
    assert len(children) == 6 and len({c.data.tags["trial_id"] for c in children}) == 6
    assert all(r.info.status == "FINISHED" for r in parents + children), \
        [(r.data.tags.get("trial_id"), r.info.status) for r in parents + children]


def test_a_sweep_ends_when_a_trial_reaches_its_target(home, mlflow_server):
    """budget.target: the first report at the target ends the sweep; it is finished (not interrupted) in
    the result, in `sweep list` and in MLflow, and no trial past that point was started."""
    from sweep.cli.sweep_tables import overview
    from sweep.store import open_sweep

    data = TINY_SPEC | {"name": "e2e-target", "scheduler": {"name": "fifo"},
                        "budget": {"num_samples": 6, "max_epochs": 4, "max_concurrent": 1, "target": 0.05}}
    result = run_sweep(SweepSpec.model_validate(data), tracking_uri=mlflow_server)
    records = load_trials("e2e-target")
    assert len(records) == 1 and records[0].epochs == 1, [(r.trial_id, r.epochs) for r in records]
    assert result.target_reached == (records[0].trial_id, 1)
    assert not result.interrupted and result.best is not None
    assert overview(open_sweep("e2e-target")).status == "finished"
    parents, children = _runs(mlflow_server, "e2e-target")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 1


def test_resume_refuses_another_spec(home, mlflow_server):
    """A finished sweep's folder + a changed spec under the same name: a UserError, nothing re-run.
    Self-contained: it runs its own one-trial sweep first (not another test's leftovers)."""
    from sweep.errors import UserError

    data = TINY_SPEC | {"name": "e2e-refuse", "scheduler": {"name": "fifo"},
                        "budget": {"num_samples": 1, "max_epochs": 1, "max_concurrent": 1}}
    first = run_sweep(SweepSpec.model_validate(data), tracking_uri=mlflow_server)
    assert first.best is not None and paths.sweep_dir("e2e-refuse").is_dir()
    changed = SweepSpec.model_validate(data | {"budget": data["budget"] | {"num_samples": 9}})
    with pytest.raises(UserError, match="different spec"):
        run_sweep(changed, tracking_uri=mlflow_server, resume=True)
    with pytest.raises(UserError, match="already exists"):
        run_sweep(SweepSpec.model_validate(data), tracking_uri=mlflow_server)


def test_the_local_ray_prestarts_no_idle_workers(home):
    """Tune's trials run in actors, which get workers of their own: a worker prestarted for the driver
    would only sit idle, a Python process's start-up of CPU in a contended start (docs/benchmarks.md)."""
    import psutil

    from sweep.runner import connect_ray, stop_ray

    assert connect_ray(None), "a Ray was already connected in this process"
    try:
        time.sleep(3)  # Ray prestarts right after the driver connects
        idle = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if "ray::IDLE" in " ".join(proc.cmdline()):
                    idle.append(proc.pid)
            except psutil.Error:
                continue
    finally:
        stop_ray()
    assert idle == [], f"idle Ray workers started: {idle}"


DAMAGES = [  # (file under the sweep folder, damage, command, words the one message must hold)
    ("trial_*/result.json", b"\x00\xff garbage", "show", ["result.json", "damaged", "not utf-8", "restore"]),
    ("experiment_state-*.json", b"{bad", "show", ["experiment_state-", "damaged", "rm -r"]),
    ("experiment_state-*.json", b"{bad", "resume", ["experiment_state-", "damaged", "rm -r"]),
    ("tuner.pkl", None, "resume", ["tuner.pkl", "damaged", "rm -r"]),  # None: cut to half its length
    ("searcher-state-*.pkl", None, "resume", ["searcher-state-", "damaged", "restore"]),
]


def test_damaged_state_files_are_one_clear_error(home, mlflow_server, tmp_path, monkeypatch, capsys):
    """Each of Tune's files a command reads, damaged in a copy of a finished sweep: exit 2, one message
    naming the file and the fix, no traceback, nothing changed (resume checks before Ray or MLflow start)."""
    import shutil

    from conftest import lock_held_elsewhere, run_cli_in_process, snapshot

    data = TINY_SPEC | {"name": "e2e-damaged", "scheduler": {"name": "fifo"},
                        "budget": {"num_samples": 1, "max_epochs": 1, "max_concurrent": 1}}
    run_sweep(SweepSpec.model_validate(data), tracking_uri=mlflow_server)
    for i, (pattern, damage, command, expect) in enumerate(DAMAGES):
        copy = tmp_path / f"home{i}"
        shutil.copytree(home / "sweeps" / "e2e-damaged", copy / "sweeps" / "e2e-damaged")
        (target,) = (copy / "sweeps" / "e2e-damaged").glob(pattern)
        target.write_bytes(damage if damage is not None else target.read_bytes()[:target.stat().st_size // 2])
        monkeypatch.setenv("FWSWEEP_HOME", str(copy))
        before = snapshot(copy)
        code, output = run_cli_in_process([command, "e2e-damaged"], monkeypatch, capsys)
        assert code == 2 and "Traceback" not in output, output
        flat = " ".join(output.split()).lower()
        assert all(word in flat for word in expect), (pattern, command, output)
        assert snapshot(copy) == before, (pattern, command)
        assert not (copy / "mlflow").exists(), "a local MLflow server was started for a damaged sweep"

    # A sweep another live process drives is not resumed beside it (two drivers delete each other's
    # checkpoints): its lock, held by another process, is exit 2 before anything starts
    held = tmp_path / "held"
    shutil.copytree(home / "sweeps" / "e2e-damaged", held / "sweeps" / "e2e-damaged")
    lock_path = held / "sweeps" / "e2e-damaged" / ".driver.lock"
    with lock_held_elsewhere(lock_path):
        monkeypatch.setenv("FWSWEEP_HOME", str(held))
        code, output = run_cli_in_process(["resume", "e2e-damaged"], monkeypatch, capsys)
        assert code == 2 and "this sweep is running" in " ".join(output.split()), output
        assert not (held / "mlflow").exists()

    # A torn read (the state read while a driver replaced it) is read again, not called damaged
    torn = tmp_path / "torn"
    shutil.copytree(home / "sweeps" / "e2e-damaged", torn / "e2e-damaged")
    (state,) = (torn / "e2e-damaged").glob("experiment_state-*.json")
    whole = state.read_bytes()
    state.write_bytes(whole[: len(whole) // 2])
    threading.Timer(0.3, state.write_bytes, [whole]).start()  # the upload completes a moment later
    from sweep.store import open_sweep

    assert len(open_sweep("e2e-damaged", str(torn)).load_trials()) == 1

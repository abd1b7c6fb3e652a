"""`sweep train` end to end: run folder contents, resume, and Ctrl-C (a real SIGINT to a real process)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import SWEEP
from conftest import run_cli_in_process as run_cli

SETS = ["task.train_size=2000", "task.val_size=400", "task.test_size=400", "train.batch_size=64",
        "train.num_threads=1", "train.target_accuracy=null", "model.embed_size=16", "model.head_size=16"]
TINY = ["--model", "lstm", "--pairs", "2", "--hidden-size", "16", "--lr", "0.003", "--device", "cpu",
        *[arg for s in SETS for arg in ("--set", s)]]


def trajectory(history: list[dict]) -> list[dict]:
    """What must match between runs: no timings, and test results only where they were measured last."""
    timings = {"steps_per_s", "sequences_per_s", "elapsed_s"}
    tests = {"test_loss", "test_accuracy", "test_error"}
    return [{k: v for k, v in h.items() if k not in timings | tests} for h in history[:-1]] + [
        {k: v for k, v in history[-1].items() if k not in timings}]


def test_train_writes_the_run_folder_and_resume_extends_it(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    code, out = run_cli(["train", *TINY, "--epochs", "2", "--out", str(run)], monkeypatch, capsys)
    assert code == 0, out
    assert "test accuracy" in out and str(run) in out
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == {"name": "lstm", "hidden_size": 16, "embed_size": 16, "head_size": 16}
    assert config["train"]["epochs"] == 2 and config["task"]["pairs"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert 0 <= metrics["final"]["test_accuracy"] <= 1
    assert len(list((run / "checkpoints").iterdir())) == 2

    code, out = run_cli(["train", "--resume", str(run), "--epochs", "3"], monkeypatch, capsys)
    assert code == 0, out
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3

    straight = tmp_path / "straight"
    assert run_cli(["train", *TINY, "--epochs", "3", "--out", str(straight)], monkeypatch, capsys)[0] == 0
    assert trajectory(json.loads((straight / "metrics.json").read_text())["history"]) == trajectory(
        metrics["history"])


def test_resume_from_a_checkpoint_folder_continues_its_run(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    assert run_cli(["train", *TINY, "--epochs", "2", "--out", str(run)], monkeypatch, capsys)[0] == 0
    first = json.loads((run / "metrics.json").read_text())["history"]
    older = sorted((run / "checkpoints").iterdir())[0]  # after epoch 1
    code, out = run_cli(["train", "--resume", str(older)], monkeypatch, capsys)
    assert code == 0, out
    again = json.loads((run / "metrics.json").read_text())["history"]
    assert trajectory(again) == trajectory(first)
    assert sorted(p.name for p in run.iterdir()) == [".train.lock", "checkpoints", "config.yaml",
                                                     "metrics.json"]


@pytest.mark.parametrize(("file", "damage", "expect"), [
    ("meta.json", b"{bad", ["meta.json", "damaged", "step-"]),
    ("meta.json", b"\xff\xfe", ["meta.json", "damaged", "utf-8"]),
    ("meta.json", b"{}", ["meta.json", "damaged", "no epoch"]),
    ("state.pt", b"garbage", ["state.pt", "damaged", "not a whole torch checkpoint"]),
    ("state.pt", None, ["state.pt", "damaged"]),  # None: cut to half its length
])
def test_a_damaged_checkpoint_is_one_clear_error_and_changes_nothing(
        file: str, damage: bytes | None, expect: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    from conftest import snapshot

    run = tmp_path / "run"
    assert run_cli(["train", *TINY, "--epochs", "2", "--out", str(run)], monkeypatch, capsys)[0] == 0
    older, newest = sorted((run / "checkpoints").iterdir())
    target = newest / file
    target.write_bytes(damage if damage is not None else target.read_bytes()[:target.stat().st_size // 2])
    before = snapshot(run)
    code, out = run_cli(["train", "--resume", str(run), "--epochs", "3"], monkeypatch, capsys)
    flat = " ".join(out.split()).lower()
    assert code == 2 and "traceback" not in flat, out
    assert all(word.lower() in flat for word in expect), out
    assert f"remove {newest}".lower() in flat and older.name in flat, out  # resume from the one before
    assert snapshot(run) == before, "a failed resume changed the run folder"


def test_a_run_another_process_trains_is_not_resumed_beside_it(tmp_path: Path, monkeypatch, capsys) -> None:
    """`sweep train --resume DIR` (or a checkpoint in it) while another process trains DIR: exit 2 naming
    the flag and the fix, the run folder unchanged (both trained it, loading, saving and pruning the same
    checkpoints, until 2026-12-02). Once that process is gone the resume goes on."""
    from conftest import lock_held_elsewhere, snapshot

    run = tmp_path / "run"
    assert run_cli(["train", *TINY, "--epochs", "2", "--out", str(run)], monkeypatch, capsys)[0] == 0
    with lock_held_elsewhere(run / ".train.lock"):
        before = snapshot(run)
        for target in (run, sorted((run / "checkpoints").iterdir())[0]):
            code, out = run_cli(["train", "--resume", str(target), "--epochs", "3"], monkeypatch, capsys)
            flat = " ".join(out.split())
            assert code == 2 and "Traceback" not in out, out
            assert "--resume" in flat and "is being trained by another process" in flat, out
            assert f"sweep train --resume {run}" in flat, out
            assert snapshot(run) == before, "a refused resume changed the run folder"
    code, out = run_cli(["train", "--resume", str(run), "--epochs", "3"], monkeypatch, capsys)
    assert code == 0, out
    assert [h["epoch"] for h in json.loads((run / "metrics.json").read_text())["history"]] == [1, 2, 3]


def test_default_run_folder_under_fwsweep_home(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    code, out = run_cli(["train", *TINY, "--epochs", "1"], monkeypatch, capsys)
    assert code == 0, out
    (run,) = (tmp_path / "home" / "train").iterdir()
    assert run.name.startswith("lstm-art-K2-") and (run / "metrics.json").is_file()


@pytest.mark.slow  # a real `sweep train` process, interrupted
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_and_the_printed_command_resumes(tmp_path: Path, sig: int, code: int) -> None:
    """Ctrl-C, or `kill` (SIGTERM, as a batch scheduler sends: before, it ended the process unsaved)."""
    run = tmp_path / "run"
    args = [str(SWEEP), "train", *TINY, "--epochs", "4", "--set", "task.train_size=8000", "--out", str(run)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list((run / "checkpoints").glob("step-*")) and time.monotonic() < deadline:  # epoch 1 done
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert "Traceback" not in out and "state saved" in out
    command = next(line for line in out.splitlines() if line.startswith("resume with: "))
    assert command == f"resume with: sweep train --resume {run}"
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"

    done = subprocess.run([str(SWEEP), *command.removeprefix("resume with: sweep").split()],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]

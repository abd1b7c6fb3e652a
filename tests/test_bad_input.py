"""Bad input through the real CLI: one clear message naming the problem and the fix, exit code 2, no
traceback, and nothing created or changed on disk.

Each case runs `.venv/bin/sweep` in a subprocess, in a fresh folder that holds the files the case writes
and an FWSWEEP_HOME with one earlier sweep in it; the whole folder is compared before and after, so a
stray `mlruns/`, a half-written sweep folder or a started local MLflow server (its database lives in
FWSWEEP_HOME/mlflow) fails the case.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sweep.tracking import free_port

ROOT = Path(__file__).resolve().parents[1]
SWEEP = Path(sys.executable).with_name("sweep")
TINY = (ROOT / "search_spaces/tests/faults_tiny.yaml").read_text()


DEAD_PORT = free_port()  # nothing listens here: no Ray cluster, no MLflow server


def spec(**changes: str) -> str:
    """The tiny valid spec with some top-level lines replaced (or added)."""
    lines = TINY.splitlines()
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
        lines = [ln for ln in kept if not ln.startswith(f"{key}:")] + [f"{key}: {value}"]
    return "\n".join(lines) + "\n"


GOOD_TRIAL = """\
task: {name: art, pairs: 2, num_keys: 4, num_values: 4, train_size: 64, val_size: 16, test_size: 16}
model: {name: lstm, hidden_size: 8, embed_size: 8, head_size: 8}
train: {epochs: 1, steps_per_epoch: 1, batch_size: 16}
"""


@dataclass
class Case:
    id: str
    argv: list[str]  # after `sweep`; "{tmp}" is the case's folder, "{port}" a port nobody listens on
    expect: list[str]  # each must appear in the output (case-insensitive): the problem and the fix
    files: dict[str, str | bytes] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


S = "s.yaml"
CASES = [
    # ---- spec files (sweep validate / sweep run)
    Case("spec-missing", ["validate", "nope.yaml"], ["nope.yaml", "not found", "fix"]),
    Case("spec-is-folder", ["validate", "adir"], ["adir", "folder", "fix"], {"adir/x": ""}),
    Case("spec-under-a-file", ["validate", "f.yaml/s.yaml"], ["f.yaml/s.yaml", "fix"], {"f.yaml": "a: 1\n"}),
    Case("spec-malformed-yaml", ["validate", S], [f"{S}:3", "malformed yaml", "fix"],
         {S: "name: x\nmodels: [lstm\ntask: {}\n"}),
    Case("spec-tab-indent", ["validate", S], [S, "malformed yaml"],
         {S: "name: x\nbudget:\n\tnum_samples: 2\n"}),
    Case("spec-empty", ["validate", S], [S, "mapping", "fix"], {S: ""}),
    Case("spec-top-level-list", ["validate", S], [S, "mapping", "fix"], {S: "- name: x\n"}),
    Case("spec-not-utf8", ["validate", S], [S, "cannot be read", "fix"], {S: b"name: \xff\xfe\x00x\n"}),
    Case("spec-unknown-key", ["validate", S], ["bugdet", "unknown field", "fix"], {S: spec(bugdet="{}")}),
    Case("spec-unknown-nested-key", ["validate", S], ["budget.num_sample", "unknown field"],
         {S: spec(budget="{num_sample: 3}")}),
    Case("spec-wrong-type", ["validate", S], ["budget.num_samples", "integer"],
         {S: spec(budget="{num_samples: many}")}),
    Case("spec-negative-lr", ["validate", S], ["train.lr", "greater than 0"], {S: spec(train="{lr: -0.1}")}),
    Case("spec-inverted-range", ["validate", S], ["space.common.lr", "inverted", "lower bound first"],
         {S: spec(space="{common: {lr: {loguniform: [1.0e-2, 1.0e-4]}}}")}),
    Case("spec-log-range-at-zero", ["validate", S], ["space.common.lr", "> 0"],
         {S: spec(space="{common: {lr: {loguniform: [0, 1.0e-2]}}}")}),
    Case("spec-two-kinds", ["validate", S], ["space.common.lr", "exactly one"],
         {S: spec(space="{common: {lr: {uniform: [0.1, 1], choice: [0.1]}}}")}),
    Case("spec-unknown-model", ["validate", S], ["models", "gru", "fw_lstm"], {S: spec(models="[gru]")}),
    Case("spec-section-not-listed", ["validate", S], ["space.fw_rnn", "not a listed model"],
         {S: spec(space="{fw_rnn: {decay: {uniform: [0.5, 0.9]}}}")}),
    Case("spec-param-of-other-model", ["validate", S], ["space.lstm.fast_lr", "not a hyperparameter of lstm"],
         {S: spec(space="{lstm: {fast_lr: {uniform: [0.1, 1]}}}")}),
    Case("spec-choice-out-of-bounds", ["validate", S], ["space.fw_lstm.decay", "1.5"],
         {S: spec(models="[fw_lstm]", space="{fw_lstm: {decay: {choice: [0.5, 1.5]}}}")}),
    Case("spec-grace-over-epochs", ["validate", S], ["scheduler.grace_period", "lower grace_period"],
         {S: spec(scheduler="{name: asha, grace_period: 9}")}),
    Case("spec-pairs-over-keys", ["validate", S], ["task", "num_keys"],
         {S: spec(task="{name: art, pairs: 30, num_keys: 26}")}),
    Case("spec-name-path-traversal", ["validate", S], ["name", "pattern"], {S: spec(name="../../etc")}),
    Case("spec-missing-models", ["validate", S], ["models", "add this field"],
         {S: "\n".join(ln for ln in TINY.splitlines() if not ln.startswith("models:")) + "\n"}),
    Case("run-invalid-spec", ["run", S], ["space.common.lr", "inverted"],
         {S: spec(space="{common: {lr: {loguniform: [1.0e-2, 1.0e-4]}}}")}),
    # ---- exported trial configs (sweep train)
    Case("config-missing", ["train", "nope.yaml"], ["nope.yaml", "not found"]),
    Case("config-typo-in-model", ["train", "c.yaml"], ["model.hidden_sise", "unknown field"],
         {"c.yaml": GOOD_TRIAL.replace("hidden_size", "hidden_sise")}),
    Case("config-zero-epochs", ["train", "c.yaml"], ["train.epochs", "greater than or equal to 1"],
         {"c.yaml": GOOD_TRIAL.replace("epochs: 1", "epochs: 0")}),
    Case("config-is-a-sweep-spec", ["train", "c.yaml"], ["unknown field", "models"], {"c.yaml": TINY}),
    # ---- command-line arguments
    Case("cli-unknown-command", ["swep"], ["swep", "--help"]),
    Case("cli-unknown-option", ["validate", S, "--num-samples", "3"], ["--num-samples"], {S: TINY}),
    Case("run-no-ray-cluster", ["run", S, "--address", "127.0.0.1:{port}"], ["127.0.0.1:{port}", "ray"],
         {S: TINY}),
    Case("run-no-tracking-server", ["run", S, "--tracking-uri", "http://127.0.0.1:{port}"],
         ["http://127.0.0.1:{port}", "fix"], {S: TINY}),
    Case("run-spec-tracking-uri-down", ["run", S], ["127.0.0.1:{port}", "fix"],
         {S: spec(tracking="{uri: 'http://127.0.0.1:{port}'}")}),
    Case("resume-unknown-sweep", ["resume", "no-such-sweep"], ["no-such-sweep", "fix"]),
    Case("run-over-existing-sweep", ["run", S], ["faults-tiny", "already exists", "sweep resume faults-tiny"],
         {S: TINY, "home/sweeps/faults-tiny/tuner.pkl": "", "home/sweeps/faults-tiny/sweep_spec.yaml": TINY}),
    Case("show-unknown-sweep", ["show", "no-such-sweep"], ["no-such-sweep"]),
    Case("export-unknown-sweep", ["export", "no-such-sweep"], ["no-such-sweep"]),
    # ---- environment
    Case("env-home-is-a-file", ["run", S], ["FWSWEEP_HOME", "fix"], {S: TINY, "afile": "x"},
         {"FWSWEEP_HOME": "{tmp}/afile"}),
    Case("env-home-unwritable", ["run", S], ["FWSWEEP_HOME", "fix"], {S: TINY},
         {"FWSWEEP_HOME": "/proc/fwsweep-home"}),
    Case("env-mlflow-uri-dead", ["run", S], ["127.0.0.1:{port}", "MLFLOW_TRACKING_URI", "fix"], {S: TINY},
         {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}),
    Case("env-ray-address-dead", ["run", S], ["127.0.0.1:{port}", "RAY_ADDRESS"], {S: TINY},
         {"RAY_ADDRESS": "127.0.0.1:{port}"}),
]


def _commands() -> set[str]:
    import typer.main

    from sweep.cli import app

    return set(typer.main.get_command(app).commands)


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


def run_cli(argv: list[str], cwd: Path, env: dict[str, str],
            timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    full_env.update({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}, **env)
    return subprocess.run([str(SWEEP), *argv], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{port}", str(DEAD_PORT))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_clear_message(case: Case, tmp_path: Path) -> None:
    command = next((a for a in case.argv if not a.startswith("-")), "")
    if case.id != "cli-unknown-command" and command not in _commands():
        pytest.skip(f"`sweep {command}` is not implemented yet")
    home = tmp_path / "home"
    (home / "sweeps" / "earlier").mkdir(parents=True)
    (home / "sweeps" / "earlier" / "state.json").write_text("{}")
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(_fill(content, tmp_path))
    env = {"FWSWEEP_HOME": str(home)} | {k: _fill(v, tmp_path) for k, v in case.env.items()}
    before = snapshot(tmp_path)

    result = run_cli([_fill(a, tmp_path) for a in case.argv], tmp_path, env)

    output = re.sub(r"[\s│╭╮╰╯─]+", " ", result.stdout + result.stderr)
    assert result.returncode == 2, f"exit {result.returncode}, expected 2:\n{output}"
    assert "Traceback" not in output, output
    for word in case.expect:
        assert _fill(word, tmp_path).lower() in output.lower(), f"{word!r} missing from:\n{output}"
    assert len(output) < 3000, f"not one short message ({len(output)} chars):\n{output}"
    assert snapshot(tmp_path) == before, "the command created or changed files although it failed"

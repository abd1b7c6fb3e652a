"""Bad input, one table: every case is one clear message naming the field (or file, flag, variable) and
the fix, exit code 2, no traceback, no hang, and nothing created or changed on disk.

Each case runs `sweep ARGV` in a fresh folder holding the files it writes and an FWSWEEP_HOME with one
earlier sweep in it; the whole folder is compared before and after, so a stray `mlruns/`, a half-written
sweep folder or a started local MLflow server (its database lives in FWSWEEP_HOME/mlflow) fails the case.
Cases run in-process through `sweep.cli.main` (fast tier); those marked `real_cli` also run through the
installed `sweep` executable in a subprocess (slow tier), for what only a real process shows: a hang,
the console script, the exit status.

Cases that need Ray (resources no node has) are at the end, in the slow tier.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import TINY_SPEC_TEXT, run_cli_in_process, snapshot, spec_text

from sweep.tracking import free_port

SWEEP = Path(sys.executable).with_name("sweep")
DEAD_PORT = free_port()  # nothing listens here: no Ray cluster, no MLflow server
FIFO = object()  # a `files` value: make a named pipe there
BIG = "x: " + "y" * (2 << 20) + "\n"  # 2 MiB: over the loader's size cap

GOOD_TRIAL = """\
task: {name: art, pairs: 2, num_keys: 4, num_values: 4, train_size: 64, val_size: 16, test_size: 16}
model: {name: lstm, hidden_size: 8, embed_size: 8, head_size: 8}
train: {epochs: 1, steps_per_epoch: 1, batch_size: 16}
"""
FW_LSTM = "task: {name: art, pairs: 2, train_size: 64, val_size: 16, test_size: 16}\nmodel: {name: fw_lstm}\n"
# Five nested aliases, ten times each: 10^5 values from a few lines, inside a `choice:`
ALIAS_BOMB = "anchors: [&a [8, 8, 8, 8, 8, 8, 8, 8, 8, 8]" + "".join(
    f", &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcd", "bcde", strict=True)) + "]\n" + \
    TINY_SPEC_TEXT.replace("lr: {loguniform: [1.0e-3, 1.0e-2]}", "lr: {choice: *e}")
CORRUPT_SPEC = "name: faults-tiny\nmodels: [lstm\n"


def _sqlite_file(*statements: str) -> bytes:
    with contextlib.closing(sqlite3.connect(":memory:")) as con:
        for statement in statements:
            con.execute(statement)
        return con.serialize()


# A first boot's migrations stopped half-way (SQLite runs MLflow's DDL outside one transaction)
HALF_MIGRATED = _sqlite_file("CREATE TABLE experiments (experiment_id INTEGER)",
                             "CREATE TABLE alembic_version (version_num VARCHAR(32))",
                             "INSERT INTO alembic_version VALUES ('c8d9e0f1a2b3')",
                             "CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
SWEEPS = "home/sweeps"
S = "s.yaml"


@dataclass
class Case:
    id: str
    argv: list[str]  # after `sweep`; "{tmp}" is the case's folder, "{port}" a port nobody listens on
    expect: list[str]  # each must appear in the output (case-insensitive): the problem and the fix
    files: dict[str, str | bytes | object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)  # must not appear (e.g. a false "Field required")
    real_cli: bool = False  # also run through the installed executable in a subprocess
    without_gpu: bool = False  # a mistake only where no CUDA GPU is visible (else skipped, saying so)


CASES = [
    # ---- reading files: the one bounded loader (regular files only, size, depth, aliases, duplicates)
    Case("file-missing", ["validate", "nope.yaml"], ["nope.yaml", "not found", "fix"], real_cli=True),
    # what the user wrote is shown as written, never read as the terminal's markup (rich's [tags])
    Case("file-name-like-markup", ["validate", "x[/]y [bold]z.yaml"], ["x[/]y [bold]z.yaml", "not found"],
         real_cli=True),
    Case("file-is-folder", ["validate", "adir"], ["adir", "folder", "fix"], {"adir/x": ""}),
    Case("file-under-a-file", ["validate", "f.yaml/s.yaml"], ["f.yaml/s.yaml", "fix"], {"f.yaml": "a: 1\n"}),
    Case("file-dev-zero", ["validate", "/dev/zero"], ["/dev/zero", "not a regular file", "fix"],
         real_cli=True),
    Case("file-named-pipe", ["validate", "pipe.yaml"], ["pipe.yaml", "not a regular file"],
         {"pipe.yaml": FIFO},
         real_cli=True),
    Case("file-too-large", ["validate", S], [S, "larger than", "fix"], {S: BIG}),
    Case("file-not-utf8", ["validate", S], [S, "cannot be read", "fix"], {S: b"name: \xff\xfe\x00x\n"}),
    Case("file-binary", ["validate", S], [f"{S}:1", "character yaml does not allow", "#x0000", "fix"],
         {S: b"\x00\x01garbage\n"}, real_cli=True),
    Case("file-control-character", ["validate", S], [f"{S}:2", "#x0007", "text yaml file"],
         {S: b"name: x\nmodels: [\x07]\n"}),
    Case("yaml-malformed", ["validate", S], [f"{S}:3", "malformed yaml", "fix"],
         {S: "name: x\nmodels: [lstm\ntask: {}\n"}, real_cli=True),
    Case("yaml-tab-indent", ["validate", S], [S, "malformed yaml"],
         {S: "name: x\nbudget:\n\tnum_samples: 2\n"}),
    Case("yaml-empty", ["validate", S], [S, "mapping", "fix"], {S: ""}),
    Case("yaml-top-level-list", ["validate", S], [S, "mapping", "fix"], {S: "- name: x\n"}),
    Case("yaml-deep-nesting", ["validate", S], [S, "nested more than", "fix"],
         {S: "a: " + "[" * 20000 + "\n"},
         real_cli=True),
    Case("yaml-alias-bomb", ["validate", S], [S, "expands to more than", "aliases"], {S: ALIAS_BOMB},
         real_cli=True),
    Case("yaml-alias-cycle", ["validate", S], [S, "alias refers to"],
         {S: "name: x\nmodels: &m [lstm, *m]\n"}),
    Case("yaml-duplicate-key", ["run", S], [f"{S}:", "'budget' is given twice", "remove one"],
         {S: TINY_SPEC_TEXT + "budget: {num_samples: 100000}\n"}),
    Case("yaml-duplicate-nested-key", ["validate", S], ["'hidden_size' is given twice", "lines"],
         {S: TINY_SPEC_TEXT.replace("    hidden_size: 8\n", "    hidden_size: 8\n    hidden_size: 4000\n")}),
    Case("yaml-duplicate-in-set", ["run", S, "--set", "budget={num_samples: 1, num_samples: 9}"],
         ["--set budget=", "'num_samples' is given twice"], {S: TINY_SPEC_TEXT}),
    # ---- spec fields: names, types, bounds, consistency
    Case("spec-unknown-key", ["validate", S], ["bugdet", "unknown field", "did you mean 'budget'"],
         {S: spec_text(bugdet="{}")}),
    Case("spec-unknown-nested-key", ["validate", S], ["budget.num_sample", "did you mean 'num_samples'"],
         {S: spec_text(budget="{num_sample: 3}")}),
    Case("spec-wrong-type", ["validate", S], ["budget.num_samples", "integer"],
         {S: spec_text(budget="{num_samples: many}")}),
    Case("spec-exponent-is-text", ["validate", S], ["budget.num_samples", "integer"],
         {S: spec_text(budget="{num_samples: 10^12}")}),
    Case("spec-yes-is-not-a-number", ["validate", S],
         ["budget.max_concurrent", "yes/no value", "write a number"],
         {S: spec_text(budget="{num_samples: 2, max_concurrent: yes}")}),
    Case("spec-bool-as-bound", ["validate", S], ["space.common.lr.uniform", "yes/no value"],
         {S: spec_text(space="{common: {lr: {uniform: [no, 0.1]}}}")}),
    Case("spec-bool-for-model-int", ["validate", S], ["space.common.hidden_size", "yes/no value"],
         {S: TINY_SPEC_TEXT.replace("hidden_size: 8", "hidden_size: true")}),
    Case("spec-absurd-budget", ["run", S], ["budget.num_samples", "1,000,000,000,000", "10,000"],
         {S: spec_text(budget="{num_samples: 1000000000000}")}),
    Case("spec-absurd-epochs", ["validate", S], ["budget.max_epochs", "less than or equal"],
         {S: spec_text(budget="{num_samples: 2, max_epochs: 100000000}")}),
    Case("spec-absurd-data", ["validate", S], ["task.train_size", "less than or equal"],
         {S: spec_text(task="{name: art, pairs: 2, train_size: 1000000000000}")}),
    Case("spec-target-not-an-accuracy", ["validate", S], ["budget.target", "val_accuracy is in [0, 1]",
                                                           "target: 0.99"],
         {S: spec_text(budget="{num_samples: 2, target: 99}")}),
    Case("spec-target-not-a-number", ["validate", S], ["budget.target", "number"],
         {S: spec_text(budget="{num_samples: 2, target: .nan}")}),
    Case("spec-metric-not-reported", ["validate", S],
         ["metric.name", "'val_acc'", "did you mean 'val_accuracy'"],
         {S: spec_text(metric="{name: val_acc}")}),
    Case("spec-metric-wrong-direction", ["validate", S], ["metric", "mode: max", "use mode: min"],
         {S: spec_text(metric="{name: val_loss, mode: max}")}),
    Case("spec-negative-lr", ["validate", S], ["train.lr", "greater than 0"],
         {S: spec_text(train="{lr: -0.1}")}),
    Case("spec-zero-samples", ["validate", S], ["budget.num_samples", "greater than or equal to 1"],
         {S: spec_text(budget="{num_samples: 0}")}),
    Case("spec-inverted-range", ["run", S], ["space.common.lr", "inverted", "lower bound first"],
         {S: spec_text(space="{common: {lr: {loguniform: [1.0e-2, 1.0e-4]}}}")}),
    Case("spec-log-range-at-zero", ["validate", S], ["space.common.lr", "> 0"],
         {S: spec_text(space="{common: {lr: {loguniform: [0, 1.0e-2]}}}")}),
    Case("spec-two-kinds", ["validate", S], ["space.common.lr", "exactly one", "uniform: [lo, hi]"],
         {S: spec_text(space="{common: {lr: {uniform: [0.1, 1], choice: [0.1]}}}")}),
    Case("spec-empty-choice", ["validate", S], ["space.common.hidden_size", "at least one value"],
         {S: spec_text(space="{common: {hidden_size: {choice: []}}}")}),
    Case("spec-unknown-model", ["validate", S], ["models", "gru", "fw_lstm"], {S: spec_text(models="[gru]")},
         absent=["Field required"]),
    Case("spec-misspelt-model", ["run", S], ["models", "did you mean 'fw_lstm'"],
         {S: spec_text(models="[fw_lsmt]")}, absent=["Field required", "add this field"]),
    Case("spec-model-twice", ["validate", S], ["models", "listed twice"],
         {S: spec_text(models="[lstm, lstm]")}),
    Case("spec-no-models", ["validate", S], ["models", "at least 1"], {S: spec_text(models="[]")}),
    Case("spec-missing-models", ["validate", S], ["models", "add this field"],
         {S: "\n".join(ln for ln in TINY_SPEC_TEXT.splitlines() if not ln.startswith("models:")) + "\n"}),
    Case("spec-section-not-listed", ["validate", S], ["space.fw_rnn", "not a listed model"],
         {S: spec_text(space="{fw_rnn: {decay: {uniform: [0.5, 0.9]}}}")}),
    Case("spec-param-of-other-model", ["validate", S], ["space.lstm.fast_lr", "not a hyperparameter of lstm"],
         {S: spec_text(space="{lstm: {fast_lr: {uniform: [0.1, 1]}}}")}),
    Case("spec-misspelt-param", ["validate", S], ["space.fw_lstm.fast_rl", "did you mean 'fast_lr'"],
         {S: spec_text(models="[fw_lstm]", space="{fw_lstm: {fast_rl: {uniform: [0.1, 1]}}}")}),
    Case("spec-choice-out-of-bounds", ["validate", S], ["space.fw_lstm.decay", "1.5"],
         {S: spec_text(models="[fw_lstm]", space="{fw_lstm: {decay: {choice: [0.5, 1.5]}}}")}),
    Case("spec-reserved-model-name", ["run", S], ["space.common.model.name", "models:"],
         {S: spec_text(models="[lstm]", space="{common: {model.name: fw_lstm}}")}),
    Case("spec-reserved-epochs", ["validate", S], ["space.common.epochs", "budget.max_epochs"],
         {S: spec_text(space="{common: {epochs: {int: [1, 5]}}}")}),
    Case("spec-reserved-device", ["validate", S], ["space.common.train.device", "resources.gpu"],
         {S: spec_text(space="{common: {train.device: cuda}}")}),
    Case("spec-grace-over-epochs", ["validate", S], ["scheduler.grace_period", "lower grace_period"],
         {S: spec_text(scheduler="{name: asha, grace_period: 9}")}),
    Case("spec-bootstrap-not-asha", ["validate", S], ["scheduler.bootstrap_count", "only ASHA", "name: asha"],
         {S: spec_text(scheduler="{name: median, bootstrap_count: 1}")}),
    Case("spec-bootstrap-over-trials", ["run", S], ["scheduler.bootstrap_count", "budget.num_samples"],
         {S: spec_text(scheduler="{name: asha, bootstrap_count: 4}")}),
    Case("spec-bootstrap-negative", ["validate", S], ["scheduler.bootstrap_count"],
         {S: spec_text(scheduler="{name: asha, bootstrap_count: -1}")}),
    Case("spec-pairs-over-keys", ["validate", S], ["task", "num_keys"],
         {S: spec_text(task="{name: art, pairs: 30, num_keys: 26}")}),
    Case("spec-gpu-fraction-over-1", ["validate", S], ["resources.gpu", "whole GPUs"],
         {S: spec_text(resources="{cpu: 1, gpu: 1.5}")}),
    Case("spec-unknown-sampler", ["validate", S], ["searcher.sampler", "tpe"],
         {S: spec_text(searcher="{sampler: bayes}")}),
    Case("spec-unknown-scheduler", ["validate", S], ["scheduler.name", "asha"],
         {S: spec_text(scheduler="{name: pbt}")}),
    Case("spec-name-path-traversal", ["validate", S], ["name", "letters, digits"],
         {S: spec_text(name="../../etc")},
         absent=["A-Za-z"]),
    Case("spec-name-empty", ["validate", S], ["name", "empty"], {S: spec_text(name="''")}),
    Case("spec-experiment-empty", ["run", S], ["tracking.experiment", "empty"],
         {S: spec_text(tracking="{experiment: ''}")}),
    Case("run-name-empty", ["run", S, "--name", ""], ["--name", "empty"], {S: TINY_SPEC_TEXT}),
    Case("run-name-invalid", ["run", S, "--name", "a b"], ["--name", "letters, digits"], {S: TINY_SPEC_TEXT},
         absent=["A-Za-z"]),
    Case("run-set-unknown", ["run", S, "--set", "budget.num_sample=3"], ["budget.num_sample", "num_samples"],
         {S: TINY_SPEC_TEXT}),
    # ---- trial configs and `sweep train` flags
    Case("config-missing", ["train", "nope.yaml"], ["nope.yaml", "not found"]),
    Case("config-typo-in-model", ["train", "c.yaml"], ["model.hidden_sise", "did you mean 'hidden_size'"],
         {"c.yaml": GOOD_TRIAL.replace("hidden_size", "hidden_sise")}),
    Case("config-unknown-section", ["validate", "c.yaml"], ["modle", "did you mean 'model'"],
         {"c.yaml": FW_LSTM + "modle: {}\n"}),
    Case("config-zero-epochs", ["train", "c.yaml"], ["train.epochs", "greater than or equal to 1"],
         {"c.yaml": GOOD_TRIAL.replace("epochs: 1", "epochs: 0")}),
    Case("config-yes-for-int", ["train", "c.yaml"], ["train.batch_size", "yes/no value"],
         {"c.yaml": GOOD_TRIAL.replace("batch_size: 16", "batch_size: yes")}),
    Case("config-nan-for-an-unbounded-float", ["validate", "c.yaml"], ["model.forget_bias", "finite number"],
         {"c.yaml": FW_LSTM.replace("{name: fw_lstm}", "{name: fw_lstm, forget_bias: .nan}")}),
    Case("config-infinite-rate", ["train", "c.yaml"], ["train.lr", "finite number"],
         {"c.yaml": GOOD_TRIAL.replace("batch_size: 16}", "batch_size: 16, lr: .inf}")},
         absent=["less than or equal"]),
    Case("spec-nan-constant-in-space", ["validate", S], ["forget_bias", "finite number"],
         {S: TINY_SPEC_TEXT.replace("models: [lstm]", "models: [ln_lstm]").replace(
             "hidden_size: 8", "hidden_size: 8\n    forget_bias: .nan")}),
    Case("config-is-a-sweep-spec", ["train", "--config", "c.yaml"], ["models", "sweep spec", "sweep run"],
         {"c.yaml": TINY_SPEC_TEXT}),
    Case("config-two-problems-at-once", ["validate", "c.yaml"],
         ["3 problem(s)", "model.decay", "train.batch_size", "train.grad_clip"],
         {"c.yaml": FW_LSTM.replace("{name: fw_lstm}", "{name: fw_lstm, decay: 1.5}")
          + "train: {batch_size: 0, grad_clip: -1}\n"}),
    Case("config-misspelt-model", ["validate", "c.yaml"], ["model", "did you mean 'fw_lstm'"],
         {"c.yaml": FW_LSTM.replace("{name: fw_lstm}", "{name: fw_lsmt}")}, absent=["Field required"]),
    Case("validate-two-files-both-bad", ["validate", "a.yaml", "b.yaml"],
         ["2 of 2 files", "a.yaml", "train.lr", "b.yaml", "task.seed"],
         {"a.yaml": "train: {lr: 0}\n", "b.yaml": "task: {seed: -1}\n"}),
    Case("train-negative-lr", ["train", "--lr", "-1"], ["train.lr", "greater than 0"]),
    Case("train-pairs-over-keys", ["train", "--pairs", "30"], ["task", "pairs=30", "num_keys"]),
    Case("train-unknown-model", ["train", "--model", "gru"], ["--model", "gru", "fw_lstm"]),
    Case("train-misspelt-model", ["train", "--model", "fw_lsmt"], ["--model", "did you mean 'fw_lstm'"]),
    Case("train-unknown-task", ["train", "--task", "copy"], ["--task", "copy", "mart"]),
    Case("train-bad-device", ["train", "--device", "tpu"], ["--device", "cuda"]),
    Case("train-cuda-without-gpu", ["train", "--device", "cuda"],
         ["train.device", "no CUDA GPU", "--device auto"], without_gpu=True),
    Case("config-cuda-without-gpu", ["train", "c.yaml"], ["train.device", "no CUDA GPU"],
         {"c.yaml": GOOD_TRIAL.replace("batch_size: 16", "batch_size: 16, device: cuda")}, without_gpu=True),
    Case("train-set-typo", ["train", "--set", "train.lrr=0.1"], ["train.lrr", "did you mean 'lr'"]),
    Case("train-set-field-of-other-model", ["train", "--model", "lstm", "--set", "model.fast_lr=0.3"],
         ["model.fast_lr", "unknown field"]),
    Case("train-set-without-equals", ["train", "--set", "train.lr"],
         ["--set train.lr", "section.field=value"]),
    Case("train-set-bad-type", ["train", "--set", "train.batch_size=lots"], ["train.batch_size", "integer"]),
    Case("train-flag-bad-type", ["train", "--pairs", "four"], ["--pairs", "integer", "sweep train --help"]),
    Case("train-resume-not-a-run", ["train", "--resume", "nowhere"], ["--resume", "config.yaml"]),
    Case("train-resume-with-config", ["train", "--resume", "r", "--config", "c.yaml"],
         ["--config", "--resume"],
         {"c.yaml": FW_LSTM}),
    Case("train-out-is-a-file", ["train", "--out", "f.txt"], ["--out", "is a file"], {"f.txt": "x"}),
    Case("train-out-under-a-file", ["train", "--out", "f.txt/run"], ["--out", "cannot write"],
         {"f.txt": "x"}),
    Case("train-out-not-empty", ["train", "--out", "d"], ["--out", "already holds files", "--resume"],
         {"d/x": "x"}),
    Case("train-too-few-sequences", ["train", "--out", "new", "--set", "task.num_keys=2", "--set",
                                     "task.num_values=2", "--pairs", "1", "--set", "task.train_size=20"],
         ["task.val_size", "distinct"]),
    # ---- the command line itself: the same `error:` shape as everything else
    Case("cli-unknown-command", ["trian"], ["error:", "trian", "did you mean 'train'", "--help"],
         real_cli=True),
    Case("cli-unknown-option", ["validate", S, "--num-samples", "3"], ["error:", "--num-samples"],
         {S: TINY_SPEC_TEXT}),
    Case("cli-misspelt-option", ["train", "--hidden", "20"], ["error:", "--hidden", "--hidden-size"]),
    Case("cli-missing-argument", ["run"], ["error:", "SPEC", "sweep run --help"]),
    Case("cli-bad-choice", ["export", "x", "--format", "xml"], ["error:", "--format", "yaml", "json"]),
    # ---- sweep state on disk
    Case("run-over-existing-sweep", ["run", S], ["faults-tiny", "already exists", "sweep resume faults-tiny"],
         {S: TINY_SPEC_TEXT, f"{SWEEPS}/faults-tiny/tuner.pkl": "",
          f"{SWEEPS}/faults-tiny/sweep_spec.yaml": TINY_SPEC_TEXT}),
    Case("run-over-spec-only-sweep", ["run", S], ["faults-tiny", "stopped before its first trial", "rm -r",
                                                  "--name"],
         {S: TINY_SPEC_TEXT, f"{SWEEPS}/faults-tiny/sweep_spec.yaml": TINY_SPEC_TEXT}),
    Case("resume-spec-only-sweep", ["resume", "faults-tiny"], ["faults-tiny", "stopped before", "sweep run"],
         {f"{SWEEPS}/faults-tiny/sweep_spec.yaml": TINY_SPEC_TEXT}),
    Case("show-corrupt-spec", ["show", "faults-tiny"], ["sweep_spec.yaml", "damaged", "line 3", "rm -r"],
         {f"{SWEEPS}/faults-tiny/sweep_spec.yaml": CORRUPT_SPEC}),
    Case("resume-corrupt-spec", ["resume", "faults-tiny"], ["sweep_spec.yaml", "damaged", "restore"],
         {f"{SWEEPS}/faults-tiny/sweep_spec.yaml": CORRUPT_SPEC}),
    Case("resume-unknown-sweep", ["resume", "no-such-sweep"], ["no-such-sweep", "sweep list"]),
    Case("show-unknown-sweep", ["show", "no-such-sweep"], ["no-such-sweep", "sweep list"]),
    Case("export-unknown-sweep", ["export", "no-such-sweep"], ["no-such-sweep", "sweep list"]),
    Case("sync-unknown-sweep", ["sync", "no-such-sweep"], ["no-such-sweep", "sweep list"]),
    Case("sync-corrupt-spec", ["sync", "faults-tiny"], ["sweep_spec.yaml", "damaged", "rm -r"],
         {f"{SWEEPS}/faults-tiny/sweep_spec.yaml": CORRUPT_SPEC}),
    Case("compare-spec-missing", ["compare", "nope.yaml"], ["nope.yaml", "not found"]),
    Case("compare-reproduce-bad-spec", ["compare", "reproduce.yaml"],
         ["reproduce.yaml", "under spec", "compare.seeds", "at least 2"],
         {"reproduce.yaml": "comparison: x\ngit_commit: abc\nspec: {name: x, models: [lstm], "
                            "compare: {seeds: 1}}\n"}),
    # ---- environment and servers that are not there
    Case("run-tracking-uri-a-folder", ["run", S, "--tracking-uri", "notaurl"],
         ["--tracking-uri", "file store", "sqlite:///", "MLFLOW_ALLOW_FILE_STORE"], {S: TINY_SPEC_TEXT}),
    Case("run-tracking-uri-file-scheme", ["run", S, "--tracking-uri", "file:///tmp/mlruns"],
         ["--tracking-uri", "file store", "sqlite:///"], {S: TINY_SPEC_TEXT}),
    Case("run-tracking-uri-sqlite-unwritable", ["run", S], ["MLFLOW_TRACKING_URI", "cannot write /proc",
                                                             "sqlite:///PATH"], {S: TINY_SPEC_TEXT},
         {"MLFLOW_TRACKING_URI": "sqlite:////proc/fwsweep.db"}),
    Case("run-tracking-uri-db-unopenable", ["run", S, "--tracking-uri", "mysql://u:hunter2@127.0.0.1:{port}/x"],
         ["--tracking-uri", "cannot open", "u:***@"], {S: TINY_SPEC_TEXT}, absent=["hunter2"]),
    Case("run-address-port-out-of-range", ["run", S, "--address", "127.0.0.1:99999"],
         ["--address", "a port from 1 to 65535"], {S: TINY_SPEC_TEXT}),
    Case("run-storage-scheme-unsupported", ["run", S, "--storage", "hdfs://localhost:9000/x"],
         ["--storage", "hdfs://", "s3://BUCKET/PREFIX", "gs://BUCKET/PREFIX"], {S: TINY_SPEC_TEXT}),
    Case("run-storage-no-bucket", ["run", S, "--storage", "s3://"],
         ["--storage", "names no bucket", "s3://BUCKET/PREFIX"], {S: TINY_SPEC_TEXT}),
    Case("list-storage-scheme-unsupported", ["list", "--storage", "mock://x"], ["--storage", "mock://"]),
    # a command that only reads the storage says it cannot read it (not "cannot write")
    Case("list-storage-is-a-file", ["list", "--storage", "{tmp}/afile"],
         ["--storage", "cannot read", "not a directory", "the folder or s3://BUCKET/PREFIX the sweeps"],
         {"afile": "x"}, absent=["cannot write", "writable"]),
    Case("show-storage-is-a-file", ["show", "foo", "--storage", "{tmp}/afile"],
         ["--storage", "cannot read", "the sweeps were run with"], {"afile": "x"}, absent=["cannot write"]),
    Case("run-no-ray-cluster", ["run", S, "--address", "127.0.0.1:{port}"],
         ["--address", "no Ray cluster answers"],
         {S: TINY_SPEC_TEXT}, real_cli=True),
    Case("run-no-tracking-server", ["run", S, "--tracking-uri", "http://127.0.0.1:{port}"],
         ["http://127.0.0.1:{port}", "fix"], {S: TINY_SPEC_TEXT}),
    Case("run-spec-tracking-uri-down", ["run", S], ["127.0.0.1:{port}", "fix"],
         {S: spec_text(tracking="{uri: 'http://127.0.0.1:{port}'}")}),
    Case("env-home-is-a-file", ["run", S], ["FWSWEEP_HOME", "fix"], {S: TINY_SPEC_TEXT, "afile": "x"},
         {"FWSWEEP_HOME": "{tmp}/afile"}),
    Case("env-home-unwritable", ["run", S], ["FWSWEEP_HOME", "fix"], {S: TINY_SPEC_TEXT},
         {"FWSWEEP_HOME": "/proc/fwsweep-home"}),
    Case("env-mlflow-uri-dead", ["run", S], ["127.0.0.1:{port}", "MLFLOW_TRACKING_URI", "fix"],
         {S: TINY_SPEC_TEXT},
         {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}),
    Case("env-ray-address-dead", ["run", S], ["127.0.0.1:{port}", "RAY_ADDRESS"], {S: TINY_SPEC_TEXT},
         {"RAY_ADDRESS": "127.0.0.1:{port}"}),
    Case("env-ray-address-not-host-port", ["run", S], ["RAY_ADDRESS:", "'garbage' is not HOST:PORT"],
         {S: TINY_SPEC_TEXT}, {"RAY_ADDRESS": "garbage"}),
    Case("env-s3-endpoint-malformed", ["list", "--storage", "s3://b/x"],
         ["FWSWEEP_S3_ENDPOINT", "is not an endpoint", "http://HOST:PORT"], {},
         {"FWSWEEP_S3_ENDPOINT": "http://h:notaport"}),
    # ---- a value typed on the command line is named by the flag that gave it, not by the file
    Case("train-flag-negative-lr", ["train", "--lr", "-1"], ["train.lr (--lr -1", "greater than 0"]),
    Case("run-set-zero-samples", ["run", S, "--set", "budget.num_samples=0"],
         ["budget.num_samples (--set budget.num_samples=0)", "greater than or equal to 1"],
         {S: TINY_SPEC_TEXT}),
    # ---- the local MLflow server's database, damaged (its server would die at every start)
    Case("local-mlflow-db-half-migrated", ["ui", "--detach"],
         ["home/mlflow/mlflow.db", "damaged", "_alembic_tmp_experiments", "mv ", "sweep sync"],
         {"home/mlflow/mlflow.db": HALF_MIGRATED}, real_cli=True),
    Case("local-mlflow-db-not-sqlite", ["run", S],
         ["home/mlflow/mlflow.db", "damaged", "not a database", "mv "],
         {S: TINY_SPEC_TEXT, "home/mlflow/mlflow.db": b"not a database\n" * 300}),
]


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{port}", str(DEAD_PORT))


def _prepare(case: Case, tmp_path: Path) -> dict[str, str]:
    """The case's files and an FWSWEEP_HOME with an earlier sweep; the environment to run it with."""
    home = tmp_path / "home"
    (home / "sweeps" / "earlier").mkdir(parents=True)
    (home / "sweeps" / "earlier" / "state.json").write_text("{}")
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is FIFO:
            os.mkfifo(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(_fill(str(content), tmp_path))
    return {"FWSWEEP_HOME": str(home)} | {k: _fill(v, tmp_path) for k, v in case.env.items()}


def _check(case: Case, code: int, output: str, tmp_path: Path) -> None:
    output = re.sub(r"[\s│╭╮╰╯─]+", " ", output)
    assert code == 2, f"exit {code}, expected 2:\n{output}"
    assert "Traceback" not in output, output
    for word in case.expect:
        assert _fill(word, tmp_path).lower() in output.lower(), f"{word!r} missing from:\n{output}"
    for word in case.absent + ([] if "add this field" in case.expect else ["Field required"]):
        assert word.lower() not in output.lower(), f"{word!r} should not be in:\n{output}"
    assert len(output) < 3000, f"not one short message ({len(output)} chars):\n{output}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_process(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    if case.without_gpu:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is visible here: asking for cuda is then right")
    env = _prepare(case, tmp_path)
    monkeypatch.chdir(tmp_path)
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = snapshot(tmp_path)
    code, output = run_cli_in_process([_fill(a, tmp_path) for a in case.argv], monkeypatch, capsys)
    _check(case, code, output, tmp_path)
    assert snapshot(tmp_path) == before, "the command created or changed files although it failed"


REAL = [c for c in CASES if c.real_cli]


@pytest.mark.slow
@pytest.mark.parametrize("case", REAL, ids=[c.id for c in REAL])
def test_bad_input_through_the_real_cli(case: Case, tmp_path: Path) -> None:
    env = _prepare(case, tmp_path)
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    full_env.update({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}, **env)
    before = snapshot(tmp_path)
    argv = [str(SWEEP), *[_fill(a, tmp_path) for a in case.argv]]
    result = subprocess.run(argv, cwd=tmp_path, env=full_env, capture_output=True, text=True,
                            timeout=60)  # a hang fails here
    _check(case, result.returncode, result.stdout + result.stderr, tmp_path)
    assert snapshot(tmp_path) == before, "the command created or changed files although it failed"


def test_every_command_is_covered() -> None:
    """A table that never reaches a command would pass vacuously: each command that reads what the user
    gives is in at least one case, and every command named in the table exists (a removed command fails
    here; it is not skipped)."""
    import typer.main

    from sweep.cli import app

    commands = set(typer.main.get_command(app).commands)
    used = {c.argv[0] for c in CASES if c.id != "cli-unknown-command"}
    assert used <= commands, f"cases for commands that do not exist: {used - commands}"
    reading_input = {"run", "resume", "export", "show", "sync", "train", "validate", "compare"}
    assert reading_input <= used, f"commands without a bad-input case: {reading_input - used}"


# ---- resources no node of the cluster has: refused once Ray is up, before Tune or MLflow write anything


@pytest.mark.slow
@pytest.mark.parametrize(("resources", "expect"), [
    ("{cpu: 64, gpu: 0}", ["resources", "64 CPU", "resources.cpu to at most"]),
    ("{cpu: 1, gpu: 1}", ["resources", "1 GPU", "resources.gpu: 0"]),
])
def test_resources_no_node_has_exit_2_before_anything_is_created(resources: str, expect: list[str],
                                                                  mlflow_server: str, tmp_path: Path) -> None:
    import mlflow

    name = f"no-capacity-{abs(hash(resources)) % 1000}"
    (tmp_path / S).write_text(spec_text(name=name, resources=resources))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"FWSWEEP_HOME": str(tmp_path / "home"), "HOME": str(tmp_path), "COLUMNS": "200"}
    result = subprocess.run([str(SWEEP), "run", S, "--tracking-uri", mlflow_server], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)  # a hang (Tune waiting) fails here
    case = Case("resources", [], expect)
    _check(case, result.returncode, result.stdout + result.stderr, tmp_path)
    assert not (tmp_path / "home" / "sweeps" / name).exists(), "a sweep folder was created"
    assert mlflow.MlflowClient(mlflow_server).get_experiment_by_name(name) is None, "an MLflow run was made"

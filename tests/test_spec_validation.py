"""Bad sweep specs and flags: each is a message naming the field and the fix, exit code 2, no traceback,
and nothing started or written (no Ray, no MLflow server, no sweep folder)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from sweep.cli import main

GOOD = {
    "name": "bad-spec-test",
    "task": {"name": "art", "pairs": 2, "train_size": 200, "val_size": 50, "test_size": 50},
    "train": {"epochs": 3},
    "models": ["fw_lstm", "lstm"],
    "space": {"common": {"lr": {"loguniform": [1e-3, 1e-2]}}, "fw_lstm": {"decay": {"uniform": [0.8, 0.95]}}},
    "scheduler": {"name": "asha", "grace_period": 1},
    "budget": {"num_samples": 2},
}


def _with(**changes) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return spec


CASES = [
    ("unknown model", _with(models=["fw_lstm", "gru"]), "unknown model"),
    ("unknown param", _with(space__fw_lstm={"decay_rate": {"uniform": [0.1, 0.2]}}), "not a hyperparameter"),
    ("section not a listed model", _with(space__fw_rnn={"decay": 0.9}), "not a listed model"),
    ("empty choice", _with(space__common={"hidden_size": {"choice": []}}), "at least one value"),
    ("inverted range", _with(space__common={"lr": {"uniform": [0.1, 0.01]}}), "inverted"),
    ("log range <= 0", _with(space__common={"lr": {"loguniform": [0.0, 0.1]}}), "lower bound > 0"),
    ("two kinds at once", _with(space__common={"lr": {"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]}}),
     "exactly one of"),
    ("value invalid for the field", _with(space__fw_lstm={"decay": {"uniform": [0.5, 1.5]}}), "decay"),
    ("negative learning rate", _with(space__common={"lr": -0.1}), "train.lr"),
    ("grace > max epochs", _with(scheduler__grace_period=5), "grace_period"),
    ("gpu fraction > 1", _with(resources={"cpu": 1, "gpu": 1.5}), "whole GPUs"),
    ("unknown sampler", _with(searcher={"sampler": "bayes"}), "searcher.sampler"),
    ("unknown scheduler", _with(scheduler={"name": "pbt"}), "scheduler.name"),
    ("typo in a field", _with(budget={"num_sample": 4}), "unknown field"),
    ("zero samples", _with(budget={"num_samples": 0}), "budget.num_samples"),
    ("bad sweep name", _with(name="my sweep!"), "name"),
    ("no models", _with(models=[]), "models"),
]


def _run(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["sweep", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err + captured.out


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _nothing_started(tmp_path: Path) -> None:
    import ray

    assert not ray.is_initialized()
    assert not (tmp_path / "home" / "mlflow").exists(), "an MLflow server was started for a bad input"
    assert not (tmp_path / "home" / "sweeps").exists(), "a sweep folder was written for a bad input"


@pytest.mark.parametrize(("case", "spec", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_spec(case, spec, expected, tmp_path, monkeypatch, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out = _run(["run", str(path)], monkeypatch, capsys)
    assert code == 2, out
    assert expected in out, out
    assert "Traceback" not in out
    _nothing_started(tmp_path)


@pytest.mark.parametrize(
    ("case", "text", "expected"),
    [
        ("malformed YAML", "name: x\nmodels: [fw_lstm\n", "malformed YAML"),
        ("not a mapping", "- fw_lstm\n- lstm\n", "must be a YAML mapping"),
        ("empty file", "", "must be a YAML mapping"),
    ],
)
def test_unreadable_spec(case, text, expected, tmp_path, monkeypatch, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    code, out = _run(["run", str(path)], monkeypatch, capsys)
    assert code == 2 and expected in out, out
    _nothing_started(tmp_path)


def test_missing_file(tmp_path, monkeypatch, capsys):
    code, out = _run(["run", str(tmp_path / "nope.yaml")], monkeypatch, capsys)
    assert code == 2 and "file not found" in out, out
    _nothing_started(tmp_path)


def test_unreachable_ray_address_fails_fast(tmp_path, monkeypatch, capsys):
    import time

    from sweep.tracking import free_port

    port = free_port()  # a port where nothing listens
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    start = time.monotonic()
    code, out = _run(["run", str(path), "--address", f"127.0.0.1:{port}"], monkeypatch, capsys)
    assert code == 2 and "--address" in out and "no Ray cluster answers" in out, out
    assert time.monotonic() - start < 15
    _nothing_started(tmp_path)


def test_unreachable_tracking_uri(tmp_path, monkeypatch, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    code, out = _run(["run", str(path), "--tracking-uri", "http://127.0.0.1:9"], monkeypatch, capsys)
    assert code == 2 and "tracking-uri" in out, out
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["resume", "no-such-sweep"], "no sweep"),
        (["export", "no-such-sweep"], "no sweep named"),
        (["show", "no-such-sweep"], "no sweep named"),
    ],
)
def test_unknown_sweep(args, expected, tmp_path, monkeypatch, capsys):
    code, out = _run(args, monkeypatch, capsys)
    assert code == 2 and expected in out, out

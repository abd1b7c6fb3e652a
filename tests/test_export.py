"""Choosing and writing a sweep's best configs (overall, top-k, per model; YAML with provenance, JSON)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from sweep import paths
from sweep.config import SweepSpec, dump_yaml, load_trial_config
from sweep.errors import UserError
from sweep.export import TrialRecord, best_trials, write_exports
from sweep.runner import SPEC_FILE
from sweep.space import trial_config

SPEC = SweepSpec.model_validate({
    "name": "export-test",
    "task": {"pairs": 2, "train_size": 100, "val_size": 20, "test_size": 20},
    "train": {"epochs": 5},
    "models": ["fw_lstm", "lstm"],
    "space": {"common": {"lr": {"loguniform": [1e-4, 1e-2]}}, "fw_lstm": {"decay": {"uniform": [0.5, 0.9]}}},
})


def _record(tid: str, model: str, acc: float, epochs: int, status: str = "TERMINATED") -> TrialRecord:
    params = {"model": model, "lr": 0.001 * (1 + len(tid))}
    if model == "fw_lstm":
        params["fw_lstm.decay"] = 0.7
    config = trial_config(SPEC, params)
    config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": epochs})})
    return TrialRecord(trial_id=tid, model=model, config=config, status=status, params=params,
                       metrics={"val_accuracy": acc, "epoch": epochs})


RECORDS = [
    _record("a", "fw_lstm", 0.91, 5),
    _record("bb", "lstm", 0.60, 5),
    _record("ccc", "fw_lstm", 0.97, 5),
    _record("dddd", "lstm", 0.40, 1),  # stopped early by the scheduler
    _record("eeeee", "fw_lstm", math.nan, 2),  # diverged: never "best"
    _record("f", "lstm", 0.99, 3, status="ERROR"),  # failed: never "best"
]


@pytest.fixture
def sweep_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    folder = paths.sweep_dir(SPEC.name)
    folder.mkdir(parents=True)
    (folder / SPEC_FILE).write_text(dump_yaml(SPEC.model_dump(mode="json")))
    return folder


def test_best_trials_rank_by_final_metric_and_skip_failures():
    assert [r.trial_id for r in best_trials(RECORDS, "val_accuracy", "max", k=3)] == ["ccc", "a", "bb"]
    assert [r.trial_id for r in best_trials(RECORDS, "val_accuracy", "min", k=1)] == ["dddd"]
    per_model = best_trials(RECORDS, "val_accuracy", "max", k=1, per_model=True)
    assert {(r.model, r.trial_id) for r in per_model} == {("fw_lstm", "ccc"), ("lstm", "bb")}
    assert RECORDS[3].stopped_early(5) and not RECORDS[0].stopped_early(5)


def test_yaml_exports_carry_provenance_and_load_as_trial_configs(sweep_on_disk):
    files = write_exports(SPEC.name, records=RECORDS, top_k=2, per_model=True)
    names = [f.name for f in files]
    assert names == ["best.yaml", "top1.yaml", "top2.yaml", "best_fw_lstm.yaml", "best_lstm.yaml"]
    assert all(f.parent == sweep_on_disk / "exports" for f in files)
    best = files[0].read_text()
    assert best.startswith("# fwsweep export: trial ccc (fw_lstm) of sweep 'export-test'")
    assert "val_accuracy = 0.97 after 5 epoch(s)" in best
    config = load_trial_config(files[0])
    assert config == RECORDS[2].config  # the exact config the trial ran
    assert config.model.name == "fw_lstm" and config.model.decay == 0.7
    assert load_trial_config(files[4]).model.name == "lstm"
    index = json.loads((sweep_on_disk / "exports" / "index.json").read_text())
    assert index["exports"][0] == {"file": "best.yaml", "trial_id": "ccc", "model": "fw_lstm",
                                   "val_accuracy": 0.97, "epochs": 5}


def test_json_export_and_custom_folder(sweep_on_disk, tmp_path):
    out = tmp_path / "out"
    (path,) = write_exports(SPEC.name, records=RECORDS, fmt="json", out=out)
    assert path == out / "best.json"
    data = json.loads(path.read_text())
    assert data["model"]["name"] == "fw_lstm" and data["train"]["epochs"] == 5
    assert load_trial_config(path) == RECORDS[2].config  # JSON is YAML: `sweep train` reads it too
    assert yaml.safe_load((out / "index.json").read_text())["sweep"] == SPEC.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"fmt": "xml"}, "--format"), ({"top_k": 0}, "--top-k"), ({"records": []}, "no trial")],
)
def test_bad_export_requests(sweep_on_disk, kwargs, message):
    kwargs = {"records": RECORDS} | kwargs
    with pytest.raises(UserError, match=message):
        write_exports(SPEC.name, **kwargs)
    assert not (sweep_on_disk / "exports" / "best.json").exists()


@pytest.mark.parametrize("where", ["a file", "under a file", "/proc"])
def test_an_out_folder_that_cannot_be_written_is_one_clear_error(where, sweep_on_disk, tmp_path, monkeypatch,
                                                                   capsys):
    from conftest import run_cli_in_process

    from sweep.store import open_sweep

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = {"a file": blocker, "under a file": blocker / "exports", "/proc": "/proc/fwsweep-exports"}[where]
    monkeypatch.setattr(type(open_sweep(SPEC.name)), "load_trials", lambda self, spec: RECORDS)
    code, output = run_cli_in_process(["export", SPEC.name, "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in output, output
    assert "--out" in output and "cannot write the exports" in output and "Fix:" in output
    assert blocker.read_text() == "not a folder"
    assert not (sweep_on_disk / "exports").exists()


def test_unknown_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path))
    with pytest.raises(UserError, match="no sweep named"):
        write_exports("nope", records=RECORDS)


def test_printed_paths_and_commands_are_shown_as_they_are(tmp_path, capsys):
    """The summary's `re-run it:` line and a damaged database's `mv` are pasted into a shell as printed; a
    path's brackets are not read as the terminal's markup."""
    import shlex
    import subprocess

    from sweep.cli.sweep_cmds import _summary
    from sweep.runner import SweepResult
    from sweep.tracking import check_store

    folder = tmp_path / "my runs [bold]x[/] #1"
    best = folder / "exports" / "best.yaml"
    result = SweepResult(name="s", path=str(folder), status_counts={}, exported=[best])
    _summary(result, SweepSpec.model_validate({"name": "s", "models": ["lstm"]}))
    out = capsys.readouterr().out.splitlines()
    assert f"exported:   {best}" in out
    (line,) = [x for x in out if x.startswith("re-run it:")]
    assert shlex.split(line.removeprefix("re-run it:")) == ["sweep", "train", "--config", str(best)]

    folder.mkdir(parents=True)
    (folder / "mlflow.db").write_bytes(b"not a database\n" * 300)
    with pytest.raises(UserError) as info:
        check_store(folder)
    command = info.value.problems[0].fix.split("`")[1]
    subprocess.run(["sh", "-c", command], check=True)
    assert (folder / "mlflow.db.damaged").exists() and not (folder / "mlflow.db").exists()

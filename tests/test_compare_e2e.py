"""A tiny comparison end to end: 2 models x 1 difficulty, 2 tuning trials each, 2 seeds; real Ray, Optuna and
MLflow. The report's numbers must be the seed runs' numbers as MLflow recorded them."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest
import yaml

from sweep import paths
from sweep.compare import ROLE_TAG, Manifest, load_seed_runs, run_comparison, tuning_name
from sweep.config import Difficulty, SweepSpec

pytestmark = pytest.mark.slow

TINY_COMPARE = {
    "name": "cmp-tiny",
    "task": {"name": "art", "pairs": 2, "num_keys": 4, "num_values": 4, "train_size": 256, "val_size": 64,
             "test_size": 64, "seed": 0},
    "train": {"epochs": 3, "steps_per_epoch": 4, "batch_size": 32, "eval_batch_size": 64, "num_threads": 1,
              "device": "cpu", "keep_checkpoints": 1},
    "models": ["fw_lstm", "ln_lstm"],
    "space": {"common": {"lr": {"loguniform": [1e-3, 1e-2]}, "hidden_size": 8, "embed_size": 8,
                         "head_size": 8}},
    "searcher": {"name": "optuna", "sampler": "tpe", "seed": 0},
    "scheduler": {"name": "fifo"},
    "budget": {"num_samples": 2, "max_concurrent": 2},
    "resources": {"cpu": 1, "gpu": 0},
    "compare": {"seeds": 2, "thresholds": [0.3, 0.5]},
}


def _url(server) -> str:
    return getattr(server, "url", server)


def test_tiny_comparison_end_to_end(tmp_path, monkeypatch, mlflow_server):
    from mlflow.tracking import MlflowClient

    from sweep.export import load_trials

    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    spec = SweepSpec.model_validate(TINY_COMPARE)
    url = _url(mlflow_server)
    files = run_comparison(spec, tracking_uri=url, log=lambda *_: None)

    # equal budgets: one tuning sweep per model, each with the same number of trials
    for model in spec.models:
        assert len(load_trials(tuning_name(spec, model, Difficulty(task="art", pairs=2)))) == 2

    out = paths.sweep_dir("cmp-tiny") / "report"
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"report.md", "summary.csv", "seed_runs.csv", "reproduce.yaml", "difficulty.png",
            "curves_art-K2.png", "best_configs/fw_lstm.art-K2.yaml",
            "best_configs/ln_lstm.art-K2.yaml"} <= names
    assert all(p.stat().st_size > 0 for p in files)

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("cmp-tiny")
    manifest = Manifest.load("cmp-tiny")
    parent = client.get_run(manifest.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[ROLE_TAG] == "comparison"
    seeds = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'seed'")
    assert len(seeds) == 4 and all(r.info.status == "FINISHED" for r in seeds)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in seeds)
    # the tuning sweeps' parent runs are nested under the comparison run
    tuning = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    art2 = Difficulty(task="art", pairs=2)
    assert {r.data.tags.get("sweep") for r in tuning} >= {tuning_name(spec, m, art2) for m in spec.models}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/summary.csv", "report/difficulty.png"} <= artifacts

    # the summary's mean test error per model is the mean of what MLflow recorded for that model's seeds
    summary = {r["model"]: r for r in csv.DictReader((out / "summary.csv").open())}
    for model in spec.models:
        errors = [100 * (1 - r.data.metrics["test_accuracy"]) for r in seeds if r.data.tags["model"] == model]
        assert len(errors) == 2
        assert float(summary[model]["test_error_pct_mean"]) == pytest.approx(sum(errors) / 2, abs=1e-6)
        assert summary[model]["seeds"] == "2"
    assert sum(r["best"] == "True" for r in summary.values()) == 1
    per_seed = {(r.model, r.seed) for r in load_seed_runs("cmp-tiny")}
    assert per_seed == {(m, s) for m in spec.models for s in (0, 1)}
    prov = yaml.safe_load((out / "reproduce.yaml").read_text())
    assert prov["seeds"] == [0, 1] and prov["tuning_budget"]["trials"] == 2 and prov["versions"]["torch"]
    assert set(prov["best_configs"]) == {"fw_lstm/art-K2", "ln_lstm/art-K2"}

    # a rerun of the same spec has nothing left to do: no new runs, the same numbers
    again = run_comparison(spec, tracking_uri=url, log=lambda *_: None)
    assert {p.name for p in again} == {p.name for p in files}
    assert len(client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'seed'")) == 4
    assert {r["model"]: r["test_error_pct_mean"] for r in csv.DictReader((out / "summary.csv").open())} == \
        {m: r["test_error_pct_mean"] for m, r in summary.items()}

    # `sweep report` rewrites it from disk; an unknown name is a user error (exit 2, no traceback)
    (out / "report.md").unlink()
    env = dict(os.environ, FWSWEEP_HOME=str(tmp_path / "home"))
    cli = [sys.executable, "-c", "from sweep.cli import main; main()"]
    done = subprocess.run([*cli, "report", "cmp-tiny", "--tracking-uri", url], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "report.md").exists() and "fw_lstm" in done.stdout
    bad = subprocess.run([*cli, "report", "no-such"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no-such" in bad.stderr


@pytest.mark.timeout(420)
def test_seed_runs_on_a_local_ray_that_loses_its_raylet_end_with_one_message(tmp_path, monkeypatch,
                                                                             mlflow_server):
    """`ray stop` (here: the raylet's SIGTERM) while the comparison retrains its seed runs: one message
    naming the raylet and what to run again, exit 2, no traceback, no Ray process left (before: Ray
    ended the driver from inside, or `ray.wait` waited for ever on tasks no node could run). Run
    again, the comparison finishes with every seed run."""
    import signal as signals

    from conftest import SweepProcess, kill_processes_of, local_ray_process, wait_until

    home = tmp_path / "home"
    spec = tmp_path / "cmp-lost.yaml"
    data = TINY_COMPARE | {"name": "cmp-lost"}
    data["compare"] = TINY_COMPARE["compare"] | {"retrain_epochs": 40}
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    url = _url(mlflow_server)
    # seed runs of ~10 s whatever the machine (each epoch waits 0.25 s) while the raylet goes; the run
    # again trains at full speed, from the seed runs' checkpoints
    run = SweepProcess(["compare", str(spec), "--tracking-uri", url], home, {"FWSWEEP_FAULT": "slow=0.25"})
    wait_until(lambda: "retraining" in run.output() or run.proc.poll() is not None, 300, "the seed runs")
    time.sleep(3)
    raylet = local_ray_process(run.proc.pid, "raylet")
    assert run.proc.poll() is None and raylet, run.output()[-3000:]
    os.kill(raylet, signals.SIGTERM)
    rc = run.wait(120)
    out = run.output()
    assert rc == 2, f"exit {rc}:\n{out[-3000:]}"
    flat = " ".join(out.split())
    assert f"local Ray: its raylet (pid {raylet}) shut down" in flat and "the same `sweep compare`" in flat, \
        out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    left = kill_processes_of(home)
    assert not left, f"processes {left} of the comparison's Ray were left running:\n{out[-3000:]}"

    again = SweepProcess(["compare", str(spec), "--tracking-uri", url], home)
    assert again.wait(400) == 0, again.output()[-3000:]
    monkeypatch.setenv("FWSWEEP_HOME", str(home))
    runs = load_seed_runs("cmp-lost")
    assert len(runs) == 4 and len({(r.model, r.seed) for r in runs}) == 4, runs

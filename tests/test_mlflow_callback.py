"""MlflowSweepCallback against a real MLflow server and real (tiny) Ray Tune runs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from sweep.config import SweepSpec
from sweep.mlflow_callback import MlflowSweepCallback, mark_orphans_killed
from sweep.testing import tiny_trainable
from sweep.tracking import free_port

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

pytestmark = pytest.mark.timeout(300)

EPOCHS = 3
MODELS = ["lstm", "fw_lstm", "fw_rnn"]  # lstm runs all epochs, fw_lstm is stopped at 2, fw_rnn fails once


class CountingClient(MlflowClient):
    """The real client; counts log_batch calls that carry metrics, per run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metric_batches: Counter[str] = Counter()

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **kwargs: Any):  # noqa: ANN201
        if metrics:
            self.metric_batches[run_id] += 1
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)


class StopAt:
    """Stops a trial at config['stop_at'] epochs: what ASHA does, made deterministic."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result["epoch"] >= result["config"]["stop_at"]


class StopAllAfterFirstReport(tune.Stopper):
    """Ends the whole sweep on the first report, like Ctrl+C: Tune stops trials without completing them."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen = True
        return False

    def stop_all(self) -> bool:
        return self.seen


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


def _spec(name: str) -> dict[str, Any]:
    return SweepSpec.model_validate({
        "name": name, "models": MODELS, "train": {"epochs": EPOCHS},
        "task": {"name": "art", "pairs": 3, "train_size": 100, "val_size": 10, "test_size": 10},
        "space": {"common": {"lr": {"loguniform": [1e-4, 1e-2]}}},
        "searcher": {"name": "optuna", "sampler": "tpe"},
    }).model_dump(mode="json")


def _runs(client: MlflowClient, experiment: str, sweep: str) -> tuple[Any, dict[str, Any]]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{sweep}'")
    parents = [r for r in runs if r.data.tags.get("fwsweep_role") == "sweep"]
    children = {r.data.tags["model"]: r for r in runs if r.data.tags.get("fwsweep_role") == "trial"}
    assert len(parents) == 1, [r.info.run_name for r in parents]
    assert len(children) + 1 == len(runs), "a trial was logged twice"
    return parents[0], children


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


@pytest.fixture(scope="module")
def first_sweep(mlflow_server: str, local_ray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One Tune run: a finished, an early-stopped and a failing trial."""
    tmp = tmp_path_factory.mktemp("cb-sweep")
    name = f"cbtest-{uuid.uuid4().hex[:6]}"
    client = CountingClient(mlflow_server)
    callback = MlflowSweepCallback(mlflow_server, name, name, _spec(name), {"owner": "tests"}, client=client)
    marker = tmp / "failed-once"
    param_space = {
        "model": tune.grid_search(MODELS),
        "lr": 0.003,
        "quality": tune.sample_from(lambda s: {"lstm": 0.9, "fw_lstm": 0.4, "fw_rnn": 0.6}[s.config.model]),
        "stop_at": tune.sample_from(lambda s: 2 if s.config.model == "fw_lstm" else 99),
        "fail_at_epoch": tune.sample_from(lambda s: 3 if s.config.model == "fw_rnn" else None),
        "fail_once_marker": str(marker),
        # fw_rnn's only checkpoint is epoch 1: resumed, it reports epoch 2 a second time
        "checkpoint_epochs": tune.sample_from(lambda s: [1] if s.config.model == "fw_rnn" else None),
    }
    tuner = tune.Tuner(
        tiny_trainable, param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp / "tune"), stop=StopAt(),
                                  callbacks=[callback], verbose=0),
    )
    start = time.monotonic()
    try:
        results = tuner.fit()
    finally:
        callback.close()
    reports = sum(len(r.metrics_dataframe) for r in results if r.metrics_dataframe is not None)
    return {"name": name, "callback": callback, "client": client, "reports": reports, "tmp": tmp,
            "storage": tmp / "tune", "wall_s": time.monotonic() - start}


def test_parent_and_one_child_per_trial(first_sweep: dict[str, Any], mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    parent, children = _runs(client, first_sweep["name"], first_sweep["name"])
    assert sorted(children) == sorted(MODELS)
    assert parent.info.run_name == first_sweep["name"]
    assert first_sweep["callback"].parent_run_id == parent.info.run_id
    assert first_sweep["callback"].parent_run_url.endswith(parent.info.run_id)
    for model, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == f"{model}-{run.data.tags['trial_id']}"
        expected = {"model", "task", "difficulty", "trial_id", "sweep", "searcher", "fwsweep_version",
                    "owner"}
        assert expected <= set(run.data.tags)
        assert run.data.tags["difficulty"] == "art-K3"
        assert run.data.tags["searcher"] == "optuna/tpe"
        assert run.data.params["model.name"] == model
        assert run.data.params["train.lr"] == "0.003"  # the sampled value, applied to the spec's TrialConfig
        assert run.data.params["task.pairs"] == "3"
    assert parent.data.params["train.epochs"] == str(EPOCHS)
    assert "spec.yaml" in _artifacts(client, parent.info.run_id)


def test_metrics_at_every_step_in_one_batch_per_report(first_sweep: dict[str, Any],
                                                       mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    _, children = _runs(client, first_sweep["name"], first_sweep["name"])
    assert _steps(client, children["lstm"].info.run_id, "val_accuracy") == [1, 2, 3]
    assert _steps(client, children["lstm"].info.run_id, "train_loss") == [1, 2, 3]
    assert _steps(client, children["fw_lstm"].info.run_id, "val_accuracy") == [1, 2]
    assert _steps(client, children["fw_rnn"].info.run_id, "val_accuracy") == [1, 2]
    batches = first_sweep["client"].metric_batches
    child_batches = sum(batches[r.info.run_id] for r in children.values())
    assert first_sweep["reports"] == 7
    assert child_batches == first_sweep["reports"]  # one request per report, however many metrics


def test_statuses_and_artifacts(first_sweep: dict[str, Any], mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    parent, children = _runs(client, first_sweep["name"], first_sweep["name"])
    done, stopped, failed = children["lstm"], children["fw_lstm"], children["fw_rnn"]
    assert (done.info.status, done.data.tags["stopped_early"]) == ("FINISHED", "false")
    assert (stopped.info.status, stopped.data.tags["stopped_early"]) == ("FINISHED", "true")
    assert failed.info.status == "FAILED"
    assert "planned failure at epoch 3" in failed.data.tags["error"]
    assert {"config.yaml", "learning_curve.png", "checkpoint"} <= _artifacts(client, done.info.run_id)
    assert "checkpoint/state.json" in _artifacts(client, done.info.run_id, "checkpoint")
    assert "error.txt" in _artifacts(client, failed.info.run_id)
    error_text = Path(client.download_artifacts(failed.info.run_id, "error.txt", str(first_sweep["tmp"])))
    assert "RuntimeError" in error_text.read_text()
    png = Path(client.download_artifacts(done.info.run_id, "learning_curve.png", str(first_sweep["tmp"])))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert parent.info.status == "FINISHED"
    m = parent.data.metrics
    counts = (m["trials_finished"], m["trials_stopped_early"], m["trials_failed"], m["trials_total"])
    assert counts == (1, 1, 1, 3)
    assert m["best_val_accuracy/lstm"] == pytest.approx(0.9 * (1 - 0.5**3))
    assert parent.data.tags["best_trial_id"] == done.data.tags["trial_id"]
    assert {"summary.json", "val_accuracy_curves.png"} <= _artifacts(client, parent.info.run_id)


def test_resume_reuses_runs_and_reopens_the_failed_one(first_sweep: dict[str, Any], mlflow_server: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    name, client = first_sweep["name"], MlflowClient(mlflow_server)
    parent_before, children_before = _runs(client, name, name)
    params_before = dict(children_before["fw_rnn"].data.params)
    callback = MlflowSweepCallback(mlflow_server, name, name, _spec(name), {"owner": "tests"})
    tuner = tune.Tuner.restore(str(first_sweep["storage"] / name), trainable=tiny_trainable,
                               resume_errored=True)
    tuner._local_tuner.get_run_config().callbacks = [callback]
    try:
        tuner.fit()
    finally:
        callback.close()
    parent, children = _runs(client, name, name)  # asserts: still one parent, one run per trial
    assert parent.info.run_id == parent_before.info.run_id == callback.parent_run_id
    assert {m: r.info.run_id for m, r in children.items()} == {
        m: r.info.run_id for m, r in children_before.items()}
    rerun = children["fw_rnn"]
    assert rerun.info.status == "FINISHED"
    assert "error" not in rerun.data.tags and "planned failure" in rerun.data.tags["previous_error"]
    # on from its epoch-1 checkpoint: epoch 2 is reported again but logged once
    assert _steps(client, rerun.info.run_id, "val_accuracy") == [1, 2, 3]
    assert rerun.data.params == params_before
    assert children["lstm"].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    m = parent.data.metrics  # the summary covers the trials ended in the first session too
    counts = (m["trials_finished"], m["trials_stopped_early"], m["trials_failed"], m["trials_total"])
    assert counts == (2, 1, 0, 3)
    assert "rejected" not in caplog.text and "Changing param values" not in caplog.text


def test_interrupted_sweep_leaves_no_run_running(mlflow_server: str, local_ray, tmp_path: Path) -> None:
    name = f"cbstop-{uuid.uuid4().hex[:6]}"
    callback = MlflowSweepCallback(mlflow_server, name, name, _spec(name))
    tuner = tune.Tuner(
        tiny_trainable, param_space={"model": "lstm", "epochs": 50, "sleep_s": 0.2},
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), stop=StopAllAfterFirstReport(),
                                  callbacks=[callback], verbose=0),
    )
    try:
        tuner.fit()
    finally:
        callback.close()
    client = MlflowClient(mlflow_server)
    parent, children = _runs(client, name, name)
    assert children["lstm"].info.status == "KILLED"
    assert "stopped before" in children["lstm"].data.tags["end_reason"]
    assert parent.info.status == "KILLED"
    assert parent.data.metrics["trials_killed"] == 1


def test_orphaned_running_runs_are_marked_killed(mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    exp_name, sweep = f"orphans-{uuid.uuid4().hex[:6]}", "orphan-sweep"
    exp_id = client.create_experiment(exp_name)
    mine = client.create_run(exp_id, tags={"sweep": sweep}).info.run_id
    done = client.create_run(exp_id, tags={"sweep": sweep}).info.run_id
    client.set_terminated(done, "FINISHED")
    other = client.create_run(exp_id, tags={"sweep": "another"}).info.run_id
    assert mark_orphans_killed(client, exp_name, sweep) == [mine]
    assert client.get_run(mine).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"
    assert client.get_run(other).info.status == "RUNNING"
    assert mark_orphans_killed(client, exp_id, sweep) == []  # by id too; nothing left to mark


class Forwarder:
    """A TCP port that starts closed (the server looks down) and, once opened, forwards to the real one."""

    def __init__(self, target_url: str) -> None:
        host, port = target_url.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.listener: socket.socket | None = None

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def test_server_outage_is_survived_and_caught_up(mlflow_server: str) -> None:
    """The server is unreachable while a trial reports: hooks return at once, nothing raises, and
    everything queued reaches MLflow once it answers again."""
    from ray.tune.experiment import Trial

    proxy = Forwarder(mlflow_server)
    name = f"outage-{uuid.uuid4().hex[:6]}"
    callback = MlflowSweepCallback(proxy.url, name, name, _spec(name), retry_after_s=0.2,
                                   max_retry_after_s=0.5, close_timeout_s=20)
    trial = Trial("tiny", config={"model": "lstm", "lr": 0.001}, trial_id="out_00000", stub=True)
    start = time.monotonic()
    callback.setup()
    callback.on_step_begin(0, [trial])
    callback.on_trial_start(0, [trial], trial)
    for epoch in (1, 2):
        callback.on_trial_result(0, [trial], trial, {"epoch": epoch, "val_accuracy": epoch / 10})
    assert time.monotonic() - start < 5, "a down server stalled the driver"
    assert callback.parent_run_id is None
    proxy.open()
    try:
        time.sleep(0.6)  # past the back-off: the next report sends everything queued
        callback.on_trial_result(0, [trial], trial, {"epoch": 3, "val_accuracy": 0.3})
        assert callback.parent_run_id is not None
        callback.on_trial_complete(0, [trial], trial)
        callback.on_experiment_end([trial])
        assert callback.close()
    finally:
        proxy.close()
    client = MlflowClient(mlflow_server)
    _, children = _runs(client, name, name)
    assert _steps(client, children["lstm"].info.run_id, "val_accuracy") == [1, 2, 3]
    assert children["lstm"].info.status == "FINISHED"


def test_a_server_that_never_comes_back_costs_bounded_time() -> None:
    from ray.tune.experiment import Trial

    url = f"http://127.0.0.1:{free_port()}"
    callback = MlflowSweepCallback(url, "gone", "gone", _spec("gone"), close_timeout_s=1.0)
    trial = Trial("tiny", config={"model": "lstm"}, trial_id="gone_00000", stub=True)
    start = time.monotonic()
    callback.setup()
    callback.on_trial_start(0, [trial], trial)
    for epoch in range(1, 51):
        callback.on_trial_result(0, [trial], trial, {"epoch": epoch, "val_accuracy": 0.5})
    callback.on_trial_complete(0, [trial], trial)
    callback.on_experiment_end([trial])
    assert callback.close() is False  # reported, not raised
    assert time.monotonic() - start < 10


def test_a_driver_that_exits_without_closing_ends_its_runs(mlflow_server: str) -> None:
    """A driver leaving abruptly (e.g. a second Ctrl+C out of fit) ends its open runs on exit."""
    name = f"exit-{uuid.uuid4().hex[:6]}"
    script = f"""
from ray.tune.experiment import Trial
from sweep.mlflow_callback import MlflowSweepCallback
cb = MlflowSweepCallback({mlflow_server!r}, {name!r}, {name!r}, {{"name": {name!r}}})
trial = Trial("tiny", config={{"model": "lstm"}}, trial_id="exit_00000", stub=True)
cb.setup()
cb.on_trial_start(0, [trial], trial)
cb.on_trial_result(0, [trial], trial, {{"epoch": 1, "val_accuracy": 0.5}})
raise SystemExit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    parent, children = _runs(MlflowClient(mlflow_server), name, name)
    assert children["lstm"].info.status == "KILLED"
    assert parent.info.status == "KILLED"

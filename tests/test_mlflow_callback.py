"""Live MLflow logging (the Tune callback + run writer) and the reconcile (`sweep sync`), against a real
MLflow server, real Ray Tune runs and real sweeps on disk."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweep.config import SweepSpec
from sweep.mlflow_runs import content, identity
from sweep.mlflow_runs.callback import MlflowSweepCallback
from sweep.mlflow_runs.reconcile import sync_sweep
from sweep.mlflow_runs.writer import RunWriter, sha
from sweep.store import open_sweep
from sweep.testing import tiny_trainable
from sweep.tracking import free_port

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
MODELS = ["lstm", "fw_lstm", "fw_rnn"]  # lstm runs all epochs, fw_lstm is stopped at 2, fw_rnn fails at 3


class CountingClient(MlflowClient):
    """The real client; counts log_batch calls per run, and those that carry metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metric_batches: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **kwargs: Any):  # noqa: ANN201
        self.batches[run_id] += 1
        if metrics:
            self.metric_batches[run_id] += 1
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)


class StopAt:
    """Stops a trial at config['stop_at'] epochs: what ASHA does, made deterministic."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result["epoch"] >= result["config"]["stop_at"]


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


def _spec(name: str) -> SweepSpec:
    return SweepSpec.model_validate({
        "name": name, "models": MODELS, "train": {"epochs": EPOCHS},
        "task": {"name": "art", "pairs": 3, "train_size": 100, "val_size": 10, "test_size": 10},
        "space": {"common": {"lr": {"loguniform": [1e-4, 1e-2]}}},
        "searcher": {"name": "optuna", "sampler": "tpe"},
    })


def _runs(client: MlflowClient, experiment: str, sweep: str) -> tuple[Any, dict[str, Any]]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{sweep}'")
    parents = [r for r in runs if r.data.tags.get(identity.ROLE_TAG) == "sweep"]
    children = {r.data.tags["model"]: r for r in runs if r.data.tags.get(identity.ROLE_TAG) == "trial"}
    assert len(parents) == 1, [r.info.run_name for r in parents]
    assert len(children) + 1 == len(runs), "a trial was logged twice"
    return parents[0], children


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def live_sweep(mlflow_server: str, local_ray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One Tune run with the live callback only: a finished, an early-stopped and a failing trial."""
    tmp = tmp_path_factory.mktemp("cb-sweep")
    name = f"cbtest-{uuid.uuid4().hex[:6]}"
    client = CountingClient(mlflow_server)
    callback = MlflowSweepCallback(mlflow_server, _spec(name), tags={"owner": "tests"}, client=client)
    param_space = {
        "model": tune.grid_search(MODELS),
        "lr": 0.003,
        "quality": tune.sample_from(lambda s: {"lstm": 0.9, "fw_lstm": 0.4, "fw_rnn": 0.6}[s.config.model]),
        "stop_at": tune.sample_from(lambda s: 2 if s.config.model == "fw_lstm" else 99),
        "fail_at_epoch": tune.sample_from(lambda s: 3 if s.config.model == "fw_rnn" else None),
    }
    tuner = tune.Tuner(
        tiny_trainable, param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp / "tune"), stop=StopAt(),
                                  callbacks=[callback], verbose=0),
    )
    with counted_http(mlflow_server) as http:
        results = tuner.fit()
        unsent = callback.close()
    reports = sum(len(r.metrics_dataframe) for r in results if r.metrics_dataframe is not None)
    return {"name": name, "callback": callback, "client": client, "reports": reports, "unsent": unsent,
            "http": http}


@contextlib.contextmanager
def counted_http(server: str) -> Iterator[Counter[str]]:
    """Every HTTP request this process sends to `server` (MLflow's client and its artifact uploads use
    `requests`), by method and path: including what MLflow's client asks on its own."""
    import requests

    sent: Counter[str] = Counter()
    original = requests.Session.request

    def request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if url.startswith(server):
            sent[f"{method} {url.removeprefix(server).split('/artifacts/', 1)[0]}"] += 1
        return original(self, method, url, *args, **kwargs)

    requests.Session.request = request
    try:
        yield sent
    finally:
        requests.Session.request = original


def test_live_runs_parent_and_one_child_per_trial(live_sweep: dict[str, Any], mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    parent, children = _runs(client, live_sweep["name"], live_sweep["name"])
    assert live_sweep["unsent"] == 0
    assert sorted(children) == sorted(MODELS)
    assert parent.info.run_name == live_sweep["name"]
    url = live_sweep["callback"].parent_run_url
    assert url.endswith(f"/runs/{parent.info.run_id}?workflowType=machine_learning")
    assert parent.data.params["space.lr"] == "loguniform(0.0001, 0.01)"
    assert parent.data.params["models"] == "lstm, fw_lstm, fw_rnn"
    assert "train.lr" not in parent.data.params  # searched: in space.lr
    assert "train.epochs" not in parent.data.params  # not what trials ran: budget.max_epochs is
    assert parent.data.params["budget.max_epochs"] == str(EPOCHS)
    for model, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == f"{model}-{run.data.tags['trial_id']}"
        assert {"model", "task", "difficulty", "trial_id", "sweep", "searcher", "owner"} <= set(run.data.tags)
        assert run.data.tags["difficulty"] == "art-K3"
        assert run.data.params["model.name"] == model
        assert run.data.params["train.lr"] == "0.003"  # the sampled value, applied to the spec's TrialConfig
        assert run.data.params["num_params"] == "1234"  # a constant: a param, not a chart


def test_live_metrics_at_optimizer_steps_one_batch_per_report(live_sweep: dict[str, Any],
                                                              mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    _, children = _runs(client, live_sweep["name"], live_sweep["name"])
    lstm = children["lstm"]
    assert _steps(client, lstm.info.run_id, "val_accuracy") == [10, 20, 30]  # tiny_trainable: 10 per epoch
    assert _steps(client, children["fw_lstm"].info.run_id, "val_accuracy") == [10, 20]
    assert _steps(client, children["fw_rnn"].info.run_id, "val_accuracy") == [10, 20]
    assert not {"step", "epoch", "num_params", "diverged", "time_total_s"} & set(lstm.data.metrics)
    assert {"val_accuracy", "val_loss", "train_loss"} <= set(lstm.data.metrics)
    batches = live_sweep["client"].metric_batches
    assert live_sweep["reports"] == 7
    # at most one request per report: reports still waiting when their trial ends go with its end tags
    assert all(1 <= batches[r.info.run_id] <= 3 for r in children.values())
    assert sum(batches[r.info.run_id] for r in children.values()) <= 7


def test_live_statuses_and_descriptions(live_sweep: dict[str, Any], mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    _, children = _runs(client, live_sweep["name"], live_sweep["name"])
    done, stopped, failed = children["lstm"], children["fw_lstm"], children["fw_rnn"]
    assert (done.info.status, done.data.tags["stopped_early"]) == ("FINISHED", "false")
    assert (stopped.info.status, stopped.data.tags["stopped_early"]) == ("FINISHED", "true")
    assert stopped.data.tags[identity.NOTE_TAG] == "fw_lstm · lr 0.003 · stopped by ASHA after epoch 2"
    assert failed.info.status == "FAILED"


def test_live_logging_leaves_the_reconcile_no_per_trial_work(live_sweep: dict[str, Any], mlflow_server: str,
                                                             tmp_path: Path) -> None:
    """Each trial's run gets its config.yaml (and the digest the reconcile compares) when it ends, and the
    run's requests are few: created with its tags, params once, one batch per report, one to end it."""
    client = MlflowClient(mlflow_server)
    _, children = _runs(client, live_sweep["name"], live_sweep["name"])
    for run in children.values():
        text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
        assert text.startswith("# fwsweep export: trial ") and "re-run: sweep train --config" in text
        assert run.data.tags[content.CONFIG_SHA_TAG] == sha(text)
        assert run.data.tags["end_reason"] != "running"
    writer = live_sweep["callback"].settled_writer()
    assert writer is not None, "the live writer is idle after close()"
    # the parent: create, params; per trial: create (running, with its tags), config.yaml (one upload: the
    # run's artifact URI came with its creation), the end status, and batches: one per report sent on its
    # own (the first also carries the trial's params and num_params, a constant of it) and one at the end
    # (its tags, with the reports still waiting then)
    batches = sum(live_sweep["client"].batches[r.info.run_id] for r in children.values())
    assert batches <= live_sweep["reports"] + len(children)
    expected = 2 + 3 * len(children) + batches
    assert writer.requests == expected, (writer.requests, expected)
    http = live_sweep["http"]
    assert not any("runs/get" in what for what in http), http  # no lookup of a run before an upload
    assert sum(n for what, n in http.items() if what.endswith("runs/create")) == len(children) + 1
    sent = sum(n for what, n in http.items() if "/runs/" in what or "artifacts" in what)
    assert sent == expected + 1, http  # and the one search for the sweep's runs of earlier sessions


def _stub_trial(tid: str) -> Any:
    from ray.tune.experiment import Trial

    return Trial("tiny", config={"model": "lstm", "lr": 0.001}, trial_id=tid, stub=True)


def test_reports_waiting_at_a_trials_end_go_with_it(mlflow_server: str) -> None:
    """MLflow behind (the writer busy): a trial's waiting reports ride in its end's request, all of them
    land, and the run ends with its params and tags; a trial that never reported gets its params with
    its end tags. Per trial: create, config.yaml, one batch, the end status."""
    import threading

    name = f"behind-{uuid.uuid4().hex[:6]}"
    client = CountingClient(mlflow_server)
    callback = MlflowSweepCallback(mlflow_server, _spec(name), client=client)
    busy = threading.Event()
    callback.setup()
    callback.live.submit(lambda w: busy.wait(30), "the writer held")
    reported, silent = _stub_trial(f"{name}_00000"), _stub_trial(f"{name}_00001")
    for trial in (reported, silent):
        callback.on_trial_start(0, [reported, silent], trial)
    for epoch in (1, 2, 3):
        trial_result = {"epoch": epoch, "training_iteration": epoch, "step": 10 * epoch,
                        "val_accuracy": 0.1 * epoch, "num_params": 1234}
        reported.update_last_result(trial_result)
        callback.on_trial_result(0, [reported], reported, trial_result)
    callback.on_trial_complete(0, [reported], reported)
    silent.update_last_result({"epoch": 0})
    callback.on_trial_error(0, [silent], silent)
    time.sleep(1.0)
    released = content.now_ms()  # the runs are made from here on; they must carry the trials' own times
    busy.set()
    assert callback.close(timeout_s=60) == 0
    exp = client.get_experiment_by_name(name)
    children = {r.data.tags["trial_id"]: r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get(identity.ROLE_TAG) == "trial"}
    assert len(children) == 2
    run = children[reported.trial_id]
    assert _steps(client, run.info.run_id, "val_accuracy") == [10, 20, 30]
    assert client.batches[run.info.run_id] == 1  # three reports, params and end tags: one request
    assert (run.info.status, run.data.params["train.lr"], run.data.params["num_params"]) == \
        ("FINISHED", "0.001", "1234")
    assert run.data.tags["end_reason"] != "running" and content.CONFIG_SHA_TAG in run.data.tags
    for made_late in children.values():
        assert made_late.info.start_time <= made_late.info.end_time < released - 500, made_late.info
    quiet = children[silent.trial_id]
    assert client.batches[quiet.info.run_id] == 1 and quiet.data.params["train.lr"] == "0.001"
    assert quiet.info.status == "FAILED"
    assert callback.settled_writer().requests == 2 + 4 * 2  # the parent's create and params; 4 per trial


def test_hooks_never_wait_for_a_dead_server() -> None:
    """Tune's event loop only enqueues: 200 reports to a port where nothing listens take milliseconds,
    and close() says how many reports MLflow did not get, after a bounded wait."""
    spec = _spec("gone")
    callback = MlflowSweepCallback(f"http://127.0.0.1:{free_port()}", spec)
    trial = _stub_trial("gone_00000")
    start = time.monotonic()
    callback.setup()
    callback.on_trial_start(0, [trial], trial)
    for epoch in range(1, 201):
        callback.on_trial_result(0, [trial], trial, {"epoch": epoch, "val_accuracy": 0.5})
    callback.on_trial_complete(0, [trial], trial)
    assert time.monotonic() - start < 1.0, "a hook waited for MLflow"
    assert callback.close(timeout_s=5) == 200
    assert time.monotonic() - start < 30


def test_callback_pickles_as_the_registered_one(mlflow_server: str) -> None:
    """Tune pickles the RunConfig with the experiment; `Tuner.restore` hands back the callback this
    session registered for the sweep (no private Tune API), or a no-op one when none is."""
    import pickle

    from sweep import live_callbacks

    spec = _spec(f"reg-{uuid.uuid4().hex[:6]}")
    callback = MlflowSweepCallback(mlflow_server, spec)
    assert pickle.loads(pickle.dumps(callback)) is callback
    callback.close()
    live_callbacks.unregister([callback])
    restored = pickle.loads(pickle.dumps(callback))
    assert type(restored) is tune.Callback  # the live one is gone: a callback that does nothing


# ---------------------------------------------------------------------------------------------- reconcile


@pytest.fixture(scope="module")
def synced_sweep(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real two-trial sweep through the runner (it reconciles at its end)."""
    from sweep.runner import run_sweep

    home = tmp_path_factory.mktemp("sync") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FWSWEEP_HOME", str(home))
        mp.delenv("RAY_ADDRESS", raising=False)
        data = yaml.safe_load((ROOT / "search_spaces/tests/faults_tiny.yaml").read_text())
        data |= {"name": f"sync-{uuid.uuid4().hex[:6]}", "budget": {"num_samples": 2, "max_concurrent": 2}}
        spec = SweepSpec.model_validate(data)
        result = run_sweep(spec, tracking_uri=mlflow_server)
        yield {"spec": spec, "result": result, "home": home, "mp": mp}


def _state(url: str, spec: SweepSpec) -> dict[str, Any]:
    client = MlflowClient(url)
    exp_id = client.get_experiment_by_name(spec.experiment).experiment_id
    found = identity.sweep_runs(client, exp_id, spec.name)
    steps = {tid: _steps(client, runs[0].info.run_id, "val_accuracy") for tid, runs in found.trials.items()}
    return {"parents": found.parents, "trials": found.trials, "steps": steps}


def test_reconcile_repairs_what_live_logging_lost(synced_sweep: dict[str, Any], mlflow_server: str) -> None:
    """Break MLflow every way a fault can (a run lost, steps lost, a stray run, a duplicate run, a second
    parent, a stale RUNNING run); one sync makes it match the records; a second changes nothing."""
    from sweep.export import load_trials

    spec, result = synced_sweep["spec"], synced_sweep["result"]
    assert result.tracking_behind is None
    records = load_trials(spec.name)
    expected = {r.trial_id: sorted({content.metric_step(row) for row in r.history}) for r in records}
    before = _state(mlflow_server, spec)
    assert len(before["parents"]) == 1 and before["steps"] == expected
    parent = before["parents"][0]
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial_id"] == result.best.trial_id

    client = MlflowClient(mlflow_server)
    exp_id = parent.info.experiment_id
    lost, kept = sorted(expected)
    client.delete_run(before["trials"][lost][0].info.run_id)  # a trial with no run at all
    w = RunWriter(mlflow_server)
    tags = content.trial_tags(spec, kept, "lstm")
    dup = w.create_run(exp_id, "dup", tags, parent_id=parent.info.run_id)  # a duplicate, RUNNING, no metrics
    stray = w.create_run(exp_id, "stray", content.trial_tags(spec, "0000dead", "lstm"))
    second = w.create_run(exp_id, spec.name, content.parent_tags(spec))  # a second parent
    client.update_run(before["trials"][kept][0].info.run_id, status="RUNNING")

    synced_at = content.now_ms()
    report = sync_sweep(open_sweep(spec.name), mlflow_server)
    assert (report.runs_created, report.runs_trashed) == (1, 3)
    assert report.url.endswith(f"/runs/{parent.info.run_id}?workflowType=machine_learning")  # not "GenAI"
    made, closed = (client.get_run(after_run) for after_run in (
        identity.sweep_runs(client, exp_id, spec.name).trials[lost][0].info.run_id,
        before["trials"][kept][0].info.run_id))
    times = {r.trial_id: content.trial_times(r.history) for r in records}
    # the run made from the records spans the trial's training, not the moment of the sync
    assert (made.info.start_time, made.info.end_time) == times[lost] and times[lost][1] < synced_at
    assert closed.info.end_time == times[kept][1]  # closed by the sync: when the trial ended
    assert report.rows_backfilled == len(expected[lost])
    after = _state(mlflow_server, spec)
    assert [p.info.run_id for p in after["parents"]] == [parent.info.run_id]
    assert after["steps"] == expected, "steps missing or duplicated"
    assert {tid: len(runs) for tid, runs in after["trials"].items()} == {tid: 1 for tid in expected}
    assert all(runs[0].info.status == "FINISHED" for runs in after["trials"].values())
    assert {dup, stray, second}.isdisjoint(r.info.run_id for runs in after["trials"].values() for r in runs)
    again = sync_sweep(open_sweep(spec.name), mlflow_server)
    assert again.changed == 0, again


def test_config_artifact_is_the_export_byte_for_byte(synced_sweep: dict[str, Any], mlflow_server: str,
                                                     tmp_path: Path) -> None:
    spec, result = synced_sweep["spec"], synced_sweep["result"]
    runs = _state(mlflow_server, spec)["trials"]
    best_run = runs[result.best.trial_id][0]
    client = MlflowClient(mlflow_server)
    artifact = client.download_artifacts(best_run.info.run_id, "config.yaml", str(tmp_path))
    exported = synced_sweep["home"] / "sweeps" / spec.name / "exports" / "best.yaml"
    assert Path(artifact).read_bytes() == exported.read_bytes()


def test_a_row_with_metrics_of_its_own_does_not_hide_earlier_steps(mlflow_server: str) -> None:
    """A resumed trial's first row can be its last (with test metrics no earlier row has). Learning the
    run's steps from that row's rarest metric must not make a later write of the whole history re-log the
    earlier rows: every step stays in MLflow once."""
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment(f"rows-{uuid.uuid4().hex[:6]}")
    earlier = RunWriter(mlflow_server)  # the session that was killed
    run_id = earlier.create_run(exp, "trial", {})
    epoch = [(1, {"val_accuracy": 0.5, "train_loss": 1.0}, None),
             (2, {"val_accuracy": 0.6, "train_loss": 0.8}, None)]
    assert earlier.log_rows(run_id, epoch) == 2
    last = (3, {"val_accuracy": 0.7, "train_loss": 0.6, "test_loss": 0.9, "test_accuracy": 0.7}, None)
    resumed = RunWriter(mlflow_server)  # adopts the run
    assert resumed.log_rows(run_id, [last]) == 1
    assert resumed.log_rows(run_id, [last]) == 0  # the same report again: once
    assert resumed.log_rows(run_id, [*epoch, last]) == 0  # the reconcile's full history: nothing new
    for key, steps in (("val_accuracy", [1, 2, 3]), ("train_loss", [1, 2, 3]), ("test_loss", [3])):
        assert _steps(client, run_id, key) == steps, key


def test_a_batch_cut_off_after_it_landed_is_not_logged_twice(mlflow_server: str) -> None:
    """At-least-once delivery made idempotent: a log_batch that reached the server but whose answer was
    lost (the server died mid-request) is retried; the retry asks the server what it holds first."""
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment(f"cut-{uuid.uuid4().hex[:6]}")

    class AnswerLost(MlflowClient):
        lose = True

        def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **kwargs: Any):  # noqa: ANN201
            out = super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)
            if metrics and self.lose:
                self.lose = False
                raise ConnectionError("connection reset by peer")  # after the server stored it
            return out

    w = RunWriter(mlflow_server, AnswerLost(mlflow_server))
    run_id = w.create_run(exp, "trial", {})
    row = (1, {"val_accuracy": 0.5}, None)
    with pytest.raises(ConnectionError):
        w.log_rows(run_id, [row])
    assert w.log_rows(run_id, [row]) == 0  # the retry finds it there
    assert _steps(client, run_id, "val_accuracy") == [1]


def test_modules_marked_absent_fail_to_import_at_once_and_stay_out_of_sys_modules() -> None:
    """MLflow's per-request Databricks probes fail at once (mark_absent), while `"IPython" in sys.modules`
    stays False: Ray's notebook check reads it and imports IPython when it is there (with None there,
    that raised in Ray's error-printing thread when a node died). In a fresh interpreter: the finder is
    process-wide."""
    import subprocess
    import sys

    code = """
import sys, timeit, importlib.util
from sweep.mlflow_runs.writer import configure_http
from ray.widgets.util import in_notebook
configure_http(); configure_http()
probes = ("dbruntime", "IPython", "pyspark")
assert importlib.util.find_spec("json") is not None and "IPython" not in sys.modules
assert sum(type(f).__name__ == "_NotInstalled" for f in sys.meta_path) == 1
for name in probes:
    try:
        __import__(name)
    except ModuleNotFoundError as err:
        assert err.name == name and name not in sys.modules, err
    else:
        raise AssertionError(name + " imported")
assert in_notebook() is False
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]

"""Ray Tune -> MLflow, live: a parent run per sweep, a child run per trial, metrics as trials report.

Only maps Tune's hooks to run-writer operations; they run on a background thread (`LiveWriter`), so
Tune's event loop never waits for MLflow, a plot or an upload. It reads only the public parts of a trial
(`trial_id`, `config`, `last_result`). What it cannot send (server down, driver killed) is not lost:
`sweep.mlflow_runs.reconcile` (run at the end of every run/resume/compare, and by `sweep sync`) brings
MLflow level with the sweep's records, and also writes what comes from them alone: the summary, error
texts, config artifacts and the final statuses.

Tune pickles its RunConfig with the experiment; this callback pickles as a reference to the one this
session created for the sweep (`sweep.live_callbacks`), so `Tuner.restore` hands Tune the runner's own
object (no private Tune API to swap callbacks), and an unregistered restore gets a no-op callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mlflow.tracking import MlflowClient

from sweep import events, export
from sweep.config import SweepSpec
from sweep.live_callbacks import LiveCallback
from sweep.mlflow_runs import content, identity
from sweep.mlflow_runs.writer import LiveWriter, Row, RunWriter, sha
from sweep.space import MODEL_KEY, trial_config
from sweep.store import TrialRecord
from sweep.tracking_probe import TrackingRefused

log = logging.getLogger(__name__)

RUNNING_TAGS = {"end_reason": "running"}
ROWS = "rows"  # LiveWriter key of a trial's metric-row ops: (ROWS, trial_id)

class MlflowSweepCallback(LiveCallback):
    """Live MLflow logging of one sweep. Pass it in `tune.RunConfig(callbacks=[...])`, keep the handle,
    and call `close()` after `Tuner.fit()`; then run the reconcile.

    spec: the sweep's SweepSpec; tags: extra tags on every run; git: (commit, dirty) of the launch folder;
    error_text: trial_id -> the text of its latest failure (from the sweep's storage), for retry tags.
    """

    def __init__(self, tracking_uri: str, spec: SweepSpec, *, tags: dict[str, str] | None = None,
                 git: tuple[str | None, bool] = (None, False), client: MlflowClient | None = None,
                 error_text: Callable[[str], str | None] | None = None, **live: Any) -> None:
        self.tracking_uri = tracking_uri
        self.spec = spec
        self.extra_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.git = git
        self.error_text = error_text
        self.live = LiveWriter(RunWriter(tracking_uri, client), **live)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._runs: dict[str, str] = {}  # trial_id -> run id (writer thread only)
        self._open: set[str] = set()  # trials whose run is RUNNING (writer thread only)
        self._earlier: dict[str, Any] = {}  # trial_id -> its run from an earlier session, not yet adopted
        self._trials: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {}  # id -> name, tags, params
        self._retries: dict[str, int] = {}
        self._errors: dict[str, str] = {}  # trial_id -> the failure text already noted (writer thread)
        self._unsent_params: dict[str, dict[str, str]] = {}  # trial_id -> params its new run lacks (writer)
        self._started: dict[str, int] = {}  # trial_id -> when Tune first started it (ms): its run's start
        self._setup_ms: int | None = None  # when the sweep started: its parent run's start
        super().__init__(spec.name)

    @property
    def parent_run_url(self) -> str | None:
        return identity.run_url(self.tracking_uri, self.experiment_id, self.parent_run_id)

    def close(self, timeout_s: float = 30.0) -> int:
        """Send what is pending (up to `timeout_s`); returns the reports MLflow did not get."""
        return self.live.close(timeout_s)

    def settled_writer(self) -> RunWriter | None:
        """After `close`: the writer, for the reconcile (it knows which steps each run holds: no request to
        learn them), unless an op of it still runs."""
        return self.live.settled()

    # ------------------------------------------------------------------------------ in the writer thread

    def _parent(self, w: RunWriter) -> str:
        if self.parent_run_id is None:
            self.experiment_id = identity.experiment_id(w.client, self.spec.experiment,
                                                        content.sweep_description(self.spec))
            found = identity.sweep_runs(w.client, self.experiment_id, self.spec.name)  # one search for all
            self._earlier = {tid: runs[0] for tid, runs in found.trials.items()}
            run = found.parent
            if run is None:
                run_id = w.create_run(self.experiment_id, self.spec.name, self._tags(
                    content.parent_tags(self.spec, self.git)), start_time=self._setup_ms)
                w.log_params(run_id, content.parent_params(self.spec))
            else:
                run_id = run.info.run_id
                w.set_status(run, "RUNNING")
            self.parent_run_id = run_id
        return self.parent_run_id

    def _run(self, w: RunWriter, trial_id: str) -> str:
        if trial_id not in self._runs:
            parent = self._parent(w)
            name, tags, params = self._trials[trial_id]
            run = self._earlier.pop(trial_id, None)
            if run is None:  # created running; its params ride with its first metrics (or its end tags)
                run_id = w.create_run(self.experiment_id, name, tags | RUNNING_TAGS, parent_id=parent,
                                      start_time=self._started.get(trial_id))
                self._unsent_params[trial_id] = dict(params)
            else:  # an earlier session's (resumed): adopt it, reopen it, add only the params it lacks
                run_id = run.info.run_id
                w.know(run)
                w.set_tags(run_id, RUNNING_TAGS, run.data.tags)
                w.set_status(run, "RUNNING")
                w.log_params(run_id, params, run.data.params)
            self._runs[trial_id] = run_id
            self._open.add(trial_id)
        return self._runs[trial_id]

    def _tags(self, tags: dict[str, str]) -> dict[str, str]:
        return tags | self.extra_tags

    # ------------------------------------------------------------------------------ Tune hooks

    def setup(self, **info: Any) -> None:
        self._setup_ms = content.now_ms()  # the run may be made later: MLflow still booting
        self.live.submit(self._parent, "the sweep's parent run")

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.live.refused is not None:  # out of Tune's loop: the sweep stops, Tune's state is kept
            raise TrackingRefused(self.tracking_uri, self.spec, self.live.refused)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial.trial_id
        self._started.setdefault(tid, content.now_ms())
        if tid not in self._trials:
            try:
                config = trial_config(self.spec, dict(trial.config)).to_dict()
            except Exception:  # noqa: BLE001 - a config the spec cannot read: log what Tune gave
                config = dict(trial.config)
            model = str(trial.config.get(MODEL_KEY) or self.spec.models[0])
            self._trials[tid] = (content.trial_run_name(model, tid),
                                 self._tags(content.trial_tags(self.spec, tid, model, self.git)),
                                 content.trial_params(config))
        self.live.submit(lambda w: self._reopen(w, tid), f"run of trial {tid}")

    def _reopen(self, w: RunWriter, trial_id: str) -> None:
        """The trial's run, running: made or adopted now, or reopened (a trial Tune restarts or resumes)."""
        run_id = self._run(w, trial_id)
        if trial_id not in self._open:
            w.set_tags(run_id, RUNNING_TAGS)
            w.reopen(run_id)
            self._open.add(trial_id)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.on_trial_start(iteration, trials, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        tid = trial.trial_id
        if tid not in self._trials:
            self.on_trial_start(iteration, trials, trial)
        report = ((content.metric_step(result), content.metric_values(result), None),
                  content.constant_params(result))
        self.live.submit(lambda w: self._send(w, tid, [report]), f"metrics of trial {tid}", reports=1,
                         key=(ROWS, tid), data=report)

    def _send(self, w: RunWriter, tid: str, reports: list[tuple[Row, dict[str, str]]],
              tags: dict[str, str] | None = None) -> None:
        """Metric rows of a trial in one request, with the params its run lacks (its sampled config, sent
        with its first report; constants such as num_params) and `tags` (its end)."""
        run_id = self._run(w, tid)
        new: dict[str, str] = {}
        for _, constants in reports:
            if constants and self._trials[tid][2].keys().isdisjoint(constants):
                new |= constants
        params = self._unsent_params.get(tid, {}) | new
        w.log_rows(run_id, [row for row, _ in reports], params=params, tags=tags)
        self._unsent_params.pop(tid, None)  # only once sent: a retried op sends them again
        self._trials[tid][2].update(new)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = dict(trial.last_result or {})
        self._end(trial, events.trial_state("TERMINATED", last, self.spec.max_epochs), last)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, events.FAILED, dict(trial.last_result or {}))

    def _end(self, trial: Any, how: str, last: dict[str, Any]) -> None:
        tid = trial.trial_id
        if tid not in self._trials:
            if not last:
                return  # removed before it ever started: the reconcile records it
            self.on_trial_start(0, [], trial)
        sampled = {k: v for k, v in dict(trial.config).items() if k != MODEL_KEY}
        model = str(trial.config.get(MODEL_KEY) or self.spec.models[0])
        epochs = int(last.get("epoch", last.get("training_iteration", 0)) or 0)
        tags = {"state": how, "end_reason": content.end_reason(how),
                "stopped_early": str(how == events.STOPPED_EARLY).lower(),
                identity.NOTE_TAG: content.trial_description(self.spec, model, sampled, how, epochs)}

        params = dict(trial.config)
        reports = self.live.take((ROWS, tid))  # its reports still waiting (MLflow behind): sent with the end
        ended = content.now_ms()  # sent perhaps much later (MLflow behind): the run ends when the trial did

        def end(w: RunWriter) -> None:
            run_id = self._run(w, tid)
            config = self._config_text(tid, params, last)
            if config is not None:  # as the reconcile would upload it: then it has nothing left to do
                w.upload_text(run_id, config, "config.yaml")
                tags[content.CONFIG_SHA_TAG] = sha(config)
            self._send(w, tid, reports, tags)  # with the params of a run that never reported
            w.end(run_id, content.run_status(how), end_time=ended)
            self._open.discard(tid)

        self.live.submit(end, f"end of trial {tid}", reports=len(reports))

    def _config_text(self, trial_id: str, params: dict[str, Any], last: dict[str, Any]) -> str | None:
        """The trial's re-runnable config.yaml, as `sweep export` writes it (writer thread: off Tune's loop);
        None for a config the spec cannot read (the reconcile reports it)."""
        try:
            record = TrialRecord.of_trial(self.spec, trial_id, params, last)
            return export.config_text(self.spec.name, record, self.spec.metric.name)
        except Exception:  # noqa: BLE001 - a logging failure must never reach the sweep
            return None

    def _new_error_text(self, trial_id: str, wait_s: float = 15.0) -> str | None:
        """The trial's latest failure text from the sweep's storage (writer thread). Tune writes it next to
        the driver first and syncs it with its next state snapshot (every 2 s here): wait for a new one."""
        deadline = time.monotonic() + wait_s
        while self.error_text is not None:
            text = self.error_text(trial_id)
            if (text and text != self._errors.get(trial_id)) or time.monotonic() > deadline:
                self._errors[trial_id] = text or ""
                return text
            time.sleep(0.5)
        return None

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial.trial_id
        self._retries[tid] = attempt = self._retries.get(tid, 0) + 1

        def note(w: RunWriter) -> None:
            run_id = self._run(w, tid)
            text = self._new_error_text(tid) or "no error text recorded"
            w.set_tags(run_id, {"retries": str(attempt), "last_error": content.last_line(text)})
            w.upload_text(run_id, text, f"errors/attempt-{attempt}.txt")

        if tid in self._trials:
            self.live.submit(note, f"retry of trial {tid}")

"""Ray Tune -> MLflow: one parent run per sweep, one nested child run per trial.

Runs in the Tune driver. Written for sweeps that run for hours next to a server that may restart:
- one `log_batch` per report (Ray's stock MLflowLoggerCallback makes one request per metric);
- MLflow errors never reach Tune: failed requests stay queued in memory and are retried on the next report
  and at the end, with a back-off so an unreachable server costs one quick failure, not a stall per report;
- every run ends FINISHED, FAILED or KILLED, also when the sweep fails or is interrupted (`close`);
- a resumed sweep reuses its runs (found by the `sweep` and `trial_id` tags) instead of duplicating them,
  and runs left RUNNING by a killed driver are marked KILLED.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

import sweep
from sweep import tracking
from sweep.curves import plot_learning_curve, plot_sweep_curves

log = logging.getLogger(__name__)

PARENT_ROLE, TRIAL_ROLE = "sweep", "trial"
# Tune's bookkeeping fields in every result: not metrics of the model.
_NOT_METRICS = {
    "done", "trial_id", "experiment_id", "date", "timestamp", "pid", "hostname", "node_ip", "config",
    "time_this_iter_s", "time_since_restore", "iterations_since_restore", "training_iteration",
    "checkpoint_dir_name", "should_checkpoint", "experiment_tag", "epoch",
}
_MAX_PARAMS_PER_BATCH = 100  # MLflow's own limits per log_batch
_MAX_METRICS_PER_BATCH = 1000
_MAX_TAG_VALUE = 5000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
TERMINAL = ("FINISHED", "FAILED", "KILLED")


# ---------------------------------------------------------------------------------------------- helpers


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _key(name: str) -> str:
    return _BAD_KEY_CHARS.sub("_", str(name))[:250]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_transient(err: BaseException) -> bool:
    """Server down, timeout, 5xx, 429: retry later. A 4xx (bad value, run deleted) will never succeed."""
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    with contextlib.suppress(ImportError):
        import requests

        if isinstance(err, requests.exceptions.HTTPError) and err.response is not None:
            return err.response.status_code >= 500 or err.response.status_code == 429
        if isinstance(err, requests.exceptions.RequestException):
            return True
    return isinstance(err, ConnectionError | TimeoutError)


@contextlib.contextmanager
def _fail_fast_http(timeout_s: float) -> Iterator[None]:
    """MLflow's client retries a dead server for minutes by default; here a failure returns at once
    (this callback retries by itself, between reports), and no request waits longer than `timeout_s`.
    Set around each flush only, so other MLflow users in the process keep their settings."""
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s)),
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # no 'View run' line per run in the CLI
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def git_commit(cwd: str | Path | None = None) -> tuple[str | None, bool]:
    """(commit, dirty) of the working tree the sweep is launched from; (None, False) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=3)
        if head.returncode != 0:
            return None, False
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=3)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False


def trial_config_of(config: Mapping[str, Any], spec: Mapping[str, Any]) -> Any:
    """The TrialConfig a Tune trial runs, from its config dict; None when it cannot be recovered.

    Accepts the layouts a runner may use: a full TrialConfig dict (under 'trial_config' or at the top
    level) or the sampled parameters with a 'model' key (optionally namespaced 'fw_lstm/fast_lr').
    """
    from sweep.config import SweepSpec, TrialConfig, trial_from_params

    with contextlib.suppress(Exception):
        if isinstance(config.get("trial_config"), Mapping):
            return TrialConfig.model_validate(config["trial_config"])
        if isinstance(config.get("model"), Mapping):
            sections = {k: config[k] for k in ("task", "model", "train") if k in config}
            return TrialConfig.model_validate(sections)
        model = config.get("model")
        if isinstance(model, str) and spec:
            params = {}
            for key, value in flatten(config).items():
                if key == "model":
                    continue
                section, _, name = key.rpartition("/")
                if section and section not in (model, "common"):
                    continue  # another model's conditional parameter
                params[name] = value
            return trial_from_params(SweepSpec.model_validate(dict(spec)), model, params)
    return None


def mark_orphans_killed(client: MlflowClient, experiment: str, sweep: str) -> list[str]:
    """Mark KILLED every run of `sweep` still RUNNING (left so by a driver that was killed).

    `experiment` is an experiment name or id. Returns the ids of the runs it changed.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        with contextlib.suppress(MlflowException):
            exp = client.get_experiment(experiment)
    if exp is None:
        return []
    changed = []
    for run in _search_all(client, exp.experiment_id, f"tags.sweep = '{_quote(sweep)}' and "
                                                       "attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "end_reason", "orphaned: the sweep driver stopped without closing it")
        client.set_terminated(run.info.run_id, status="KILLED")
        changed.append(run.info.run_id)
    return changed


def _params(flat: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params are strings of at most 6000 characters (a longer one fails the whole batch)."""
    return {_key(k): (json.dumps(v) if isinstance(v, list | dict) else str(v))[:6000]
            for k, v in flat.items()}


def _yaml(data: Mapping[str, Any]) -> str:
    """YAML of plain values (a Tune config may hold numpy scalars or objects: written as text)."""
    plain = json.loads(json.dumps(dict(data), default=str))
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)


def _last_line(text: str) -> str:
    """The exception line of a traceback: what a person scanning the runs table needs."""
    line = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "unknown error")
    return line.strip()[:_MAX_TAG_VALUE]


def _quote(value: str) -> str:
    return str(value).replace("'", "\\'")


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _never_raises(hook: Callable[..., None]) -> Callable[..., None]:
    """Tune hooks run in the sweep's driver: a bug or surprise here must cost a warning, not the sweep."""

    @functools.wraps(hook)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            hook(self, *args, **kwargs)
        except Exception:  # noqa: BLE001
            log.warning("MLflow logging: %s failed; the sweep goes on", hook.__name__, exc_info=True)

    return guarded


# ---------------------------------------------------------------------------------------------- state


@dataclass
class _Upload:
    local_path: Path
    artifact_path: str | None = None


@dataclass
class _RunState:
    """One MLflow run and what is still to be sent to it (kept until the server accepts it)."""

    name: str
    tags: dict[str, str]
    params: dict[str, str]
    run_id: str | None = None
    reused: bool = False
    params_logged: bool = False
    batches: deque = field(default_factory=deque)  # (metrics, tags) per report, oldest first
    uploads: deque = field(default_factory=deque)
    history: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    final_status: str | None = None
    final_tags: dict[str, str] = field(default_factory=dict)
    terminated: bool = False
    retries: int = 0
    max_epochs: int | None = None
    last_steps: dict[str, int] = field(default_factory=dict)  # metric -> highest step MLflow holds


# ---------------------------------------------------------------------------------------------- callback


class MlflowSweepCallback(Callback):
    """Log a Tune sweep to MLflow. Pass it in `tune.RunConfig(callbacks=[...])`; call `close()` in a
    `finally` after `Tuner.fit()` so no run stays RUNNING whatever happened.

    tracking_uri: the server (see `sweep.tracking.ensure_server`); experiment: MLflow experiment name;
    sweep_name: the parent run's name and the `sweep` tag that finds runs again on resume; spec: the
    SweepSpec as a dict (logged as YAML, its fixed settings as params); tags: extra tags on every run.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str, spec: dict | None = None,
                 tags: dict | None = None, *, client: MlflowClient | None = None,
                 request_timeout_s: float = 10.0, retry_after_s: float = 2.0, max_retry_after_s: float = 30.0,
                 close_timeout_s: float = 30.0, max_pending_reports: int = 20_000,
                 trial_config_fn: Callable[[Mapping[str, Any]], Any] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.spec = dict(spec or {})
        self.extra_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.request_timeout_s = request_timeout_s
        self.retry_after_s = retry_after_s
        self.max_retry_after_s = max_retry_after_s
        self.close_timeout_s = close_timeout_s
        self.max_pending_reports = max_pending_reports
        self.trial_config_fn = trial_config_fn
        self.client = client
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.dropped_reports = 0
        self._parent: _RunState | None = None
        self._trials: dict[str, _RunState] = {}
        self._known_runs: dict[str, Any] = {}  # trial_id -> existing MLflow run (resume)
        self._resolved = False
        self._ready = False  # runs are created once Tune has shown its (restored) trials
        self._trial_ids: set[str] = set()
        self._down_until = 0.0
        self._backoff = retry_after_s
        self._outage_logged = False
        self._closed = False
        self._started = False
        self._gave_up_at = -math.inf
        self._workdir: Path | None = None
        self._common_tags: dict[str, str] | None = None

    # Tune pickles the RunConfig (and so this callback) into the experiment folder: keep only settings.
    def __getstate__(self) -> dict[str, Any]:
        keys = ("tracking_uri", "experiment", "sweep_name", "spec", "extra_tags", "request_timeout_s",
                "retry_after_s", "max_retry_after_s", "close_timeout_s", "max_pending_reports",
                "trial_config_fn")
        state = {k: getattr(self, k) for k in keys}
        state["tags"] = state.pop("extra_tags")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    # ------------------------------------------------------------------------------------ public

    @property
    def parent_run_url(self) -> str | None:
        """Link to the parent run in the MLflow UI (None until it exists)."""
        if not (self.parent_run_id and self.experiment_id and self.tracking_uri.startswith("http")):
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"

    @_never_raises
    def log_parent_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach a file or folder (e.g. exported best configs) to the sweep's parent run."""
        parent = self._parent_state()
        parent.uploads.append(_Upload(Path(path), artifact_path))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send what is pending; True when nothing is left. Never raises; skips while in back-off."""
        if not tracking.is_ready(self.tracking_uri):
            return False  # the local server is booting or being restarted: results wait in memory
        if not force and time.monotonic() < self._down_until:
            return False
        try:
            with _fail_fast_http(self.request_timeout_s):
                self._flush_all()
        except Exception as err:  # noqa: BLE001 - logging must never take the sweep down
            self._down_until = time.monotonic() + self._backoff
            if not self._outage_logged:
                log.warning("MLflow at %s is not answering (%s); keeping results in memory and retrying "
                            "every %.0f-%.0f s", self.tracking_uri, str(err).splitlines()[0][:200],
                            self.retry_after_s, self.max_retry_after_s)
                self._outage_logged = True
            self._backoff = min(self._backoff * 2, self.max_retry_after_s)
            return False
        if self._outage_logged:
            log.warning("MLflow at %s answers again; pending results sent", self.tracking_uri)
        self._outage_logged = False
        self._backoff = self.retry_after_s
        self._down_until = 0.0
        return True

    def close(self, status: str | None = None) -> bool:
        """End every run: open trials KILLED, the parent `status` (default FINISHED, or KILLED when trials
        were cut off). Retries pending results for up to close_timeout_s (a few seconds when the end of
        the experiment just tried that long). Idempotent; never raises on MLflow errors."""
        if status is not None and status not in TERMINAL:
            raise ValueError(f"status must be one of {TERMINAL}, got {status!r}")
        if not self._started and not self._trials and (self._parent is None or self._parent.run_id is None):
            return True  # Tune never started: nothing to record
        try:
            return self._close(status)
        except Exception:  # noqa: BLE001
            log.warning("MLflow logging: close failed", exc_info=True)
            return False

    def _close(self, status: str | None) -> bool:
        for state in self._trials.values():
            if state.final_status is None:
                state.final_status = "KILLED"
                state.final_tags["end_reason"] = "the sweep stopped before this trial ended"
                self._add_trial_artifacts(state, None, checkpoint=False)
        self._ready = True
        parent = self._parent_state()
        if status is not None and parent.final_status != status:
            parent.final_status, parent.terminated = status, False
        elif parent.final_status is None:
            killed = any(s.final_status == "KILLED" for s in self._trials.values())
            parent.final_status = "KILLED" if killed else "FINISHED"
        just_tried = time.monotonic() - self._gave_up_at < 60
        done = self._flush_until(time.monotonic() + (2.0 if just_tried else self.close_timeout_s))
        if not done:
            pending = sum(len(s.batches) for s in self._all_states())
            log.warning("MLflow at %s: could not send %d pending report(s) before giving up",
                        self.tracking_uri, pending)
        self._closed = True
        atexit.unregister(self._close_at_exit)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return done

    def _close_at_exit(self) -> None:
        unfinished = any(s.batches or s.uploads or not s.terminated for s in self._all_states())
        if not self._closed and unfinished:
            self.close_timeout_s = min(self.close_timeout_s, 5.0)
            self.close()

    # ------------------------------------------------------------------------------------ Tune hooks

    @_never_raises
    def setup(self, **info: Any) -> None:
        self._closed, self._started = False, True
        atexit.register(self._close_at_exit)  # a driver leaving fit() by a second Ctrl+C still ends its runs
        self._parent_state()
        self.flush(force=True)  # creates the experiment; runs wait for the first step (resume needs it)

    @_never_raises
    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._ready:
            self._note_trials(trials)
            self.flush()

    @_never_raises
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._note_trials(trials)
        state = self._trials.get(trial.trial_id)
        if state is None:
            self._trials[trial.trial_id] = self._new_trial_state(trial)
        elif state.final_status is not None:  # an ended trial started again (resume of an errored one)
            state.final_status, state.final_tags, state.terminated = None, {}, False
            state.reused = True  # reopen the run (RUNNING again)
        self.flush()

    @_never_raises
    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.on_trial_start(iteration, trials, trial)

    @_never_raises
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        state = self._trials.get(trial.trial_id) or self._trials.setdefault(
            trial.trial_id, self._new_trial_state(trial))
        step = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        now_ms = int(time.time() * 1000)
        values = {k: v for k, v in flatten({k: v for k, v in result.items() if k not in _NOT_METRICS}).items()
                  if _is_number(v)}
        metrics = [Metric(_key(k), float(v), now_ms, step) for k, v in values.items()]
        state.history.append({"epoch": step, **values})
        state.batches.append((metrics, {}))
        self._bound_queue()
        self.flush()

    @_never_raises
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        state = self._trials.get(trial.trial_id)
        if state is None:
            if not last:
                return  # removed before it ever started (a pending trial): no run to record
            state = self._trials.setdefault(trial.trial_id, self._new_trial_state(trial))
        stopped = self._stopped_early(last, state)
        reason = ("diverged" if last.get("diverged") else "stopped early by the scheduler" if stopped
                  else "completed" if last else "stopped before its first report")
        state.final_status = "FINISHED"
        state.final_tags = {"stopped_early": str(stopped).lower(), "end_reason": reason}
        if last.get("diverged"):  # ended normally for Tune (no retry of a hopeless trial), failed as a run
            error = (f"TrialDiverged: the training loss became {last.get('train_loss')} at epoch "
                     f"{last.get('epoch')}; lower train.lr or set train.grad_clip")
            state.final_status = "FAILED"
            state.final_tags["error"] = error
            self._write_upload(state, "error.txt", error + "\n")
        self._add_trial_artifacts(state, trial, checkpoint=True)
        self.flush()

    @_never_raises
    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        state = self._trials.get(trial.trial_id)
        if state is not None:
            error = self._error_text(trial)
            state.retries += 1
            state.batches.append(([], {"retries": str(state.retries), "last_error": _last_line(error)}))
            self._write_upload(state, f"errors/attempt-{state.retries}.txt", error)
        self.flush()

    @_never_raises
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        state = self._trials.get(trial.trial_id) or self._trials.setdefault(
            trial.trial_id, self._new_trial_state(trial))
        error = self._error_text(trial)
        state.final_status = "FAILED"
        state.final_tags = {"error": _last_line(error), "end_reason": "failed"}
        self._write_upload(state, "error.txt", error)
        self._add_trial_artifacts(state, trial, checkpoint=True)
        self.flush()

    @_never_raises
    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._ready = True
        for state in self._trials.values():
            if state.final_status is None:  # interrupted (Ctrl+C) or cut by a sweep-wide stop
                state.final_status = "KILLED"
                state.final_tags = {"end_reason": "the sweep stopped before this trial ended"}
                self._add_trial_artifacts(state, None, checkpoint=False)
        self._log_summary(trials)
        parent = self._parent_state()
        if parent.final_status is None:
            killed = any(s.final_status == "KILLED" for s in self._trials.values())
            parent.final_status = "KILLED" if killed else "FINISHED"
        self._flush_until(time.monotonic() + self.close_timeout_s)

    # ------------------------------------------------------------------------------------ building state

    def _common(self) -> dict[str, str]:
        if self._common_tags is None:
            commit, dirty = git_commit()
            tags = {"sweep": self.sweep_name, "fwsweep_version": sweep.__version__}
            searcher = self.spec.get("searcher") or {}
            if searcher:
                tags["searcher"] = "/".join(str(searcher[k]) for k in ("name", "sampler") if searcher.get(k))
            task = self.spec.get("task") or {}
            if task.get("name"):
                tags["task"] = str(task["name"])
            if commit:
                tags |= {"git_commit": commit, "mlflow.source.git.commit": commit,
                         "git_dirty": str(dirty).lower()}
            self._common_tags = tags | self.extra_tags
        return self._common_tags

    def _parent_state(self) -> _RunState:
        if self._parent is None:
            params = _params(flatten({k: v for k, v in self.spec.items() if k != "space"}))
            tags = self._common() | {"fwsweep_role": PARENT_ROLE}
            if self.spec.get("models"):
                tags["models"] = ",".join(map(str, self.spec["models"]))
            if self.spec.get("description"):
                tags["mlflow.note.content"] = str(self.spec["description"])
            self._parent = _RunState(name=self.sweep_name, tags=tags, params=params)
            if self.spec:
                self._write_upload(self._parent, "spec.yaml", _yaml(self.spec))
        return self._parent

    def _new_trial_state(self, trial: Any) -> _RunState:
        config = dict(getattr(trial, "config", None) or {})
        trial_config = None
        with contextlib.suppress(Exception):
            trial_config = self._trial_config(trial)
        if trial_config is not None:
            data = trial_config.to_dict() if hasattr(trial_config, "to_dict") else dict(trial_config)
        else:
            data = config
        model_field = data.get("model")
        model = str(model_field.get("name") if isinstance(model_field, Mapping) else model_field or "trial")
        tags = self._common() | {"fwsweep_role": TRIAL_ROLE, "trial_id": trial.trial_id, "model": model}
        task = data.get("task") if isinstance(data.get("task"), Mapping) else None
        if task:
            tags["task"] = str(task.get("name", tags.get("task", "")))
            if task.get("pairs") is not None:
                tags["difficulty"] = f"{task.get('name')}-K{task.get('pairs')}"
        flat = flatten(data)
        epochs = flat.get("train.epochs")
        state = _RunState(name=f"{model}-{trial.trial_id}", tags=tags, params=_params(flat), model=model,
                          max_epochs=int(epochs) if _is_number(epochs) else None)
        state.tags["config_source"] = "TrialConfig" if trial_config is not None else "tune_config"
        self._write_upload(state, "config.yaml", _yaml(data))
        return state

    def _trial_config(self, trial: Any) -> Any:
        config = dict(getattr(trial, "config", None) or {})
        return self.trial_config_fn(config) if self.trial_config_fn else trial_config_of(config, self.spec)

    def _note_trials(self, trials: list) -> None:
        self._trial_ids.update(t.trial_id for t in trials or [])
        self._ready = True

    def _stopped_early(self, last: Mapping[str, Any], state: _RunState) -> bool:
        """Ended by the scheduler (ASHA): before its last epoch and without the final (test) report that
        `run_trial` makes when it completes or reaches its target. Tune marks both `done`."""
        if "test_accuracy" in last or last.get("diverged"):
            return False
        budget, train = self.spec.get("budget") or {}, self.spec.get("train") or {}
        max_epochs = state.max_epochs or budget.get("max_epochs") or train.get("epochs")
        epoch = last.get("epoch", last.get("training_iteration"))
        with contextlib.suppress(TypeError, ValueError):
            return int(epoch) < int(max_epochs)
        return False

    def _error_text(self, trial: Any) -> str:
        with contextlib.suppress(Exception):
            text = trial.get_error()
            if text:
                return str(text)
        with contextlib.suppress(Exception):
            if trial.error_file and Path(trial.error_file).exists():
                return Path(trial.error_file).read_text(errors="replace")
        return "the trial failed; Ray Tune recorded no error text"

    def _add_trial_artifacts(self, state: _RunState, trial: Any, checkpoint: bool) -> None:
        with contextlib.suppress(Exception):
            history = self._full_history(state.history, trial)
            if history:
                path = self._file_path(state, "learning_curve.png")
                plot_learning_curve(history, path, title=f"{state.name} ({self.sweep_name})")
                state.uploads.append(_Upload(path))
        if checkpoint and trial is not None:
            with contextlib.suppress(Exception):
                ckpt = trial.checkpoint
                if ckpt is not None:
                    local = Path(ckpt.path)
                    if not local.is_dir():
                        local = Path(ckpt.to_directory(str(self._file_path(state, "checkpoint"))))
                    state.uploads.append(_Upload(local, "checkpoint"))

    def _full_history(self, history: list[dict[str, Any]], trial: Any) -> list[dict[str, Any]]:
        """This session's reports, or Tune's result.json when it holds more (a resumed trial)."""
        rows = list(history)
        with contextlib.suppress(Exception):
            path = Path(trial.local_path) / "result.json"
            disk = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if len(disk) > len(rows):
                rows = [{"epoch": r.get("epoch", r.get("training_iteration")), **r} for r in disk]
        return rows

    def _file_path(self, state: _RunState, name: str) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="fwsweep-mlflow-"))
        folder = self._workdir / _key(state.name).replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def _write_file(self, state: _RunState, name: str, text: str) -> Path:
        path = self._file_path(state, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def _write_upload(self, state: _RunState, name: str, text: str) -> None:
        """Queue a small text artifact (`name` may hold a sub-folder: 'errors/attempt-1.txt')."""
        folder, _, base = name.rpartition("/")
        path = self._write_file(state, f"{folder}/{base}" if folder else base, text)
        state.uploads.append(_Upload(path, folder or None))

    def _bound_queue(self) -> None:
        pending = sum(len(s.batches) for s in self._all_states())
        while pending > self.max_pending_reports:
            oldest = max(self._all_states(), key=lambda s: len(s.batches))
            oldest.batches.popleft()
            self.dropped_reports += 1
            pending -= 1

    def _all_states(self) -> list[_RunState]:
        return ([self._parent] if self._parent else []) + list(self._trials.values())

    def _outcomes(self, trials: list) -> dict[str, tuple[str, str, list[dict[str, Any]], Any]]:
        """trial_id -> (model, outcome, history, Tune trial) over this session's trials and the ones a
        resumed sweep restored already ended (those get no hooks)."""
        out: dict[str, tuple[str, str, list[dict[str, Any]], Any]] = {}
        tune_trials = {t.trial_id: t for t in trials or []}
        for tid, state in self._trials.items():
            outcome = ("stopped_early" if state.final_tags.get("stopped_early") == "true"
                       else (state.final_status or "KILLED").lower())
            out[tid] = (state.model, outcome, self._full_history(state.history, tune_trials.get(tid)),
                        tune_trials.get(tid))
        for tid, trial in tune_trials.items():
            if tid in out or trial.status not in ("TERMINATED", "ERROR"):
                continue  # never started in any session: not an outcome
            model = "trial"
            with contextlib.suppress(Exception):
                model = self._trial_config(trial).model.name
            probe = _RunState(name=tid, tags={}, params={}, model=model)
            last = trial.last_result or {}
            outcome = "failed" if trial.status == "ERROR" else (
                "stopped_early" if self._stopped_early(last, probe) else "finished")
            out[tid] = (model, outcome, self._full_history([], trial), trial)
        return out

    def _log_summary(self, trials: list) -> None:
        """Best metric per model and trial counts, on the parent run (metrics, summary.json, a plot)."""
        with contextlib.suppress(Exception):
            metric_cfg = self.spec.get("metric") or {}
            metric, mode = metric_cfg.get("name", "val_accuracy"), metric_cfg.get("mode", "max")
            better = max if mode == "max" else min
            outcomes = self._outcomes(trials)
            best: dict[str, tuple[float, str]] = {}
            for tid, (model, _, history, trial) in outcomes.items():
                values = [float(r[metric]) for r in history if _is_number(r.get(metric))]
                with contextlib.suppress(Exception):
                    values.append(float(trial.metric_analysis[metric][mode]))
                values = [v for v in values if math.isfinite(v)]
                if values:
                    value = better(values)
                    if model not in best or better(value, best[model][0]) == value:
                        best[model] = (value, tid)
            kinds = Counter(outcome for _, outcome, _, _ in outcomes.values())
            counts = {f"trials_{k}": kinds.get(k, 0)
                      for k in ("finished", "stopped_early", "failed", "killed")}
            counts["trials_total"] = len(outcomes)
            now_ms = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now_ms, 0) for k, v in counts.items()]
            metrics += [Metric(_key(f"best_{metric}/{m}"), v, now_ms, 0) for m, (v, _) in best.items()]
            tags = {f"best_trial/{model}": tid for model, (_, tid) in best.items()}
            if best:
                value, tid = better(best.values(), key=lambda x: x[0])
                metrics.append(Metric(_key(f"best_{metric}"), value, now_ms, 0))
                tags["best_trial_id"] = tid
            parent = self._parent_state()
            parent.batches.append((metrics, tags))
            summary = {"metric": metric, "mode": mode, **counts,
                       "best": {m: {"value": v, "trial_id": t} for m, (v, t) in best.items()},
                       "trials": {tid: {"model": m, "outcome": o} for tid, (m, o, _, _) in outcomes.items()}}
            self._write_upload(parent, "summary.json", json.dumps(summary, indent=2))
            histories = {tid: (m, h) for tid, (m, _, h, _) in outcomes.items() if h}
            if histories:
                path = self._file_path(parent, f"{metric}_curves.png")
                plot_sweep_curves(histories, metric, path, title=f"{self.sweep_name}: {metric} per trial")
                parent.uploads.append(_Upload(path))

    # ------------------------------------------------------------------------------------ sending

    def _client(self) -> MlflowClient:
        if self.client is None:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        return self.client

    def _flush_until(self, deadline: float) -> bool:
        while True:
            if self.flush(force=True):
                return True
            if time.monotonic() >= deadline:
                self._gave_up_at = time.monotonic()
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _flush_all(self) -> None:
        if self.experiment_id is None:
            self.experiment_id = self._get_or_create_experiment()
        if not self._ready:
            return
        if not self._resolved:
            self._resolve_existing_runs()
        self._flush_run(self._parent_state(), parent_id=None)
        for state in list(self._trials.values()):
            self._flush_run(state, parent_id=self.parent_run_id)
        parent = self._parent_state()
        if parent.final_status and not parent.terminated and all(s.terminated for s in self._trials.values()):
            self._finish(parent)

    def _get_or_create_experiment(self) -> str:
        client = self._client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return client.create_experiment(self.experiment)
            except MlflowException:  # created concurrently by another driver
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _resolve_existing_runs(self) -> None:
        """Resume: mark runs orphaned by a killed driver, then adopt the runs of the trials Tune restored."""
        client = self._client()
        mark_orphans_killed(client, self.experiment_id, self.sweep_name)
        runs = _search_all(client, self.experiment_id,
                           f"tags.sweep = '{_quote(self.sweep_name)}' and tags.fwsweep_role = '{TRIAL_ROLE}'")
        by_trial = {}
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            by_trial[run.data.tags.get("trial_id")] = run  # the latest wins
        self._known_runs = {tid: run for tid, run in by_trial.items() if tid in self._trial_ids}
        parents = {run.data.tags.get("mlflow.parentRunId") for run in self._known_runs.values()} - {None}
        parents = {p for p in parents if client.get_run(p).info.lifecycle_stage != "deleted"}
        if parents and self._parent is not None and self._parent.run_id is None:
            self._parent.run_id = sorted(parents)[0]
            self._parent.reused = True
            self.parent_run_id = self._parent.run_id
        self._resolved = True

    def _flush_run(self, state: _RunState, parent_id: str | None) -> None:
        client = self._client()
        if state.run_id is None:
            if parent_id is None and state is not self._parent:
                return  # the parent does not exist yet
            known = self._known_runs.get(state.tags.get("trial_id", ""))
            if known is not None:
                state.run_id, state.reused = known.info.run_id, True
            else:
                tags = dict(state.tags)
                if parent_id:
                    tags["mlflow.parentRunId"] = parent_id
                run = client.create_run(self.experiment_id, tags=tags, run_name=state.name)
                state.run_id = run.info.run_id
            if state is self._parent:
                self.parent_run_id = state.run_id
        if state.reused:  # adopt a run of an earlier session: reopen it, log only the params it lacks
            run = client.get_run(state.run_id)
            if run.info.status != "RUNNING" and not state.final_status:
                client.update_run(state.run_id, status="RUNNING")
            if "error" in run.data.tags and not state.final_status:
                client.set_tag(state.run_id, "previous_error", run.data.tags["error"])
                client.delete_tag(state.run_id, "error")
            existing = run.data.params
            state.params = {k: v for k, v in state.params.items() if k not in existing}
            state.params_logged = not state.params
            self._learn_logged_steps(state, run)
            state.reused = False
        if not state.params_logged:
            items = list(state.params.items())
            for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
                chunk = items[i:i + _MAX_PARAMS_PER_BATCH]
                params = [Param(k, v) for k, v in chunk]
                self._guarded(lambda p=params: client.log_batch(state.run_id, params=p),
                              f"params of {state.name}")
            state.params_logged = True
        while state.batches:
            metrics, tags = state.batches[0]
            # A trial resumed from a checkpoint re-reports the epochs after it: keep one value per step.
            if state is not self._parent:  # (the parent's summary is re-logged at step 0 on purpose)
                metrics = [m for m in metrics if m.step > state.last_steps.get(m.key, -1)]
            for i in range(0, max(len(metrics), 1), _MAX_METRICS_PER_BATCH):
                chunk = metrics[i:i + _MAX_METRICS_PER_BATCH]
                tag_list = [RunTag(k, str(v)[:_MAX_TAG_VALUE]) for k, v in tags.items()] if i == 0 else []
                if chunk or tag_list:
                    self._guarded(lambda c=chunk, t=tag_list: client.log_batch(state.run_id, metrics=c,
                                                                                 tags=t),
                                  f"metrics of {state.name}")
            for m in metrics:
                state.last_steps[m.key] = max(m.step, state.last_steps.get(m.key, -1))
            state.batches.popleft()
        while state.uploads:
            up = state.uploads[0]
            send = client.log_artifacts if up.local_path.is_dir() else client.log_artifact
            if up.local_path.exists():
                self._guarded(lambda f=send, u=up: f(state.run_id, str(u.local_path), u.artifact_path),
                              f"artifact {up.local_path.name} of {state.name}")
            state.uploads.popleft()
        if state is not self._parent and state.final_status and not state.terminated:
            self._finish(state)

    def _learn_logged_steps(self, state: _RunState, run: Any) -> None:
        """The steps an adopted run already holds (every report logs all its metrics at one step, so
        one metric's history tells them all)."""
        if state is self._parent or state.last_steps or not run.data.metrics:
            return
        metric = (self.spec.get("metric") or {}).get("name")
        key = metric if metric in run.data.metrics else next(iter(run.data.metrics))
        history = self._client().get_metric_history(state.run_id, key)
        if history:
            top = max(m.step for m in history)
            state.last_steps = {k: top for k in run.data.metrics}

    def _finish(self, state: _RunState) -> None:
        client = self._client()
        if state.final_tags:
            tags = [RunTag(k, str(v)[:_MAX_TAG_VALUE]) for k, v in state.final_tags.items()]
            self._guarded(lambda: client.log_batch(state.run_id, tags=tags), f"final tags of {state.name}")
        self._guarded(lambda: client.set_terminated(state.run_id, status=state.final_status),
                      f"status of {state.name}")
        state.terminated = True

    @staticmethod
    def _guarded(call: Callable[[], Any], what: str) -> None:
        """Run one request: a transient failure propagates (retry later), a permanent one is dropped."""
        try:
            call()
        except Exception as err:
            if _is_transient(err):
                raise
            log.warning("MLflow rejected %s; skipped: %s", what, str(err).splitlines()[0][:300])

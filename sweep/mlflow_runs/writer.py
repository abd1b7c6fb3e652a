"""The run writer: every MLflow write of fwsweep goes through here (sweeps, `sweep sync`, comparisons).

Tune-agnostic and idempotent: a run is found by its tags before one is created, params are logged only
where absent (MLflow refuses to change one), a metric row is logged once per step, a run is reopened or
ended only when its status differs. HTTP retries are MLflow's own (urllib3 `Retry` with back-off,
configured by MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT: fwsweep lowers the defaults,
minutes of retries per request, to seconds, unless they are set). A failure is then either *transient*
(server down, timeout, 5xx, 429: try again later) or *permanent* (4xx: skipped with a warning).

`LiveWriter` runs writes on a background thread in order, so a Tune driver only enqueues them; when
the server is down it keeps them (bounded) and retries with a back-off. Completeness does not depend on
it: `sweep.mlflow_runs.reconcile` brings MLflow level with the sweep's own records afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.util
import logging
import os
import posixpath
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweep import tracking
from sweep.mlflow_runs.content import MAX_TAG_VALUE

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # MLflow's own limits per log_batch
MAX_METRICS_PER_BATCH = 1000
MAX_TAGS_PER_BATCH = 100
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
Row = tuple[int, Mapping[str, float], int | None]  # (step, values, timestamp in ms or None)


# Modules MLflow's Databricks checks try to import on every request (request headers, REPL context).
DATABRICKS_PROBES = ("dbruntime", "IPython", "pyspark")


def configure_http() -> None:
    """Seconds, not minutes, of MLflow's own retries per request (a user's settings are kept); no search of
    sys.path per request for Databricks modules that are not installed."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    mark_absent(DATABRICKS_PROBES)


class _NotInstalled(importlib.abc.MetaPathFinder):
    """Answers an import of one of `names` (modules found not installed) with ModuleNotFoundError at once,
    as Python would after searching every path entry again. Unlike a None in sys.modules (Python's own
    marker), `name in sys.modules` stays False: Ray ("IPython") and MLflow ("pyspark") read it as "the
    module is loaded" and import it (Ray's error-printing thread raised when a node died). The cost:
    importlib.util.find_spec of these names raises ModuleNotFoundError instead of returning None."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def mark_absent(modules: Iterable[str]) -> None:
    """Imports of the modules that are not installed fail at once instead of searching every path entry
    again: MLflow builds each request's headers in 0.06 ms instead of 0.31 ms here (it tries them all).
    Installed ones are left; the finder goes in once."""
    known = frozenset().union(*(f.names for f in sys.meta_path if isinstance(f, _NotInstalled)))
    absent = frozenset(n for n in modules if n not in known and n not in sys.modules
                       and importlib.util.find_spec(n) is None)
    if absent:
        sys.meta_path.insert(0, _NotInstalled(absent))


def is_transient(err: BaseException) -> bool:
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


REFUSED_STATUSES = (401, 403)  # credentials not accepted, or this user may not write there


def refusal_status(err: BaseException) -> int | None:
    """401 or 403 when MLflow refused the request for who made it: not an outage (waiting does not help) and
    not one bad value (every later write is refused too)."""
    status: int | None = None
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
    else:
        response = getattr(err, "response", None)  # requests.HTTPError (artifact uploads)
        status = getattr(response, "status_code", None)
    return status if status in REFUSED_STATUSES else None


def said(err: BaseException) -> str:
    """What the server answered (MLflow's client words it "... Response body: '...'")."""
    text = str(err)
    body = text.partition("Response body: ")[2].strip().strip("'\"") if "Response body: " in text else text
    return (body.splitlines() or [type(err).__name__])[0][:200]


def sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


class RunWriter:
    """Idempotent writes to one tracking server (see the module docstring); one per thread."""

    def __init__(self, tracking_uri: str, client: MlflowClient | None = None) -> None:
        configure_http()
        self.tracking_uri = tracking_uri
        self.client = client or MlflowClient(tracking_uri=tracking_uri)
        self._created: dict[str, set[int]] = {}  # run made by this writer -> every step it logged there
        self._learned: dict[tuple[str, str], set[int]] = {}  # (other run, metric) -> steps of its history
        self._artifact_uris: dict[str, str] = {}  # run -> where its artifacts go, as the server said
        self.requests = 0

    # ---- runs
    def create_run(self, exp_id: str, name: str, tags: Mapping[str, str],
                   parent_id: str | None = None, start_time: int | None = None) -> str:
        """A new run; `start_time` (ms) when what it records began, which may be well before this request
        (a trial that trained while the server booted, a run made from the records)."""
        tags = dict(tags) | ({"mlflow.parentRunId": parent_id} if parent_id else {})
        self.requests += 1
        run = self.client.create_run(exp_id, start_time=start_time, tags=tags, run_name=name)
        run_id = run.info.run_id
        self._created[run_id] = set()
        self.know(run)
        return run_id

    def know(self, run: Any) -> None:
        """Remember where a run read from the server keeps its artifacts: an upload then sends one request
        (MLflow's client asks for the run first, once per run and process)."""
        if run.info.artifact_uri:
            self._artifact_uris[run.info.run_id] = run.info.artifact_uri

    def set_status(self, run: Any, status: str, end_time: int | None = None) -> None:
        """End a run with `status` (FINISHED, FAILED, KILLED) at `end_time` (ms; default now), or reopen it
        (RUNNING), if it differs."""
        if run.info.status == status:
            return
        self.requests += 1
        if status == "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            self.client.set_terminated(run.info.run_id, status=status, end_time=end_time)

    def end(self, run_id: str, status: str, end_time: int | None = None) -> None:
        """End a run whose state this writer does not hold (FINISHED, FAILED, KILLED) at `end_time` (ms)."""
        self.requests += 1
        self.client.set_terminated(run_id, status=status, end_time=end_time)

    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again (a trial restarted or resumed)."""
        self.requests += 1
        self.client.update_run(run_id, status="RUNNING")

    def delete_run(self, run_id: str) -> None:
        self.requests += 1
        self.client.delete_run(run_id)  # to MLflow's trash: restorable

    # ---- params and tags
    def log_params(self, run_id: str, params: Mapping[str, str], existing: Mapping[str, str] | None = None
                   ) -> int:
        """Log the params the run does not hold yet; returns how many."""
        todo = [Param(k, v) for k, v in params.items() if k not in (existing or {})]
        for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
            self.requests += 1
            self.client.log_batch(run_id, params=todo[i:i + MAX_PARAMS_PER_BATCH])
        return len(todo)

    def set_tags(self, run_id: str, tags: Mapping[str, str], existing: Mapping[str, str] | None = None,
                 params: Mapping[str, str] | None = None) -> int:
        """Set the tags whose value differs from `existing` (the run's tags, when known); new `params` ride
        in the same request when they fit."""
        existing = existing or {}
        todo = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()
                if existing.get(k) != str(v)[:MAX_TAG_VALUE]]
        extra = [Param(k, v) for k, v in (params or {}).items()]
        if len(extra) > MAX_PARAMS_PER_BATCH:
            self.log_params(run_id, params or {})
            extra = []
        if todo or extra:
            self.requests += 1
            self.client.log_batch(run_id, tags=todo, params=extra)
        return len(todo)

    def delete_tag(self, run_id: str, key: str) -> None:
        self.requests += 1
        self.client.delete_tag(run_id, key)

    # ---- metrics
    def logged_steps(self, run_id: str, probe_key: str) -> set[int]:
        """The steps at which the run holds the rows that have `probe_key`. Each row is logged in one batch
        (all its metrics or none), so that metric's history tells whether each of them is there; it says
        nothing of rows without the metric (a final row's test metrics are in no earlier row), hence one
        learned history per (run, metric). A run this writer made holds exactly what it logged."""
        if run_id in self._created:
            return self._created[run_id]
        if (run_id, probe_key) not in self._learned:
            self.requests += 1
            history = self.client.get_metric_history(run_id, probe_key)
            self._learned[(run_id, probe_key)] = {m.step for m in history}
        return self._learned[(run_id, probe_key)]

    def _logged(self, run_id: str, rows: Iterable[Row]) -> None:
        """Keep what this writer knows of the run's steps in step with the rows it just logged."""
        for step, values, _ in rows:
            if run_id in self._created:
                self._created[run_id].add(step)
            for key in values:
                if (run_id, key) in self._learned:
                    self._learned[(run_id, key)].add(step)

    def log_rows(self, run_id: str, rows: Sequence[Row], params: Mapping[str, str] | None = None,
                 tags: Mapping[str, str] | None = None) -> int:
        """Log the rows whose step the run does not hold yet, in step order; returns how many rows.

        `params` (new ones, e.g. a first report's constants) and `tags` ride in the same request when they
        fit, else they go in one of their own."""
        rows = [r for r in rows if r[1]]
        extra = [Param(k, v) for k, v in (params or {}).items()]
        labels = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in (tags or {}).items()]
        counts = Counter(k for r in rows for k in r[1])
        todo: dict[int, Row] = {}
        for row in rows:  # each row judged by a metric it has: the most common one (one history per run)
            probe = max(row[1], key=lambda k: (counts[k], k))
            if row[0] not in self.logged_steps(run_id, probe) and row[0] not in todo:
                todo[row[0]] = row
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, ts or now, step) for step, values, ts in (todo[s] for s in sorted(todo))
                   for k, v in values.items()]
        fits = (len(metrics) + len(extra) + len(labels) <= MAX_METRICS_PER_BATCH
                and len(extra) <= MAX_PARAMS_PER_BATCH and len(labels) <= MAX_TAGS_PER_BATCH)
        if (extra or labels) and not (metrics and fits):
            self.set_tags(run_id, tags or {}, params=params)  # no rows to send, or no room beside them
            extra, labels = [], []
        try:
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.requests += 1
                self.client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH],
                                      params=extra if i == 0 else [], tags=labels if i == 0 else [])
        except Exception:
            self._forget(run_id)  # a request cut off by an outage may have landed: ask the server next time
            raise
        self._logged(run_id, todo.values())
        return len(todo)

    def _forget(self, run_id: str) -> None:
        self._created.pop(run_id, None)
        for key in [k for k in self._learned if k[0] == run_id]:
            del self._learned[key]

    # ---- artifacts
    def upload_text(self, run_id: str, text: str, artifact_file: str) -> None:
        norm = posixpath.normpath(artifact_file)
        with tempfile.TemporaryDirectory(prefix="fwsweep-upload-") as tmp:
            path = Path(tmp, posixpath.basename(norm))
            path.write_text(text, encoding="utf-8")
            self.upload_path(run_id, path, posixpath.dirname(norm) or None)

    def upload_path(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.requests += 1
        repo = self._artifact_repository(run_id)
        if repo is None:  # a run this writer has not seen: MLflow's client looks it up
            repo = self.client
            args: tuple[str, ...] = (run_id, str(path), artifact_path)
        else:
            args = (str(path), artifact_path)
        if path.is_dir():
            repo.log_artifacts(*args)
        else:
            repo.log_artifact(*args)

    def _artifact_repository(self, run_id: str) -> Any:
        """The run's artifact repository, as MLflow's client builds it, when its artifact URI is known."""
        uri = self._artifact_uris.get(run_id)
        if uri is None:
            return None
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

        return get_artifact_repository(add_databricks_profile_info_to_artifact_uri(uri, self.tracking_uri),
                                       tracking_uri=self.tracking_uri)


# ---------------------------------------------------------------------------------------------- live


@dataclass
class _Op:
    do: Callable[[RunWriter], Any]
    what: str
    reports: int  # metric rows it carries (what a dropped op loses until the next reconcile)
    key: Hashable | None = None  # ops of one kind of data (a trial's metric rows): droppable, or taken
    data: Any = None  # what a later op sends instead of this one, when it takes it (`LiveWriter.take`)


class LiveWriter:
    """A RunWriter on a background thread: `submit` returns at once; ops run in order.

    While the server does not answer, ops wait (the oldest first) and are retried with a back-off
    (`retry_after_s` doubling to `max_retry_after_s`). Beyond `max_pending` waiting ops the oldest
    metric ops are dropped and counted (`unsent_reports`): `sweep sync` backfills them from the sweep's
    records. A permanent failure (4xx) skips its op with a warning, except a refusal of who is asking (401,
    403): the first is kept in `refused`, for the sweep to stop on (nothing of it would reach MLflow).
    """

    def __init__(self, writer: RunWriter, *, retry_after_s: float = 2.0, max_retry_after_s: float = 30.0,
                 max_pending: int = 20_000) -> None:
        self.writer = writer
        self.retry_after_s, self.max_retry_after_s = retry_after_s, max_retry_after_s
        self.max_pending = max_pending
        self.dropped_reports = 0
        self.sent_reports = 0
        self._ops: deque[_Op] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._down_since: float | None = None
        self._thread: threading.Thread | None = None
        self.refused: str | None = None  # the first op refused with 401/403, and why

    @property
    def unsent_reports(self) -> int:
        with self._cond:
            return self.dropped_reports + sum(op.reports for op in self._ops)

    @property
    def server_down(self) -> bool:
        """A request failed as if the server were down, or the local server keeps failing to start."""
        return self._down_since is not None or tracking.failing_reason(self.writer.tracking_uri) is not None

    def submit(self, do: Callable[[RunWriter], Any], what: str, reports: int = 0, key: Hashable | None = None,
               data: Any = None) -> None:
        """Queue `do`; `key`/`data`: a keyed op (metric rows) may be dropped when too many wait, or taken by
        a later op that sends its `data` with its own (one request instead of two)."""
        with self._cond:
            if self._closed:
                self.dropped_reports += reports
                return
            self._ops.append(_Op(do, what, reports, key, data))
            if len(self._ops) > self.max_pending:
                victim = next((op for op in self._ops if op.reports and op.key is not None), None)
                if victim is not None:
                    self._ops.remove(victim)
                    self.dropped_reports += victim.reports
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fwsweep-mlflow-writer", daemon=True)
            self._thread.start()

    def take(self, key: Hashable) -> list[Any]:
        """Remove the waiting ops submitted with `key` (not one that has started) and return their data, in
        order: the caller sends it with the op it submits next, which then carries their reports."""
        with self._cond:
            started = self._ops[0] if self._busy and self._ops else None
            taken = [op for op in self._ops if op.key == key and op is not started]
            for op in taken:
                self._ops.remove(op)
            return [op.data for op in taken]

    def drain(self, timeout_s: float) -> bool:
        """Wait until every op ran (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._ops or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float) -> int:
        """Drain (up to `timeout_s`; 2 s when the server is down), stop the thread; the reports not sent."""
        self.drain(min(timeout_s, 2.0) if self.server_down else timeout_s)
        with self._cond:
            self._closed = True
            self.dropped_reports += sum(op.reports for op in self._ops)
            self._ops.clear()
            self._cond.notify_all()
        return self.dropped_reports

    def settled(self) -> RunWriter | None:
        """After `close`: the RunWriter, when no op of it is still running (then another thread may use it,
        with what it learned of the runs' steps); else None."""
        with self._cond:
            return self.writer if self._closed and not self._busy else None

    def _loop(self) -> None:
        backoff = self.retry_after_s
        while True:
            with self._cond:
                while not self._ops and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                op = self._ops[0]
                self._busy = True
            if not _server_ready(self.writer.tracking_uri, backoff):  # a local server (re)booting: wait
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                continue
            try:
                op.do(self.writer)
            except Exception as err:  # noqa: BLE001 - a logging failure must never reach the sweep
                if is_transient(err):
                    tracking.suspect(self.writer.tracking_uri)  # its watchdog (if ours) probes now
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        log.warning("MLflow at %s is not answering (%s); results wait in memory and "
                                    "`sweep sync` completes MLflow from the sweep's records",
                                    self.writer.tracking_uri, str(err).splitlines()[0][:200])
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
                        self._cond.wait(backoff)
                    backoff = min(backoff * 2, self.max_retry_after_s)
                    continue
                status = refusal_status(err)
                if status is None:
                    log.warning("MLflow rejected %s; skipped: %s", op.what, str(err).splitlines()[0][:300])
                elif self.refused is None:  # the sweep's callback stops the sweep with this (exit 2)
                    self.refused = f"HTTP {status} for {op.what}: {said(err)}"
            if self._down_since is not None:
                log.warning("MLflow at %s answers again", self.writer.tracking_uri)
                self._down_since = None
            backoff = self.retry_after_s
            with self._cond:
                if self._ops and self._ops[0] is op:
                    self._ops.popleft()
                    self.sent_reports += op.reports
                self._busy = False
                self._cond.notify_all()


def _server_ready(url: str, timeout_s: float) -> bool:
    """False while fwsweep's local server at `url` boots or is restarted (after waiting up to timeout_s)."""
    return tracking.is_ready(url) or tracking.wait_ready(url, timeout_s)


def rows_of(history: Iterable[Mapping[str, Any]]) -> list[Row]:
    """Tune result rows -> metric rows (step, values, timestamp), first report of a step kept."""
    from sweep.mlflow_runs.content import metric_step, metric_values

    rows: dict[int, Row] = {}
    for row in history:
        step = metric_step(row)
        ts = row.get("timestamp")
        ms = int(ts * 1000) if isinstance(ts, int | float) else None
        rows.setdefault(step, (step, metric_values(row), ms))
    return [rows[s] for s in sorted(rows)]

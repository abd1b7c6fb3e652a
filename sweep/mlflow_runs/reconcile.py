"""`sweep sync`: bring a sweep's MLflow runs level with its own records (Tune's trials in its storage).

The sweep's records are the truth; MLflow is a view of them. Idempotent: run it any number of times.
- one parent run per sweep (found by tags; extra parents from older versions are merged into the oldest);
- one child run per Tune trial: created when missing, duplicates and runs of trials Tune never saved
  (a driver killed between MLflow and Tune's state snapshot) go to MLflow's trash;
- every result row of a trial at its step, once: missing steps are backfilled, none is logged twice;
- params only where absent; `config.yaml` (byte for byte what `sweep export` writes for the trial),
  `error.txt` of a failed trial, the parent's `spec.yaml` and exports: uploaded when changed;
- statuses as Tune has them: ended trials FINISHED/FAILED, cut-off ones KILLED, no stale RUNNING;
- the summary (counts, best trial overall and per model) from `sweep.outcome`, as parent tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sweep import events, outcome
from sweep.config import SweepSpec, dump_yaml
from sweep.errors import UserError
from sweep.mlflow_runs import content, identity
from sweep.mlflow_runs.content import CONFIG_SHA_TAG, ERROR_SHA_TAG, EXPORTS_SHA_TAG, SPEC_SHA_TAG
from sweep.mlflow_runs.writer import RunWriter, rows_of, sha
from sweep.space import trial_config
from sweep.store import ERROR_FILE, EXPORT_DIR, SweepStore


@dataclass
class SyncReport:
    """What one reconcile changed (all zero on a second run) and where the parent run is."""

    experiment_id: str
    parent_run_id: str
    trials: int = 0
    runs_created: int = 0
    rows_backfilled: int = 0
    runs_closed: int = 0
    runs_trashed: int = 0
    uploads: int = 0
    url: str | None = None

    @property
    def changed(self) -> int:
        return self.runs_created + self.rows_backfilled + self.runs_closed + self.runs_trashed + self.uploads


def error_text(store: SweepStore, trial_id: str) -> str | None:
    """The latest failure Tune wrote for a trial (its folder's error.txt), if any."""
    try:
        return store.read_text(f"trial_{trial_id}/{ERROR_FILE}")
    except (OSError, UserError, UnicodeDecodeError):
        return None


def export_files(store: SweepStore) -> dict[str, str]:
    """The sweep's exported configs and index (name -> text), as `sweep export` wrote them."""
    index = store.export_index()
    if not index:
        return {}
    names = [e["file"] for e in index.get("exports", []) if "file" in e] + ["index.json"]
    texts = {n: store.read_text(f"{EXPORT_DIR}/{n}") for n in dict.fromkeys(names)}
    return {n: t for n, t in texts.items() if t is not None}


def sweep_status(spec: SweepSpec, records: list[Any]) -> str:
    """FINISHED when every trial ended and the budget is spent, else KILLED (interrupted)."""
    ended = all(r.state(spec.max_epochs) in events.FINISHED_STATES for r in records)
    return "FINISHED" if records and ended and outcome.budget_spent(spec, records) else "KILLED"


def sync_sweep(store: SweepStore, tracking_uri: str, *, spec: SweepSpec | None = None,
               records: list[Any] | None = None, writer: RunWriter | None = None,
               git: tuple[str | None, bool] = (None, False),
               extra_tags: dict[str, str] | None = None) -> SyncReport:
    """Make sweep `name`'s MLflow runs match its records (see the module docstring). Raises what the
    client raises (`writer.is_transient` tells a server that does not answer from a refusal)."""
    spec = spec or store.load_spec()
    records = store.load_trials(spec) if records is None else records
    w = writer or RunWriter(tracking_uri)
    extra = dict(extra_tags or {})
    exp_id = identity.experiment_id(w.client, spec.experiment, content.sweep_description(spec))
    found = identity.sweep_runs(w.client, exp_id, spec.name)
    report = SyncReport(exp_id, "", trials=len(records))
    parent = _one_parent(w, exp_id, spec, found, report, git, extra, records)
    report.parent_run_id = parent.info.run_id
    known = {r.trial_id for r in records}
    for tid, runs in found.trials.items():  # runs of trials Tune never saved: not results
        if tid not in known:
            for run in runs:
                w.delete_run(run.info.run_id)
                report.runs_trashed += 1
    for record in records:
        _sync_trial(w, store, spec, record, found.trials.get(record.trial_id, []), parent.info.run_id, exp_id,
                    report, git, extra)
    _sync_parent(w, store, spec, records, parent, report)
    report.url = identity.run_url(tracking_uri, exp_id, parent.info.run_id)
    return report


def _one_parent(w: RunWriter, exp_id: str, spec: SweepSpec, found: identity.SweepRuns, report: SyncReport,
                git: tuple[str | None, bool], extra: dict[str, str], records: list[Any]) -> Any:
    if found.parent is None:
        run_id = w.create_run(exp_id, spec.name, content.parent_tags(spec, git) | extra,
                              start_time=_span(records)[0])
        w.log_params(run_id, content.parent_params(spec))
        report.runs_created += 1
        return w.client.get_run(run_id)
    keep = found.parent
    for extra_parent in found.parents[1:]:  # an older fwsweep made one per resume: merge into the oldest
        for runs in found.trials.values():
            for run in runs:
                if run.data.tags.get(identity.PARENT_RUN_TAG) == extra_parent.info.run_id:
                    w.set_tags(run.info.run_id, {identity.PARENT_RUN_TAG: keep.info.run_id})
        w.delete_run(extra_parent.info.run_id)
        report.runs_trashed += 1
    return keep


def _sync_trial(w: RunWriter, store: SweepStore, spec: SweepSpec, record: Any, runs: list[Any],
                parent_id: str, exp_id: str, report: SyncReport, git: tuple[str | None, bool],
                extra: dict[str, str]) -> None:
    from sweep import export

    tid = record.trial_id
    history = _rows(record)
    start, end_time = content.trial_times(history)
    if runs:
        run = max(runs, key=lambda r: (len(r.data.metrics), -(r.info.start_time or 0)))  # the fullest
        for other in runs:
            if other is not run:
                w.delete_run(other.info.run_id)
                report.runs_trashed += 1
    else:
        run_id = w.create_run(exp_id, content.trial_run_name(record.model, tid),
                              content.trial_tags(spec, tid, record.model, git) | extra, parent_id=parent_id,
                              start_time=start)
        report.runs_created += 1
        run = w.client.get_run(run_id)
    w.know(run)
    run_id, tags = run.info.run_id, run.data.tags
    sampled_config = trial_config(spec, dict(record.params)).to_dict()  # as the live callback logs it
    constants = next((c for c in map(content.constant_params, reversed(history)) if c), {})
    w.log_params(run_id, content.trial_params(sampled_config) | constants, run.data.params)
    report.rows_backfilled += w.log_rows(run_id, rows_of(history))
    how = record.state(spec.max_epochs)
    sampled = {k: v for k, v in record.params.items() if k != "model"}
    end = {identity.PARENT_RUN_TAG: parent_id, "state": how, "end_reason": content.end_reason(how),
           "stopped_early": str(how == events.STOPPED_EARLY).lower(),
           identity.NOTE_TAG: content.trial_description(spec, record.model, sampled, how, record.epochs)}
    config = export.config_text(spec.name, record, spec.metric.name)
    if tags.get(CONFIG_SHA_TAG) != sha(config):
        w.upload_text(run_id, config, "config.yaml")
        end[CONFIG_SHA_TAG] = sha(config)
        report.uploads += 1
    error = error_text(store, tid) if how == events.FAILED else None
    if how == events.DIVERGED:
        error = (f"TrialDiverged: the training loss became {record.metrics.get('train_loss')} at epoch "
                 f"{record.epochs}; lower train.lr or set train.grad_clip\n")
    if error:
        end["error"] = content.last_line(error)
        if tags.get(ERROR_SHA_TAG) != sha(error):
            w.upload_text(run_id, error, "error.txt")
            end[ERROR_SHA_TAG] = sha(error)
            report.uploads += 1
    elif "error" in tags:  # failed in an earlier session, then resumed and ended well
        end["previous_error"] = tags["error"]
        w.delete_tag(run_id, "error")
    w.set_tags(run_id, end, tags)
    status = content.run_status(how)
    if run.info.status != status:
        if end_time is not None and run.info.start_time:  # Tune's timestamps are whole seconds
            end_time = max(end_time, run.info.start_time)
        w.set_status(run, status, end_time=end_time)
        report.runs_closed += 1


def _sync_parent(w: RunWriter, store: SweepStore, spec: SweepSpec, records: list[Any], parent: Any,
                 report: SyncReport) -> None:
    w.know(parent)
    run_id, tags = parent.info.run_id, parent.data.tags
    w.log_params(run_id, content.parent_params(spec), parent.data.params)
    summary = outcome.summarize(records, spec.metric.name, spec.metric.mode, spec.max_epochs)
    new = content.summary_tags(summary, spec)
    spec_yaml = dump_yaml(spec.model_dump(mode="json"))
    if tags.get(SPEC_SHA_TAG) != sha(spec_yaml):
        w.upload_text(run_id, spec_yaml, "spec.yaml")
        new[SPEC_SHA_TAG] = sha(spec_yaml)
        report.uploads += 1
    exports = export_files(store)
    digest = sha("".join(n + t for n, t in sorted(exports.items()))) if exports else None
    if digest and tags.get(EXPORTS_SHA_TAG) != digest:
        for file_name, text in exports.items():
            w.upload_text(run_id, text, f"{EXPORT_DIR}/{file_name}")
        new[EXPORTS_SHA_TAG] = digest
        report.uploads += 1
    w.set_tags(run_id, new, tags)
    status = sweep_status(spec, records)
    if parent.info.status != status:
        w.set_status(parent, status, end_time=_span(records)[1])
        report.runs_closed += 1


def _rows(record: Any) -> list[dict[str, Any]]:
    """A trial's result rows: its history, or its last report alone."""
    return record.history or ([record.metrics] if record.metrics else [])


def _span(records: list[Any]) -> tuple[int | None, int | None]:
    """(first start, last end) of the trials, in ms: the sweep's run as its records date it."""
    times = [content.trial_times(_rows(r)) for r in records]
    starts, ends = [s for s, _ in times if s is not None], [e for _, e in times if e is not None]
    return (min(starts) if starts else None), (max(ends) if ends else None)


def missing_rows(records: list[Any]) -> int:
    """How many result rows the records hold (what MLflow lacks when it could not be reached at all)."""
    return sum(len(rows_of(r.history)) for r in records)


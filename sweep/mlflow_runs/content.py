"""What goes into a sweep's MLflow runs: which reported values are metrics, at which step, and the
params, tags and descriptions a person reads in the MLflow UI.

- Metrics are what is worth a chart: losses, accuracies, throughput. Constants (`num_params`,
  `diverged`) and Tune's bookkeeping are not metrics: `num_params` is a param, the outcome a tag.
- The MLflow step is the trial's optimizer step (`step` in its reports), so curves of different models
  and batch sizes line up; there is no metric named `step`. Reports without `step` use the epoch.
- The parent run shows the search space as written (`space.lr = loguniform(0.002, 0.01)`) and only the
  fixed settings every trial really used; the spec's `train.epochs` becomes `budget.max_epochs`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sweep
from sweep import events
from sweep.config import Distribution, SweepSpec
from sweep.mlflow_runs.identity import NOTE_TAG, PARENT_ROLE, ROLE_TAG, SWEEP_TAG, TRIAL_ROLE, TRIAL_TAG

# Tune's bookkeeping and a trial's constants: in every report, never worth a chart.
NOT_METRICS = frozenset({
    "done", "trial_id", "experiment_id", "date", "timestamp", "pid", "hostname", "node_ip", "node_id",
    "gpu_ids", "config", "time_this_iter_s", "time_since_restore", "iterations_since_restore",
    "training_iteration", "time_total_s", "checkpoint_dir_name", "should_checkpoint", "experiment_tag",
    "epoch", "step", "num_params", "diverged", "best_val_accuracy", "elapsed_s",
})
CONSTANT_PARAMS = ("num_params",)  # reported by every epoch, the same each time: logged once, as a param
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 5000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
SCHEDULER_WORDS = {"asha": "ASHA", "hyperband": "HyperBand", "median": "the median stopping rule",
                   "fifo": "the scheduler"}

# Digests of what a run's artifacts were made from: an upload is skipped when its digest is unchanged.
CONFIG_SHA_TAG = "fwsweep.config_sha"
SPEC_SHA_TAG = "fwsweep.spec_sha"
EXPORTS_SHA_TAG = "fwsweep.exports_sha"
ERROR_SHA_TAG = "fwsweep.error_sha"


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


def key(name: str) -> str:
    """A name MLflow accepts as a metric/param/tag key."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:250]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params are strings of at most 6000 characters (a longer one fails the whole batch)."""
    out = {}
    for k, v in flat.items():
        if v is None:
            continue
        text = ", ".join(map(str, v)) if isinstance(v, list | tuple) else (
            json.dumps(v) if isinstance(v, dict) else str(v))
        out[key(k)] = text[:MAX_PARAM_VALUE]
    return out


def metric_step(row: Mapping[str, Any]) -> int:
    """The MLflow step of one report: optimizer steps, else the epoch."""
    step = row.get("step")
    if is_number(step):
        return int(step)
    return int(row.get("epoch", row.get("training_iteration", 0)) or 0)


def metric_values(row: Mapping[str, Any]) -> dict[str, float]:
    """The chart-worthy numbers of one report (nested dicts flattened with dots)."""
    flat = flatten({k: v for k, v in row.items() if k not in NOT_METRICS})
    return {key(k): float(v) for k, v in flat.items() if is_number(v)}


def constant_params(row: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(row[k]) for k in CONSTANT_PARAMS if is_number(row.get(k))}


# ---------------------------------------------------------------------------------------------- parent


def describe_distribution(dist: Distribution) -> str:
    """loguniform(0.002, 0.01), choice(20, 50, 100), int(1, 3) step 1."""
    args = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in dist.values())
    return f"{dist.kind}({args})" + (f" step {dist.step:g}" if dist.step else "")


def searched_fields(spec: SweepSpec) -> set[str]:
    return {name for section in spec.space.values() for name, v in section.items()
            if isinstance(v, Distribution)}


def parent_params(spec: SweepSpec) -> dict[str, str]:
    """The search space, readably, and the fixed settings every trial used (no unused defaults)."""
    searched = searched_fields(spec)
    data = spec.model_dump(mode="json")
    params: dict[str, Any] = {"models": spec.models, "metric": f"{spec.metric.name} ({spec.metric.mode})"}
    for section, entries in spec.space.items():
        for name, v in entries.items():
            prefix = "space" if section == "common" else f"space.{section}"
            params[f"{prefix}.{name}"] = describe_distribution(v) if isinstance(v, Distribution) else v
    params |= flatten(data["task"], "task.")
    params |= {k: v for k, v in flatten(data["train"], "train.").items()
               if k.removeprefix("train.") not in searched and k != "train.epochs"}
    budget = dict(data["budget"], max_epochs=spec.max_epochs)
    for section, values in (("budget", budget), ("searcher", data["searcher"]),
                            ("scheduler", data["scheduler"]), ("resources", data["resources"]),
                            ("retries", data["retries"])):
        params |= flatten(values, f"{section}.")
    if spec.scheduler.name == "fifo":
        params = {k: v for k, v in params.items() if not k.startswith("scheduler.") or k == "scheduler.name"}
    return as_params(params)


def git_commit(cwd: str | Path | None = None) -> tuple[str | None, bool]:
    """(commit, dirty) of the working tree a command is launched from; (None, False) outside git."""
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


def common_tags(spec: SweepSpec, git: tuple[str | None, bool] = (None, False)) -> dict[str, str]:
    commit, dirty = git
    tags = {SWEEP_TAG: spec.name, "fwsweep_version": sweep.__version__, "task": spec.task.name,
            "difficulty": spec.task.difficulty, "searcher": f"{spec.searcher.name}/{spec.searcher.sampler}",
            "scheduler": spec.scheduler.name}
    if commit:
        tags |= {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}
    return tags


def sweep_description(spec: SweepSpec) -> str:
    own = f"{spec.description.strip()}\n\n" if spec.description.strip() else ""
    return (f"{own}fwsweep sweep `{spec.name}`: {', '.join(spec.models)} on {spec.task.difficulty}, "
            f"{spec.budget_text()}, "
            f"{spec.searcher.name}/{spec.searcher.sampler} + {spec.scheduler.name}, "
            f"best by {spec.metric.name} ({spec.metric.mode}). Child runs: one per trial.")


def parent_tags(spec: SweepSpec, git: tuple[str | None, bool] = (None, False)) -> dict[str, str]:
    return common_tags(spec, git) | {ROLE_TAG: PARENT_ROLE, "models": ", ".join(spec.models),
                                     NOTE_TAG: sweep_description(spec)}


def summary_tags(summary: Any, spec: SweepSpec) -> dict[str, str]:
    """sweep.outcome.Summary -> the parent's tags: counts, best trial, best per model."""
    metric = spec.metric.name
    tags = {f"trials.{k.replace(' ', '_')}": str(v) for k, v in summary.counts.items()}
    tags["trials.total"] = str(summary.total)
    if summary.best is not None:
        best = summary.best
        tags |= {"best_trial_id": best.trial_id, f"best.{metric}": f"{best.value(metric):.6g}",
                 "best.model": best.model}
    for model, record in summary.best_per_model.items():
        tags[f"best.{model}"] = f"{metric} {record.value(metric):.6g} (trial {record.trial_id})"
    return tags


# ---------------------------------------------------------------------------------------------- trial


def trial_run_name(model: str, trial_id: str) -> str:
    return f"{model}-{trial_id}"


def trial_tags(spec: SweepSpec, trial_id: str, model: str,
               git: tuple[str | None, bool] = (None, False)) -> dict[str, str]:
    return common_tags(spec, git) | {ROLE_TAG: TRIAL_ROLE, TRIAL_TAG: trial_id, "model": model}


def trial_params(config: Mapping[str, Any]) -> dict[str, str]:
    """A trial's TrialConfig (as a dict), flattened: model.*, task.*, train.*."""
    return as_params(flatten(config))


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def searched_names(spec: SweepSpec) -> set[str]:
    """The Tune/Optuna names of the searched parameters (`lr`, `fw_lstm.fast_lr`)."""
    from sweep.space import param_name

    return {param_name(section, name) for section, entries in spec.space.items()
            for name, v in entries.items() if isinstance(v, Distribution)}


def trial_description(spec: SweepSpec, model: str, sampled: Mapping[str, Any], how: str, epochs: int) -> str:
    """'fw_lstm · lr 0.0025 · stopped by ASHA after epoch 3' (the searched parameters only)."""
    searched = searched_names(spec)
    parts = [model] + [f"{k.rpartition('.')[2]} {_short(v)}" for k, v in sampled.items() if k in searched]
    ending = {
        events.DONE: f"finished after epoch {epochs}",
        events.STOPPED_EARLY: f"stopped by {SCHEDULER_WORDS.get(spec.scheduler.name, 'the scheduler')} "
                              f"after epoch {epochs}",
        events.DIVERGED: f"diverged at epoch {epochs}",
        events.FAILED: f"failed at epoch {epochs}" if epochs else "failed before its first epoch",
        events.PENDING: "not started",
    }.get(how, f"cut off after epoch {epochs}" if epochs else "cut off before its first epoch")
    return " · ".join(parts + [ending])


END_REASONS = {events.DONE: "completed", events.STOPPED_EARLY: "stopped early by the scheduler",
               events.DIVERGED: "diverged", events.FAILED: "failed", events.PENDING: "not started"}
CUT_OFF = "the sweep stopped before this trial ended"
RUN_STATUS = {events.DONE: "FINISHED", events.STOPPED_EARLY: "FINISHED", events.DIVERGED: "FAILED",
              events.FAILED: "FAILED"}  # any other state: KILLED (the sweep stopped before it ended)


def now_ms() -> int:
    return int(time.time() * 1000)


def trial_times(rows: Sequence[Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """(start, end) of a trial in ms since the epoch, from its Tune result rows: its first report's time
    less the training time it had by then, and its last report's time. A run made from the records (after
    an outage, by `sweep sync`) then shows when the trial ran and for how long, not when it was synced."""
    timed = [r for r in rows if is_number(r.get("timestamp"))]
    if not timed:
        return None, None
    first, last = timed[0], timed[-1]
    before = first.get("time_total_s", first.get("time_this_iter_s", 0.0))
    start = float(first["timestamp"]) - (float(before) if is_number(before) else 0.0)
    return int(start * 1000), int(float(last["timestamp"]) * 1000)


def end_reason(state: str) -> str:
    return END_REASONS.get(state, CUT_OFF)


def run_status(state: str) -> str:
    return RUN_STATUS.get(state, "KILLED")


def last_line(text: str) -> str:
    """The exception line of a traceback: what a person scanning the runs table needs."""
    line = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "unknown error")
    return line.strip()[:MAX_TAG_VALUE]

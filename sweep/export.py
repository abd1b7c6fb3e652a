"""A finished (or interrupted) sweep on disk -> its trials -> the best ones as re-runnable TrialConfig files.

Trials are read from Tune's own experiment state (ExperimentAnalysis) and each trial's result.json.
An exported config is the trial's exact config, with `train.epochs` set to the epochs the trial really ran
(an early-stopped trial re-runs to where it was stopped) and the torch threads it used, so
`sweep train --config EXPORTED.yaml` reproduces its validation accuracy with the same seed and device.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep import paths
from sweep.config import SweepSpec, TrialConfig, dump_yaml
from sweep.errors import Problem, UserError
from sweep.space import MODEL_KEY, trial_config

EXPORT_DIR = "exports"


@dataclass
class TrialRecord:
    trial_id: str
    model: str
    config: TrialConfig  # what to re-run: see the module docstring
    metrics: dict[str, Any]  # the last report
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch
    status: str = "PENDING"  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    params: dict[str, Any] = field(default_factory=dict)  # the sampled Tune config

    @property
    def epochs(self) -> int:
        return int(self.metrics.get("epoch", self.metrics.get("training_iteration", 0)) or 0)

    def value(self, metric: str) -> float | None:
        v = self.metrics.get(metric)
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    def stopped_early(self, max_epochs: int) -> bool:
        """Stopped by the scheduler before max epochs (not by the target accuracy, not failed)."""
        return (self.status == "TERMINATED" and 0 < self.epochs < max_epochs
                and not self.metrics.get("target_reached") and not self.metrics.get("diverged"))


def _read_history(trial_dir: Path) -> list[dict[str, Any]]:
    result = trial_dir / "result.json"
    if not result.exists():
        return []
    rows = []
    for line in result.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: everything before it is valid
    return rows


def load_spec_of(name: str) -> SweepSpec:
    from sweep.runner import saved_spec

    spec = saved_spec(name)
    if spec is None:
        raise UserError(Problem(name, f"no sweep named {name!r} in {paths.sweeps_dir()}",
                                "see `sweep list` for the sweeps on disk (or set FWSWEEP_HOME)"))
    return spec


def load_trials(name: str) -> list[TrialRecord]:
    """Every trial Tune knows for sweep `name`, from its experiment state on disk."""
    from ray.tune import ExperimentAnalysis

    from sweep.runner import trial_threads

    spec = load_spec_of(name)
    folder = paths.sweep_dir(name)
    try:
        analysis = ExperimentAnalysis(str(folder))
    except (ValueError, FileNotFoundError):
        return []  # started, but interrupted before Tune saved any state
    records = []
    for trial in analysis.trials:
        history = _read_history(Path(trial.storage.trial_fs_path))
        metrics = dict(trial.last_result or {}) or (history[-1] if history else {})
        config = dict(trial.config)
        tc = trial_config(spec, config)
        epochs = int(metrics.get("epoch", metrics.get("training_iteration", 0)) or 0)
        train = {"num_threads": trial_threads(spec, tc)} | ({"epochs": epochs} if epochs else {})
        tc = tc.model_copy(update={"train": tc.train.model_copy(update=train)})
        records.append(TrialRecord(trial_id=trial.trial_id, model=config.get(MODEL_KEY, tc.model.name),
                                   config=tc, metrics=metrics, history=history, status=trial.status,
                                   params=config))
    return records


def best_trials(records: list[TrialRecord], metric: str, mode: str, k: int = 1,
                per_model: bool = False) -> list[TrialRecord]:
    """The k best trials by their last reported `metric` (the value the trial ended with, re-runnable);
    with per_model, the k best of each model."""
    scored = [r for r in records if r.value(metric) is not None and r.status != "ERROR"
              and not r.metrics.get("diverged")]  # a NaN model's accuracy is not a result to re-run
    scored.sort(key=lambda r: r.value(metric), reverse=(mode == "max"))
    if not per_model:
        return scored[:k]
    out: list[TrialRecord] = []
    for model in sorted({r.model for r in scored}):
        out += [r for r in scored if r.model == model][:k]
    return out


def _header(name: str, record: TrialRecord, metric: str, rank: str) -> str:
    value = record.value(metric)
    lines = [
        f"fwsweep export: {rank} of sweep {name!r}",
        f"trial {record.trial_id} ({record.model}): {metric} = {value:.6g} after {record.epochs} epoch(s)",
        "re-run: sweep train --config THIS_FILE",
    ]
    return "".join(f"# {line}\n" for line in lines)


def write_exports(name: str, *, records: list[TrialRecord] | None = None, top_k: int = 1,
                  per_model: bool = False, fmt: str = "yaml", out: Path | None = None) -> list[Path]:
    """Write best.<fmt>, top<i>.<fmt> (k > 1) and best_<model>.<fmt> (per_model); return the paths."""
    if fmt not in ("yaml", "json"):
        raise UserError(Problem("--format", f"{fmt!r} is not a format", "use yaml or json"))
    if top_k < 1:
        raise UserError(Problem("--top-k", f"{top_k} must be >= 1", "give a positive number"))
    spec = load_spec_of(name)
    records = load_trials(name) if records is None else records
    metric, mode = spec.metric.name, spec.metric.mode
    ranked = best_trials(records, metric, mode, k=top_k)
    if not ranked:
        raise UserError(Problem(name, f"no trial of this sweep reported {metric} yet",
                                f"let it run (`sweep resume {name}`) before exporting"))
    out = Path(out) if out else paths.sweep_dir(name) / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, str, TrialRecord]] = [("best", "best trial", ranked[0])]
    if top_k > 1:
        files += [(f"top{i}", f"#{i} trial", r) for i, r in enumerate(ranked, start=1)]
    if per_model:
        files += [(f"best_{r.model}", f"best {r.model} trial", r)
                  for r in best_trials(records, metric, mode, k=1, per_model=True)]
    written = []
    for stem, rank, record in files:
        path = out / f"{stem}.{fmt}"
        data = record.config.to_dict()
        if fmt == "yaml":
            text = _header(name, record, metric, rank) + dump_yaml(data)
        else:  # JSON has no comments: the provenance goes to index.json
            text = json.dumps(data, indent=2) + "\n"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    index = [{"file": p.name, "trial_id": r.trial_id, "model": r.model, metric: r.value(metric),
              "epochs": r.epochs} for p, (_, _, r) in zip(written, files, strict=True)]
    (out / "index.json").write_text(json.dumps({"sweep": name, "metric": metric, "mode": mode,
                                                "exports": index}, indent=2) + "\n", encoding="utf-8")
    return written

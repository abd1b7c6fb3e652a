"""A finished (or interrupted) sweep on disk -> its trials -> the best ones as re-runnable TrialConfig files.

Trials are read from Tune's own experiment state (ExperimentAnalysis) and each trial's result.json.
An exported config is the trial's exact config, with `train.epochs` set to the epochs the trial really ran
(an early-stopped trial re-runs to where it was stopped) and the torch threads it used, so
`sweep train --config EXPORTED.yaml` reproduces its validation accuracy with the same seed and device.
"""

from __future__ import annotations

import json
from pathlib import Path

from sweep import outcome, paths
from sweep.config import SweepSpec, dump_yaml
from sweep.errors import Problem, UserError
from sweep.files import write_atomic
from sweep.store import EXPORT_DIR, TrialRecord, open_sweep

__all__ = ["EXPORT_DIR", "TrialRecord", "best_trials", "load_spec_of", "load_trials", "write_exports"]


def load_spec_of(name: str, storage: str | None = None) -> SweepSpec:
    """The spec sweep `name` was started with (UserError naming the storage when there is none)."""
    return open_sweep(name, storage).load_spec()


def load_trials(name: str, storage: str | None = None) -> list[TrialRecord]:
    """Every trial Tune knows for sweep `name` (see sweep.store.SweepStore.load_trials)."""
    return open_sweep(name, storage).load_trials()


best_trials = outcome.best_trials  # the one definition of "best" (sweep.outcome)


def _header(name: str, record: TrialRecord, metric: str) -> str:
    value = record.value(metric)
    shown = "none" if value is None else f"{value:.6g}"
    lines = [
        f"fwsweep export: trial {record.trial_id} ({record.model}) of sweep {name!r}",
        f"{metric} = {shown} after {record.epochs} epoch(s)",
        "re-run: sweep train --config THIS_FILE",
    ]
    return "".join(f"# {line}\n" for line in lines)


def config_text(name: str, record: TrialRecord, metric: str, fmt: str = "yaml") -> str:
    """A trial's exported config file, byte for byte (also its MLflow run's `config.yaml` artifact)."""
    data = record.config.to_dict()
    if fmt == "yaml":
        return _header(name, record, metric) + dump_yaml(data)
    return json.dumps(data, indent=2) + "\n"  # JSON has no comments: the provenance goes to index.json


def write_exports(name: str, *, records: list[TrialRecord] | None = None, top_k: int = 1,
                  per_model: bool = False, fmt: str = "yaml", out: Path | None = None,
                  storage: str | None = None) -> list[Path]:
    """Write best.<fmt>, top<i>.<fmt> (k > 1) and best_<model>.<fmt> (per_model); return the local paths.

    Without `out` they go to the sweep's exports/ folder; a sweep in object storage gets them there too,
    and a local copy in $FWSWEEP_HOME/exports/NAME for `sweep train --config` to read.
    """
    if fmt not in ("yaml", "json"):
        raise UserError(Problem("--format", f"{fmt!r} is not a format", "use yaml or json"))
    if top_k < 1:
        raise UserError(Problem("--top-k", f"{top_k} must be >= 1", "give a positive number"))
    store = open_sweep(name, storage)
    spec = store.load_spec()
    records = store.load_trials(spec) if records is None else records
    metric, mode = spec.metric.name, spec.metric.mode
    ranked = best_trials(records, metric, mode, k=top_k)
    if not ranked:
        raise UserError(Problem(name, f"no trial of this sweep reported {metric} yet",
                                f"let it run (`sweep resume {name}`) before exporting"))
    in_store = out is None
    local = store.local_path()
    out = Path(out) if out else local / EXPORT_DIR if local else paths.home() / EXPORT_DIR / name
    files: list[tuple[str, TrialRecord]] = [("best", ranked[0])]
    if top_k > 1:
        files += [(f"top{i}", r) for i, r in enumerate(ranked, start=1)]
    if per_model:
        files += [(f"best_{r.model}", r) for r in best_trials(records, metric, mode, k=1, per_model=True)]
    written = [out / f"{stem}.{fmt}" for stem, _ in files]
    index = [{"file": p.name, "trial_id": r.trial_id, "model": r.model, metric: r.value(metric),
              "epochs": r.epochs} for p, (_, r) in zip(written, files, strict=True)]
    texts = {p: config_text(name, r, metric, fmt) for p, (_, r) in zip(written, files, strict=True)}
    texts[out / "index.json"] = json.dumps({"sweep": name, "metric": metric, "mode": mode, "exports": index},
                                           indent=2) + "\n"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, text in texts.items():
            write_atomic(path, text)
    except OSError as err:
        raise UserError(Problem("--out" if not in_store else str(out),
                                f"cannot write the exports to {out} ({err.strerror or err})",
                                "choose a folder you can write to" if not in_store else
                                "make the sweep's folder writable, or give --out a folder you can write to"
                                )) from None
    if in_store:
        store.upload(out, EXPORT_DIR)
    return written

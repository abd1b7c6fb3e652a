"""Render a multi-seed comparison: tables (Markdown, CSV), learning curves, a difficulty plot, provenance.

Input is a list of `SeedRun`s (one retraining of a tuned config with one seed) plus a provenance mapping;
output is a folder of files. Knows nothing of Ray; `sweep.compare` gathers the runs and logs the folder
to MLflow.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sweep.stats import compare_samples, first_reach, holm, mean_band, mean_ci

REPORT_MD = "report.md"
SUMMARY_CSV = "summary.csv"
SEEDS_CSV = "seed_runs.csv"
PAIRWISE_CSV = "pairwise.csv"
DIFFICULTY_PNG = "difficulty.png"
REPRODUCE_YAML = "reproduce.yaml"


@dataclass
class SeedRun:
    """One seed's retraining of the best config of one model at one difficulty."""

    model: str
    task: str
    pairs: int
    seed: int
    status: str
    history: list[dict[str, Any]]  # one dict per evaluation: step, val_accuracy, elapsed_s, ...
    final: dict[str, Any]  # the last report: test_accuracy, test_error, num_params, ...
    run_id: str | None = None

    @property
    def difficulty(self) -> str:
        return f"{self.task}-K{self.pairs}"

    @property
    def test_error_pct(self) -> float:
        """Test error in percent, as the papers print it (from test_accuracy, the unambiguous metric)."""
        acc = self.final.get("test_accuracy")
        if acc is not None:
            return 100.0 * (1.0 - float(acc))
        err = self.final.get("test_error")
        return math.nan if err is None else 100.0 * float(err)

    @property
    def num_params(self) -> int | None:
        for row in [self.final, *reversed(self.history)]:
            if row.get("num_params") is not None:
                return int(row["num_params"])
        return None


@dataclass
class Reach:
    """Steps and wall time to a validation accuracy, over the seeds that reached it."""

    threshold: float
    steps: float  # mean over the seeds that reached it; NaN if none did
    seconds: float
    reached: int
    n: int


@dataclass
class ModelRow:
    """One line of a difficulty's table."""

    task: str
    pairs: int
    model: str
    num_params: int | None
    n: int
    error_mean: float
    error_ci: float
    error_std: float
    reach: list[Reach] = field(default_factory=list)
    steps: int | None = None  # what the seed runs trained: the level's step budget
    best: bool = False
    p_value: float = math.nan
    p_holm: float = math.nan
    significant: bool | None = None
    failed: int = 0  # seeds without a test error (diverged): left out of the mean, shown in the table


def steps_to_reach(runs: Sequence[SeedRun], threshold: float) -> Reach:
    hits = [first_reach(r.history, threshold) for r in runs]
    got = [h for h in hits if h is not None]
    steps = [float(h["step"]) for h in got if h.get("step") is not None]
    secs = [float(h["elapsed_s"]) for h in got if h.get("elapsed_s") is not None]
    return Reach(threshold, _mean(steps), _mean(secs), len(got), len(runs))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def trained_steps(runs: Sequence[SeedRun]) -> int | None:
    """The optimizer steps a level's seed runs trained (the longest run's last evaluation): a comparison
    may give its levels different budgets, and a reader must see which numbers came from which."""
    steps = [row["step"] for r in runs for row in r.history if row.get("step") is not None]
    return int(max(steps)) if steps else None


def level_title(task: str, pairs: int, steps: int | None) -> str:
    return f"{task.upper()}, K = {pairs}" + (f", {steps:,} steps" if steps else "")


def by_level(runs: Sequence[SeedRun]) -> dict[tuple[str, int], dict[str, list[SeedRun]]]:
    """{(task, pairs): {entry: its seed runs}}, levels in order: what every table and test groups by."""
    groups: dict[tuple[str, int], dict[str, list[SeedRun]]] = {}
    for r in runs:
        groups.setdefault((r.task, r.pairs), {}).setdefault(r.model, []).append(r)
    return dict(sorted(groups.items()))


def summarize(runs: Sequence[SeedRun], thresholds: Sequence[float] = (0.95, 0.99), test: str = "welch",
              alpha: float = 0.05) -> list[ModelRow]:
    """One row per (difficulty, model); each model tested against the difficulty's best (lowest mean error),
    p-values Holm-corrected within the difficulty (the family is the comparisons one table makes)."""
    rows: list[ModelRow] = []
    for (task, pairs), by_model in by_level(runs).items():
        table = []
        steps = trained_steps([r for rs in by_model.values() for r in rs])  # the level's, once
        for model, model_runs in by_model.items():
            ci = mean_ci([r.test_error_pct for r in model_runs])
            params = next((r.num_params for r in model_runs if r.num_params is not None), None)
            table.append(ModelRow(task, pairs, model, params, ci.n, ci.mean, ci.half_width, ci.std,
                                  [steps_to_reach(model_runs, t) for t in thresholds],
                                  steps=steps,
                                  failed=len(model_runs) - ci.n))
        scored = [row for row in table if not math.isnan(row.error_mean)]
        if scored:
            best = min(scored, key=lambda row: row.error_mean)
            best.best = True
            best_errors = [r.test_error_pct for r in by_model[best.model]]
            others = [row for row in table if row is not best]
            raw = [compare_samples([r.test_error_pct for r in by_model[row.model]], best_errors, test)
                   for row in others]
            for row, p, adj in zip(others, raw, holm(raw), strict=True):
                row.p_value, row.p_holm = p, adj
                row.significant = None if math.isnan(adj) else adj < alpha
        rows += sorted(table, key=lambda row: (not row.best, row.error_mean))
    return rows


@dataclass
class Contrast:
    """One pair of entries at one difficulty: the paper's claims are pairwise (FW-LSTM vs FW-RNN, a small
    FW-LSTM vs a large LN-LSTM), so each pair gets its own test, not only each entry against the best."""

    task: str
    pairs: int
    better: str  # the lower mean test error
    worse: str
    diff: float  # worse minus better, in test-error points
    p_value: float
    p_holm: float = math.nan
    significant: bool | None = None


def pairwise(runs: Sequence[SeedRun], test: str = "welch", alpha: float = 0.05) -> list[Contrast]:
    """Every pair of entries at every difficulty; p-values Holm-corrected within the difficulty."""
    out: list[Contrast] = []
    for (task, pairs), by_model in by_level(runs).items():
        errors = {m: e for m, rs in by_model.items() if (e := [r.test_error_pct for r in rs
                                                              if not math.isnan(r.test_error_pct)])}
        ranked = sorted(errors, key=lambda m: _mean(errors[m]))
        level = [Contrast(task, pairs, a, b, _mean(errors[b]) - _mean(errors[a]),
                          compare_samples(errors[b], errors[a], test))
                 for i, a in enumerate(ranked) for b in ranked[i + 1:]]
        for c, adj in zip(level, holm([c.p_value for c in level]), strict=True):
            c.p_holm, c.significant = adj, None if math.isnan(adj) else adj < alpha
        out += level
    return out


def pairwise_tables(contrasts: Sequence[Contrast], test: str, alpha: float) -> str:
    out = []
    for task, pairs in dict.fromkeys((c.task, c.pairs) for c in contrasts):
        out += [f"### Every pair, {task.upper()}, K = {pairs}", "",
                "| lower error | higher error | difference (points) | p | p (Holm) | "
                f"significant (α={alpha}) |",
                "|---|---|---|---|---|---|"]
        for c in (c for c in contrasts if (c.task, c.pairs) == (task, pairs)):
            sig = {True: "yes", False: "no", None: "–"}[c.significant]
            out.append(f"| {c.better} | {c.worse} | {_fmt(c.diff)} | {_fmt_p(c.p_value)} | "
                       f"{_fmt_p(c.p_holm)} | {sig} |")
        out.append("")
    test_name = {"welch": "Welch's t-test", "mannwhitney": "Mann-Whitney U"}[test]
    out += [f"p: two-sided {test_name} of the two entries' per-seed test errors, Holm-Bonferroni corrected "
            "over every pair of this difficulty.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- tables


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_p(p: float) -> str:
    return "–" if math.isnan(p) else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")


def _reach_cell(reach: Reach, seconds: bool = False) -> str:
    if reach.reached == 0:
        return f"not reached (0/{reach.n})"
    value = f"{reach.seconds:.1f} s" if seconds else f"{reach.steps:,.0f}"
    return value if reach.reached == reach.n else f"{value} ({reach.reached}/{reach.n})"


def markdown_tables(rows: Sequence[ModelRow], test: str, alpha: float) -> str:
    out = []
    test_name = {"welch": "Welch's t-test", "mannwhitney": "Mann-Whitney U"}[test]
    for (task, pairs) in dict.fromkeys((r.task, r.pairs) for r in rows):
        table = [r for r in rows if (r.task, r.pairs) == (task, pairs)]
        thresholds = [f"{x.threshold:.0%}" for x in table[0].reach]
        head = ["model", "params", "test error % (mean ± 95% CI)", "seeds"]
        head += [f"steps to {t}" for t in thresholds] + [f"time to {t}" for t in thresholds]
        head += ["p vs best", "p (Holm)", f"significant (α={alpha})"]
        out += [f"### {level_title(task, pairs, table[0].steps)}", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for r in table:
            sig = "best" if r.best else {True: "yes", False: "no", None: "–"}[r.significant]
            cells = [f"**{r.model}**" if r.best else r.model, f"{r.num_params:,}" if r.num_params else "–",
                     f"{_fmt(r.error_mean)} ± {_fmt(r.error_ci)}",
                     str(r.n) + (f" (+{r.failed} diverged)" if r.failed else "")]
            cells += [_reach_cell(x) for x in r.reach] + [_reach_cell(x, seconds=True) for x in r.reach]
            cells += [_fmt_p(r.p_value), _fmt_p(r.p_holm), sig]
            out.append("| " + " | ".join(cells) + " |")
        out += ["", f"p: two-sided {test_name} of each model's per-seed test error against the best "
                "model's, Holm-Bonferroni corrected within this table. Steps/time: first evaluation at or "
                "above the threshold, mean over the seeds that reached it.", ""]
    return "\n".join(out)


def summary_records(rows: Sequence[ModelRow]) -> list[dict[str, Any]]:
    records = []
    for r in rows:
        rec = {"task": r.task, "pairs": r.pairs, "model": r.model, "num_params": r.num_params, "seeds": r.n,
               "test_error_pct_mean": r.error_mean, "test_error_pct_ci95": r.error_ci,
               "test_error_pct_std": r.error_std, "failed_seeds": r.failed}
        for x in r.reach:
            tag = f"{round(100 * x.threshold)}"
            rec |= {f"steps_to_{tag}": x.steps, f"seconds_to_{tag}": x.seconds, f"reached_{tag}": x.reached}
        rec |= {"best": r.best, "p_value": r.p_value, "p_holm": r.p_holm, "significant": r.significant}
        records.append(rec)
    return records


def seed_records(runs: Sequence[SeedRun], thresholds: Sequence[float]) -> list[dict[str, Any]]:
    records = []
    for r in sorted(runs, key=lambda r: (r.task, r.pairs, r.model, r.seed)):
        rec = {"task": r.task, "pairs": r.pairs, "model": r.model, "seed": r.seed, "status": r.status,
               "num_params": r.num_params, "test_error_pct": round(r.test_error_pct, 6), "run_id": r.run_id}
        for t in thresholds:
            hit = first_reach(r.history, t)
            rec[f"steps_to_{round(100 * t)}"] = None if hit is None else hit.get("step")
        records.append(rec)
    return records


def write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]) if records else [])
        writer.writeheader()
        writer.writerows(records)


# ---------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (also on Ray workers and CI)
    import matplotlib.pyplot as plt

    return plt


def curves_png_name(task: str, pairs: int) -> str:
    return f"curves_{task}-K{pairs}.png"


def plot_learning_curves(runs: Sequence[SeedRun], task: str, pairs: int, path: Path,
                         thresholds: Sequence[float] = ()) -> None:
    """Validation accuracy against optimizer steps: the mean over seeds with a 95% t-band, per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    level = [r for r in runs if (r.task, r.pairs) == (task, pairs)]
    for model in sorted({r.model for r in level}):
        seeds = [r for r in level if r.model == model]
        curves = [[(row["step"], row.get("val_accuracy")) for row in r.history if "step" in row]
                  for r in seeds]
        steps, mean, half = mean_band(curves)
        if len(steps) == 0:
            continue
        (line,) = ax.plot(steps, mean, label=f"{model} (n={len(seeds)})")
        low, high = (mean - half).clip(0, 1), (mean + half).clip(0, 1)  # an accuracy band stays in [0, 1]
        ax.fill_between(steps, low, high, alpha=0.2, color=line.get_color())
    for t in thresholds:
        ax.axhline(t, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="optimizer steps", ylabel="validation accuracy",
           title=level_title(task, pairs, trained_steps(level)), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_difficulty(rows: Sequence[ModelRow], path: Path) -> None:
    """Test error against the number of pairs, one line per model, one panel per task (the paper's figure)."""
    plt = _pyplot()
    tasks = sorted({r.task for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for model in sorted({r.model for r in rows}):
            pts = sorted((r.pairs, r.error_mean, r.error_ci) for r in rows
                         if (r.task, r.model) == (task, model))
            if not pts:
                continue
            xs, ys, es = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=[0 if math.isnan(e) else e for e in es], marker="o", capsize=3,
                        label=model)
        ax.set(xlabel="key-value pairs K", ylabel="test error % (mean ± 95% CI)", title=task.upper())
        levels = sorted({(r.pairs, r.steps) for r in rows if r.task == task})
        # each level's step budget under its K: levels trained for different budgets are not one curve
        ax.set_xticks([k for k, _ in levels], [f"{k}\n{s:,} steps" if s else str(k) for k, s in levels])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- report


def write_report(runs: Sequence[SeedRun], out_dir: Path, provenance: dict[str, Any],
                 thresholds: Sequence[float] = (0.95, 0.99), test: str = "welch",
                 alpha: float = 0.05, title: str = "Comparison") -> list[Path]:
    """Write every report file into out_dir (replacing an older report) and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("curves_*.png"):
        old.unlink()
    rows = summarize(runs, thresholds, test, alpha)
    contrasts = pairwise(runs, test, alpha)
    files = [out_dir / REPORT_MD, out_dir / SUMMARY_CSV, out_dir / SEEDS_CSV, out_dir / PAIRWISE_CSV,
             out_dir / REPRODUCE_YAML]
    write_csv(out_dir / SUMMARY_CSV, summary_records(rows))
    write_csv(out_dir / PAIRWISE_CSV, [asdict(c) for c in contrasts])
    write_csv(out_dir / SEEDS_CSV, seed_records(runs, thresholds))
    (out_dir / REPRODUCE_YAML).write_text(yaml.safe_dump(provenance, sort_keys=False), encoding="utf-8")
    for task, pairs in dict.fromkeys((r.task, r.pairs) for r in rows):
        path = out_dir / curves_png_name(task, pairs)
        plot_learning_curves(runs, task, pairs, path, thresholds)
        files.append(path)
    plot_difficulty(rows, out_dir / DIFFICULTY_PNG)
    files.append(out_dir / DIFFICULTY_PNG)
    md = [f"# {title}", "", *_dirty_banner(provenance), _provenance_md(provenance), "", "## Results", "",
          markdown_tables(rows, test, alpha), "## Every pair of entries", "",
          pairwise_tables(contrasts, test, alpha), "## Plots", "",
          f"![test error vs difficulty]({DIFFICULTY_PNG})", ""]
    md += [f"![learning curves {t}-K{k}]({curves_png_name(t, k)})" for t, k in dict.fromkeys(
        (r.task, r.pairs) for r in rows)]
    md += ["", f"Per-seed numbers: `{SEEDS_CSV}`; summary: `{SUMMARY_CSV}`; every pair: `{PAIRWISE_CSV}`; "
           f"reproduce: `{REPRODUCE_YAML}`.", ""]
    (out_dir / REPORT_MD).write_text("\n".join(md), encoding="utf-8")
    return files


def _dirty_banner(prov: dict[str, Any]) -> list[str]:
    """A run whose code was not one clean commit cannot be re-run exactly: say so before any number."""
    if prov.get("reproducible_from_one_clean_commit", True):
        return []
    commits = ", ".join(f"`{c}`" for c in prov.get("git_commits") or [prov.get("git_commit", "unknown")])
    return [f"> **Warning: not reproducible from one clean commit.** The code that produced these numbers "
            f"was {commits} (`+dirty`: uncommitted edits; several: the code changed between reruns). Re-run "
            "from a clean checkout (`git worktree add`) before citing them.", ""]


def _provenance_md(prov: dict[str, Any]) -> str:
    keys = [("models", "models"), ("difficulties", "difficulties"), ("seeds", "seeds"),
            ("tuning_budget", "tuning budget per model and difficulty"), ("git_commits", "git commit"),
            ("versions", "package versions"), ("tracking", "MLflow")]
    prov = {"git_commits": prov.get("git_commit", "unknown")} | prov  # a report of an older manifest
    lines = []
    for key, label in keys:
        if key in prov:
            value = prov[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, list):
                value = ", ".join(str(v) for v in value)
            lines.append(f"- **{label}**: {value}")
    return "\n".join(lines)


def seed_run_from_dict(data: dict[str, Any]) -> SeedRun:
    return SeedRun(**{k: data[k] for k in SeedRun.__dataclass_fields__ if k in data})


def seed_run_to_dict(run: SeedRun) -> dict[str, Any]:
    return asdict(run)

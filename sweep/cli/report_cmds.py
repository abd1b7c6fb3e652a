"""Commands: `compare` (a fair multi-model comparison) and `report` (its tables and plots)."""

from __future__ import annotations

import csv
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from sweep.cli import app
from sweep.cli.live import SweepView
from sweep.cli.output import console
from sweep.cli.sweep_cmds import storage_option


def _num(value: str, fmt: str) -> str:
    try:
        x = float(value)
    except ValueError:
        return "–"
    return "–" if x != x else format(x, fmt)


def _show(files: list[Path]) -> None:
    """A compact view of summary.csv per difficulty; the full tables are in report.md."""
    report = next(p for p in files if p.name == "report.md")
    rows = list(csv.DictReader((report.parent / "summary.csv").open(encoding="utf-8")))
    for task, pairs in dict.fromkeys((r["task"], r["pairs"]) for r in rows):
        table = Table(title=f"{task.upper()}, K = {pairs}", title_justify="left")
        reach = [c for c in rows[0] if c.startswith("steps_to_")]
        columns = ["model", "params", "test error %", *[f"steps to {c[9:]}%" for c in reach], "p (Holm)", ""]
        for col in columns:
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in (r for r in rows if (r["task"], r["pairs"]) == (task, pairs)):
            verdict = {"True": "worse*", "False": "n.s."}.get(r["significant"], "")
            error = f"{_num(r['test_error_pct_mean'], '.2f')} ± {_num(r['test_error_pct_ci95'], '.2f')}"
            table.add_row(r["model"], r["num_params"] or "–", error,
                          *[_num(r[c], ',.0f') for c in reach], _num(r["p_holm"], '.3g'),
                          "best" if r["best"] == "True" else verdict)
        console.print(table)
    console.print("* significantly worse than the best (Holm-corrected); n.s.: not significant")
    folder = escape(str(report.parent))
    console.print(f"report written to [bold]{folder}[/] ({len(files)} files), also logged to MLflow")


@app.command()
def compare(
    spec: Path = typer.Argument(..., metavar="SPEC", help="search-space YAML with a compare: section"),
    address: str | None = typer.Option(None, "--address", metavar="HOST:PORT",
                                       help="Ray cluster address; default: local Ray"),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", metavar="URL",
        help="MLflow server URL; default: the spec's, else the local server"
    ),
    storage: str | None = storage_option(),
) -> None:
    """Tune each model at each difficulty with the same budget, retrain the best over seeds, report."""
    from sweep.compare import run_comparison
    from sweep.config import load_compare_spec

    loaded, recorded = load_compare_spec(spec)
    if recorded:
        _same_code_note(recorded)
    if storage:
        loaded = loaded.model_copy(update={"storage": storage})
    with SweepView(console) as view:  # each tuning sweep live, as `sweep run` shows one
        files = run_comparison(loaded, address=address, tracking_uri=tracking_uri, on_event=view,
                               log=lambda text: console.print(text, markup=False))
    _show(files)


def _same_code_note(recorded: dict) -> None:
    """A reproduce.yaml re-runs the spec exactly; the numbers are the same only with the same code."""
    from sweep.compare import git_commit

    made_by = str(recorded.get("git_commit") or "unknown").removesuffix("+dirty")
    here = git_commit() or "unknown"
    if here != made_by:
        console.print(f"note: this reproduce.yaml was made by commit {made_by}; this checkout is {here}. "
                      f"For the same numbers, run it from a clean checkout of {made_by} "
                      "(git worktree add DIR COMMIT).")


@app.command()
def report(
    name: str = typer.Argument(..., metavar="NAME", help="the comparison's name (its spec's name:)"),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", metavar="URL",
        help="MLflow server URL; default: the spec's, else the local server"
    ),
    storage: str | None = storage_option(),
) -> None:
    """(Re)write a comparison's tables, plots and provenance, on disk and in its MLflow parent run."""
    from sweep.compare import make_report

    _show(make_report(name, tracking_uri=tracking_uri, storage=storage))

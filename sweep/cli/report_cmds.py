"""Commands: `compare` (a fair multi-model comparison) and `report` (its tables and plots)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markdown import Markdown

from sweep.cli import app
from sweep.cli.output import console


def _show(files: list[Path]) -> None:
    report = next(p for p in files if p.name == "report.md")
    text = report.read_text(encoding="utf-8")
    results = text.split("## Results", 1)[-1].split("## Plots", 1)[0]
    console.print(Markdown(results))
    console.print(f"report written to [bold]{report.parent}[/] ({len(files)} files), also logged to MLflow")


@app.command()
def compare(
    spec: Path = typer.Argument(..., help="search-space YAML with a compare: section"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address; default: local Ray"),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow server URL; default: the spec's, else the local server"
    ),
) -> None:
    """Tune each model at each difficulty with the same budget, retrain the best over seeds, report."""
    from sweep.compare import run_comparison
    from sweep.config import load_spec

    files = run_comparison(load_spec(spec), address=address, tracking_uri=tracking_uri, log=console.print)
    _show(files)


@app.command()
def report(
    name: str = typer.Argument(..., help="the comparison's name (its spec's name:)"),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow server URL; default: the spec's, else the local server"
    ),
) -> None:
    """(Re)write a comparison's tables, plots and provenance, on disk and in its MLflow parent run."""
    from sweep.compare import make_report

    _show(make_report(name, tracking_uri=tracking_uri))

"""Commands: `run`, `resume`, `sync`, `export`, `ui`, `list`, `show` (sweeps on Ray Tune + MLflow)."""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from pathlib import Path
from typing import Literal

import typer
from rich.markup import escape

from sweep.cli import app
from sweep.cli.live import SweepView, fmt_params
from sweep.cli.output import console, err_console
from sweep.cli.signals import interrupted_exit_code
from sweep.errors import UserError

SPEC_HELP = "search-space YAML (see search_spaces/ and docs/sweeps.md)"
NAME_HELP = "the sweep's name (see `sweep list`)"
ADDRESS_HELP = ("Ray cluster address HOST:PORT (the head's GCS port, from a cluster node); default: "
                "$RAY_ADDRESS, else local Ray. Ray Client (ray://) is not used: `ray job submit` instead")
TRACKING_HELP = ("MLflow server URL; default: the spec's tracking.uri, $MLFLOW_TRACKING_URI, else the local "
                 "server")
STORAGE_HELP = ("where sweeps live: a folder or s3://BUCKET/PREFIX (gs://...; endpoint: "
                "$FWSWEEP_S3_ENDPOINT); default: the spec's storage:, $FWSWEEP_STORAGE, else "
                "$FWSWEEP_HOME/sweeps")


def storage_option() -> str | None:
    return typer.Option(None, "--storage", metavar="PATH|URI", help=STORAGE_HELP)


def _summary(result, spec) -> None:  # noqa: ANN001  (SweepResult, SweepSpec: imported lazily for a fast CLI)
    from sweep.events import FINISHED_STATES, UNFINISHED, searched_keys, searched_params
    from sweep.tracking import redacted

    ended = {s: n for s, n in result.status_counts.items() if s in FINISHED_STATES}
    how = ", ".join(f"{n} {s}" for s, n in sorted(ended.items(), key=lambda kv: FINISHED_STATES.index(kv[0])))
    line = f"{sum(ended.values())}/{result.total} trials finished" + (f" ({how})" if how else "")
    if result.status_counts.get(UNFINISHED):
        line += f", {result.status_counts[UNFINISHED]} unfinished"
    console.print(f"\n[bold]sweep {result.name}[/]: {line} in {result.wall_s:.0f} s")
    if result.target_reached is not None:
        trial, epoch = result.target_reached
        console.print(f"target:     {result.metric} reached {spec.budget.target:g} ({trial}, epoch {epoch}): "
                      "the sweep ended there, as budget.target asks", soft_wrap=True)
    best = result.best
    if best is not None:
        value = best.value(result.metric)
        params = fmt_params(searched_params(best.params, searched_keys(spec)))
        console.print(f"best trial: {best.trial_id} ({best.model}) {result.metric}={value:.4f} "
                      f"after {best.epochs} epoch(s): {escape(params)}", soft_wrap=True)
    if result.mlflow_url:
        console.print(f"MLflow:     {redacted(result.mlflow_url)}", soft_wrap=True, markup=False)
    for path in result.exported:
        console.print(f"exported:   {path}", soft_wrap=True, markup=False)
        rerun = f"sweep train --config {shlex.quote(str(path))}"  # pasted into a shell as printed
        console.print(f"re-run it:  {rerun}", soft_wrap=True, markup=False)
    if result.interrupted:
        console.print(f"[yellow]interrupted[/]: continue with `sweep resume {result.name}`")
    if result.status_counts.get("failed"):
        console.print(f"[red]{result.status_counts['failed']} trial(s) failed[/]: their errors are in "
                      f"{escape(result.path)}/trial_*/error.txt and in their MLflow runs", soft_wrap=True)


def _announce(line: str) -> None:
    console.print(f"[bold]{escape(line)}[/]", soft_wrap=True)


def _ui_hint(spec, tracking_uri: str | None) -> None:  # noqa: ANN001
    """The local server stops with its last user: say how to bring it back to browse the results."""
    if not (tracking_uri or spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        console.print("browse:     sweep ui   (restarts the local MLflow server at that address)")


TRACKING_BEHIND_EXIT = 3  # the sweep's results are safe on disk, MLflow lacks some: `sweep sync NAME`


def _exit_code(result) -> None:  # noqa: ANN001
    if result.tracking_behind is not None:
        err_console.print(f"[red]not in MLflow yet[/]: {escape(result.tracking_behind.message(result.name))}",
                          soft_wrap=True)
    if result.interrupted:
        raise typer.Exit(interrupted_exit_code())
    if result.best is None:  # no trial produced a result: the sweep failed
        raise typer.Exit(1)
    if result.tracking_behind is not None:
        raise typer.Exit(TRACKING_BEHIND_EXIT)


def _apply_sets(data: dict, sets: list[str]) -> dict:
    """`--set task.pairs=16`: one field of the spec, the value read as YAML (16, 0.5, [a, b], true)."""
    from sweep.config import read_yaml_value
    from sweep.errors import Problem, UserError

    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(Problem("--set", f"{item!r} is not FIELD=VALUE", "e.g. --set task.pairs=16"))
        value = read_yaml_value(raw, f"--set {item}")
        node = data
        *parents, last = key.strip().split(".")
        for part in parents:
            if not isinstance(node.get(part, {}), dict):
                raise UserError(Problem("--set", f"{key}: {part} is not a section", "check the field path"))
            node = node.setdefault(part, {})
        node[last] = value
    return data


@app.command()
def run(
    spec: Path = typer.Argument(..., metavar="SPEC", help=SPEC_HELP),
    address: str | None = typer.Option(None, "--address", metavar="HOST:PORT", help=ADDRESS_HELP),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", metavar="URL", help=TRACKING_HELP),
    name: str | None = typer.Option(None, "--name", metavar="NAME",
                                    help="sweep name (default: the spec's name:)"),
    sets: list[str] = typer.Option([], "--set", metavar="FIELD=VALUE",
                                   help="override a spec field: task.pairs=16 (repeatable)"),
    storage: str | None = storage_option(),
) -> None:
    """Run a sweep: Optuna proposes trials, Ray Tune runs and early-stops them, MLflow records them."""
    from sweep.config import SweepSpec, check_name, read_yaml, validate_as
    from sweep.errors import Problem, naming_flags

    if name is not None:
        try:
            check_name(name, "sweep name")
        except ValueError as err:
            raise UserError(Problem("--name", str(err), "give another --name, or leave it out")) from None
    data = _apply_sets(read_yaml(spec), sets + ([f"name={name}"] if name is not None else []))
    with naming_flags({"name": f"--name {name}"} if name is not None else {}, sets):
        checked = validate_as(SweepSpec, data, str(spec))
    _run_to_the_end(checked, address, tracking_uri, resume=False, storage=storage)


@app.command()
def resume(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    address: str | None = typer.Option(None, "--address", metavar="HOST:PORT", help=ADDRESS_HELP),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", metavar="URL", help=TRACKING_HELP),
    storage: str | None = storage_option(),
) -> None:
    """Continue an interrupted sweep (from this or any machine that reaches its storage): finished trials
    are kept, unfinished ones go on from a checkpoint."""
    from sweep.export import load_spec_of

    _run_to_the_end(load_spec_of(name, storage), address, tracking_uri, resume=True, storage=storage)


def _interrupted_while_starting(spec, storage: str | None) -> None:  # noqa: ANN001
    """Ctrl-C before any trial ran: say what is left and what to type next."""
    from sweep.store import open_sweep

    try:
        store = open_sweep(spec.name, storage)
        restorable, ran = store.can_restore(), store.state_mtime() is not None
    except Exception:  # Ray half-started or storage unreachable: the plain advice below still holds
        restorable = ran = False
    nxt = (f"`sweep resume {spec.name}` continues it" if ran else
           f"no trial ran yet; `sweep resume {spec.name}` starts it" if restorable else
           "run the same command again to start it")
    console.print(f"\n[yellow]interrupted[/] while sweep {escape(spec.name)} was starting: {nxt}")


def _run_to_the_end(spec, address: str | None, tracking_uri: str | None, resume: bool,  # noqa: ANN001
                    storage: str | None) -> None:
    """`run` and `resume`: the sweep, its summary, and the exit code (130/143 when interrupted)."""
    from sweep.runner import run_sweep

    try:
        with SweepView(console) as view:  # SIGTERM, SIGHUP: Tune's orderly stop too (sweep.cli.signals)
            result = run_sweep(spec, address=address, tracking_uri=tracking_uri, resume=resume,
                               announce=_announce, storage=storage, on_event=view)
    except KeyboardInterrupt:  # before Tune's own Ctrl-C handling began (Ray or Tune still starting)
        _interrupted_while_starting(spec, storage)
        raise typer.Exit(interrupted_exit_code()) from None
    _summary(result, spec)
    _ui_hint(spec, tracking_uri)
    _exit_code(result)


@app.command()
def sync(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", metavar="URL", help=TRACKING_HELP),
    storage: str | None = storage_option(),
) -> None:
    """Bring the sweep's MLflow runs level with its records: missing runs, steps, statuses (idempotent)."""
    from sweep.errors import Problem
    from sweep.mlflow_runs.content import git_commit
    from sweep.mlflow_runs.reconcile import sync_sweep
    from sweep.runner import is_driven
    from sweep.store import open_sweep
    from sweep.tracking import redacted, tracking_server

    store = open_sweep(name, storage)
    spec = store.load_spec()
    if is_driven(store):
        raise UserError(Problem(name, "this sweep is running (a driver holds it)",
                                "sync it after it ends (`run` and `resume` sync at their end anyway)"))
    records = store.load_trials(spec)
    with tracking_server(tracking_uri, spec_uri=spec.tracking.uri) as server:
        report = sync_sweep(store, server.url, spec=spec, records=records, git=git_commit())
    console.print(f"[bold]{name}[/]: {report.trials} trial(s) in the sweep's records; MLflow now matches "
                  f"them ({report.runs_created} run(s) created, {report.rows_backfilled} result row(s) "
                  f"backfilled, {report.runs_closed} status(es) set, {report.runs_trashed} stray run(s) "
                  f"trashed, {report.uploads} artifact(s) uploaded)", soft_wrap=True)
    if report.url:
        console.print(f"MLflow:     {redacted(report.url)}", soft_wrap=True, markup=False)


@app.command()
def export(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    top_k: int = typer.Option(1, "--top-k", metavar="K", min=1,
                              help="also write the k best trials as top1..topk"),
    per_model: bool = typer.Option(False, "--per-model", help="also write the best trial of each model"),
    fmt: Literal["yaml", "json"] = typer.Option("yaml", "--format", metavar="yaml|json",
                                                help="yaml (with a provenance header) or json"),
    out: Path | None = typer.Option(None, "--out", metavar="PATH",
                                    help="output folder; default: <sweep folder>/exports"),
    storage: str | None = storage_option(),
) -> None:
    """Write the best configs of a sweep as TrialConfig files that `sweep train --config` re-runs."""
    from sweep.export import write_exports

    for path in write_exports(name, top_k=top_k, per_model=per_model, fmt=fmt, out=out, storage=storage):
        console.print(str(path), markup=False)


@app.command()
def ui(
    detach: bool = typer.Option(False, "--detach", help="leave the server running and return"),
    stop: bool = typer.Option(False, "--stop", help="stop the local MLflow server and return"),
) -> None:
    """Start (or find) the local MLflow server and print its URL; it stays up until Ctrl-C."""
    from sweep.tracking import stop_unless_used, tracking_server

    if stop:
        stopped, users = stop_unless_used()
        if users:
            console.print(f"the local MLflow server stays up while {len(users)} command(s) use it (pid "
                          f"{', '.join(map(str, users))}); it stops when the last one ends")
        else:
            console.print("local MLflow server stopped" if stopped else "no local MLflow server running")
        return
    with tracking_server(None, keep=detach) as server:  # $MLFLOW_TRACKING_URI if set, else the local one
        console.print(f"MLflow UI: [bold]{escape(server.url)}[/]")
        _sweep_links(server.url)
        if detach:
            console.print("running in the background; stop it with `sweep ui --stop`")
            return
        console.print("Ctrl-C to leave (the local server stops unless a sweep still uses it)")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


def _sweep_links(url: str) -> None:
    """One link per sweep on disk to its runs table (best trial first), for those MLflow has runs of."""
    from sweep.store import open_storage
    from sweep.tracking import sweep_link

    where = open_storage(None)
    for name in where.sweep_names():
        link = sweep_link(url, where.sweep(name).load_spec())
        if link:
            console.print(f"  {name}: {link}", soft_wrap=True, markup=False)


def _mlflow_runs(tracking_uri: str | None) -> dict[str, str]:
    """sweep name -> parent run status in MLflow; only asks a server that is already up (never starts one)."""
    from sweep import tracking

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        state = tracking.read_state()
        uri = state["url"] if state and tracking.is_healthy(state["url"]) else None
    if uri is None or (uri.startswith("http") and not tracking.is_healthy(uri)):
        return {}
    import mlflow

    client = mlflow.MlflowClient(uri)
    out: dict[str, str] = {}
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` IS NULL", max_results=500)
        for run in runs:
            sweep = run.data.tags.get("sweep")
            if sweep and "trial_id" not in run.data.tags:
                out[sweep] = run.info.status
    return out


@app.command("list")
def list_sweeps(
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", metavar="URL", help=TRACKING_HELP),
    storage: str | None = storage_option(),
) -> None:
    """The sweeps in the storage (and their parent runs in MLflow, when its server is up)."""
    from sweep.store import open_storage

    where = open_storage(storage)
    names = where.sweep_names()
    try:
        in_mlflow = _mlflow_runs(tracking_uri)
    except Exception:  # listing must work with MLflow down
        in_mlflow = {}
    if not names and not in_mlflow:
        console.print(f"no sweeps in {escape(where.uri)} (try: sweep run search_spaces/quickstart.yaml)")
        return
    from sweep.cli.sweep_tables import overview, sweeps_table

    views, damaged = [], {}
    for name in names:
        try:
            views.append(overview(where.sweep(name)))
        except UserError as err:  # one damaged sweep must not hide the others
            damaged[name] = err
    console.print(sweeps_table(views, in_mlflow, corrupt=list(damaged)))
    for err in damaged.values():
        console.print(f"[red]corrupt[/]: {escape(err.problems[0].render())}", soft_wrap=True)


@app.command()
def show(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    top: int = typer.Option(10, "--top", metavar="N", min=1,
                            help="trials to list, best first (then failed and unfinished ones)"),
    storage: str | None = storage_option(),
) -> None:
    """One sweep: its status, where it is stored, and its best trials."""
    from sweep.cli.sweep_tables import overview, trials_table
    from sweep.store import EXPORT_DIR, open_sweep
    from sweep.tracking import redacted, running_server_url, sweep_link

    store = open_sweep(name, storage)
    spec = store.load_spec()
    mlflow_url = running_server_url(None, spec.tracking.uri)  # a URI that cannot work: exit 2 first
    view = overview(store)
    console.print(f"[bold]{name}[/]: {view.status} · {view.trials} trials ended")
    console.print(f"trials: {view.states_text()}")  # a line of its own: at 80 columns it would wrap mid-count
    console.print(f"best {view.spec.metric.name}: {view.best_text(with_id=True)}")
    console.print(f"folder: {escape(store.uri)}", soft_wrap=True)
    console.print(trials_table(view, top))
    index = store.export_index()
    if index:
        files = [e["file"] for e in index.get("exports", [])]
        console.print(f"exports: {', '.join(files)} in")  # the folder on a line of its own, never cut
        console.print(f"  {escape(store.where(EXPORT_DIR))}", soft_wrap=True)
    link = sweep_link(mlflow_url, spec)
    console.print(f"MLflow: {escape(redacted(link))}" if link else
                  "MLflow: `sweep ui` brings up the server and prints this sweep's link", soft_wrap=True)

"""The `sweep` command line. The only place that prints for people and turns errors into exit codes.

Commands live in one module per area (trial, sweeps, reports); each adds itself to `app`.
"""

from __future__ import annotations

import sys

import typer

from sweep.cli.output import console, err_console, print_user_error
from sweep.errors import UserError

app = typer.Typer(
    name="sweep",
    help="Hyperparameter sweeps of fast-weight RNNs (FW-LSTM, FW-RNN, LN-LSTM, LSTM) on Ray Tune + Optuna, "
    "tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="print the version and exit", is_eager=True),
) -> None:
    if version:
        from sweep import __version__

        console.print(f"fwsweep {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        console.print(ctx.get_help())
        raise typer.Exit(2)


# Registering commands: importing these modules attaches their commands to `app`.
from sweep.cli import report_cmds, sweep_cmds, trial_cmds  # noqa: E402,F401


def main() -> None:
    """Console-script entry: user mistakes exit 2 with a message, never a traceback."""
    try:
        app()  # standalone: typer handles usage errors (exit 2), --help and Exit itself
    except UserError as err:
        print_user_error(err)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside a sweep's own orderly stop (e.g. while Ray starts)
        err_console.print("interrupted")
        sys.exit(130)

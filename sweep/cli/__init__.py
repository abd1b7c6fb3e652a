"""The `sweep` command line. The only place that prints for people and turns errors into exit codes.

Commands live in one module per area (trial, sweeps, reports); each adds itself to `app`.
"""

from __future__ import annotations

import os
import sys

import typer

from sweep.cli.output import console, is_usage_error, print_user_error, tidy_help, usage_error
from sweep.cli.signals import interrupted_exit_code, stop_like_ctrl_c
from sweep.errors import UserError
from sweep.tracking_probe import failed_request

app = typer.Typer(
    name="sweep",
    help="Hyperparameter sweeps of fast-weight RNNs (FW-LSTM, FW-RNN, LN-LSTM, LSTM) on Ray Tune + Optuna, "
    "tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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
    """Console-script entry: every user mistake (a bad file or value, or a mistyped command line) is one
    `error:` message and exit 2, never a traceback; so is an MLflow server that refuses a request (exit 2)
    or stops answering mid-command (exit 3). SIGTERM and SIGHUP stop it as Ctrl-C does."""
    stop_like_ctrl_c()
    command = tidy_help(typer.main.get_command(app))
    if not console.is_terminal or console.no_color:  # piped or NO_COLOR: Ray's lines uncoloured too
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        code = command.main(prog_name="sweep", standalone_mode=False)
    except UserError as err:
        print_user_error(err)
        code = 2
    except typer.Abort:  # click's KeyboardInterrupt
        code = interrupted_exit_code()
    except Exception as err:
        failed = None if is_usage_error(err) else failed_request(err)
        if failed is not None:  # the MLflow server refused or stopped answering mid-command
            code, problem = failed
            print_user_error(UserError(problem))
            sys.exit(code)
        if not is_usage_error(err):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # `sweep` alone, or a command without its arguments
            console.print(err.ctx.get_help())
        else:  # unknown option or command, a bad or missing value
            print_user_error(usage_error(err))
        code = 2
    sys.exit(code if isinstance(code, int) else 0)

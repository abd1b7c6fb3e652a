"""Shared terminal output: one rich console, one way to show a user error (ours or the parser's), and
help that names its placeholders (SPEC, NAME, FIELD=VALUE) rather than Python types.

typer bundles its own copy of click, whose classes it does not export; the parser's errors and
parameters are therefore recognised by their documented attributes (`param_type_name`, `option_name`,
`param`, `format_message`) rather than by class.
"""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.markup import escape

from sweep.errors import Problem, UserError, did_you_mean

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_user_error(err: UserError) -> None:
    # escaped: a message quotes what the user wrote (`uniform: [lo, hi]`, a file named `x[/].yaml`), which
    # rich would otherwise read as its markup: dropped, or an error of its own in place of ours
    err_console.print(f"[bold red]error:[/] {escape(err.render())}", soft_wrap=True, markup=True)


def is_usage_error(err: BaseException) -> bool:
    """A command-line mistake found by the parser (click's UsageError and its kinds, in typer's copy)."""
    return any(c.__name__ == "UsageError" for c in type(err).__mro__) and hasattr(err, "format_message")


def usage_error(err: Any) -> UserError:
    """A command-line mistake found by the parser, in the same shape as every other user error."""
    ctx = getattr(err, "ctx", None)
    path = ctx.command_path if ctx is not None else "sweep"
    message = err.format_message().replace("Value error, ", "").rstrip(".")
    where = path
    option_name = getattr(err, "option_name", None)
    param = getattr(err, "param", None)
    if option_name:  # no such option
        where = option_name
        if not getattr(err, "possibilities", None) and ctx is not None:
            known = [o for p in ctx.command.params for o in p.opts if o.startswith("-")]
            message += _hint(did_you_mean(option_name, known))
    elif param is not None:  # a bad or missing value
        where = "/".join(param.opts) if param.param_type_name == "option" else (param.metavar or param.name)
        given = re.search(r"'([^']*)' is not one of (.*)", message)
        if given:  # a value outside the listed choices
            message += _hint(did_you_mean(given.group(1), re.findall(r"'([^']*)'", given.group(2))))
    return UserError(Problem(where, message, f"see `{path} --help`"))


def _hint(text: str) -> str:
    return text.replace(" (", "; ").rstrip(")")


def tidy_help(command: Any) -> Any:
    """Help placeholders in words: an argument shows its metavar (SPEC) without a Python type beside it
    (`<path>`), a flag (`--help` too) shows nothing rather than `<bool>`, and a required argument reads
    `SPEC`, not `{SPEC}`; a command's help text wraps at the terminal's width, not at its docstring's."""
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        if cmd.help:  # a docstring's line breaks are its source's, not the terminal's: paragraphs rewrap
            cmd.help = "\n\n".join(" ".join(part.split()) for part in cmd.help.strip().split("\n\n"))
        for param in cmd.params:
            _tidy_param(param)
        make_help = cmd.get_help_option

        def help_option(ctx: Any, make_help: Any = make_help) -> Any:
            option = make_help(ctx)
            if option is not None:
                _tidy_param(option)
            return option

        cmd.get_help_option = help_option
    return command


def _tidy_param(param: Any) -> None:
    if param.param_type_name == "option" and getattr(param, "is_flag", False):
        param.metavar = ""
    elif param.param_type_name == "argument":
        name = param.metavar or (param.name or "").upper()
        usage = name if param.required else f"[{name}]"
        usage += "..." if param.nargs != 1 else ""
        param.display_type_rich = lambda ctx: None
        param._usage_display_name = lambda: usage

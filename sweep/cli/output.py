"""Shared terminal output: one rich console, one way to show a user error."""

from __future__ import annotations

from rich.console import Console

from sweep.errors import UserError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_user_error(err: UserError) -> None:
    err_console.print(f"[bold red]error:[/] {err.render()}", soft_wrap=True)

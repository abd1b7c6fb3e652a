"""User-facing errors: each names the field (or thing) at fault and the fix.

Raised anywhere in the package; only `sweep.cli` turns them into a message and exit code 2.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import NoReturn


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input."""

    where: str  # a dotted field path ("budget.max_epochs"), a file, a flag or an env variable
    message: str
    fix: str = ""

    def render(self) -> str:
        text = f"{self.where}: {self.message}"
        if not self.fix:
            return text
        return f"{text}{'' if text.endswith(('.', '?', '!')) else '.'} Fix: {self.fix}"


@dataclass
class UserError(Exception):
    """A mistake in the user's input (config, CLI flag, environment): exit code 2, no traceback."""

    problems: list[Problem] = field(default_factory=list)
    source: str = ""  # the file or command the problems come from

    def __init__(self, problems: list[Problem] | Problem | str, source: str = "", fix: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem(source or "input", problems, fix)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(dict.fromkeys(problems))  # once each (a `common:` value checked per model)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{len(self.problems)} problem(s) in {self.source}" if self.source else "invalid input"
        return head + ":\n" + "\n".join(f"  - {p.render()}" for p in self.problems)


@contextlib.contextmanager
def naming_flags(flags: Mapping[str, str], sets: Iterable[str] = ()) -> Iterator[None]:
    """A UserError raised inside says, for each problem in a field the command line set, which flag set it
    (`flags`: field path -> the flag as typed; `sets`: the `--set FIELD=VALUE` items): `train.lr (--lr -1):
    Input should be greater than 0`, not a problem "in" a file that never held that value."""
    given = dict(flags) | {item.partition("=")[0].strip(): f"--set {item}" for item in sets}
    try:
        yield
    except UserError as err:
        def flag_of(where: str) -> str | None:
            return next((flag for path, flag in given.items() if f"{where}.".startswith(f"{path}.")), None)

        problems = [replace(p, where=f"{p.where} ({flag})") if (flag := flag_of(p.where)) else p
                    for p in err.problems]
        raise UserError(problems, source=err.source) from None


def in_chain(err: BaseException | None, match: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception `match` accepts in `err`'s chain (it, its cause or else its context, ...):
    Tune and Ray wrap what they catch (TuneError from it, RayTaskError copies a worker's)."""
    for _ in range(20):
        if err is None or match(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def exit_now(err: UserError) -> NoReturn:
    """End the process with `err` as the CLI prints it (exit code 2), from where an exception cannot
    unwind: a thread, while the main thread is held inside a library that would end the process itself.
    It ends even when the message cannot be written (a terminal that was closed: EIO)."""
    try:
        sys.stderr.write(f"error: {err.render()}\n")
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(2)


class TrialDiverged(RuntimeError):
    """The loss became NaN or inf: the trial ends with status 'diverged' rather than retrying forever."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest known name, or '' when nothing is close (difflib's ratio)."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

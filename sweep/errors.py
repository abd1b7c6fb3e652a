"""User-facing errors: each names the field (or thing) at fault and the fix.

Raised anywhere in the package; only `sweep.cli` turns them into a message and exit code 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input."""

    where: str  # a dotted field path ("budget.max_epochs"), a file, a flag or an env variable
    message: str
    fix: str = ""

    def render(self) -> str:
        text = f"{self.where}: {self.message}"
        return f"{text}. Fix: {self.fix}" if self.fix else text


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
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{len(self.problems)} problem(s) in {self.source}" if self.source else "invalid input"
        return head + ":\n" + "\n".join(f"  - {p.render()}" for p in self.problems)


class TrialDiverged(RuntimeError):
    """The loss became NaN or inf: the trial ends with status 'diverged' rather than retrying forever."""

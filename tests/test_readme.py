"""The docs hold when pasted: every ```bash block of README.md runs as written, in order, in a fresh folder
(so a stale command fails CI), and every relative link in README.md and docs/ points at a file that is in
the repository.

Only where a command would train for long does the test shorten it, by appending flags the command
already has (`SHORTER`); the rest of the line runs exactly as a user pastes it. Blocks that need something
this machine lacks (a Ray cluster, a browser) are written as ```text in the README and are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
COMMENT = re.compile(r"\s+#.*$")

# command prefix -> flags appended so that it trains for seconds, not minutes
SHORTER = {
    "sweep train --resume": [],  # continues a run already cut short below
    "sweep train": ["--epochs", "1"],
    "sweep run": ["--set", "budget.num_samples=2", "--set", "budget.max_epochs=1",
                  "--set", "budget.max_concurrent=1"],
}


def readme_commands() -> list[str]:
    """The README's bash lines in order, comments dropped."""
    lines = []
    for block in BLOCK.findall(README.read_text(encoding="utf-8")):
        lines += [COMMENT.sub("", ln).strip() for ln in block.splitlines()]
    return [ln for ln in lines if ln]


def shortened(command: str) -> str:
    for prefix, extra in SHORTER.items():
        if command == prefix or command.startswith(prefix + " "):
            return " ".join([command, *extra])
    return command


def test_readme_has_the_commands_a_new_user_pastes():
    commands = readme_commands()
    for expected in ("make quickstart", "sweep train", "sweep run search_spaces/quickstart.yaml",
                     "sweep show quickstart", "sweep validate"):
        assert any(c.startswith(expected) for c in commands), expected


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    """Each command in a bash shell with the package's `sweep` first on PATH and the repository's
    search_spaces/ in the working folder; `make` targets are checked with a dry run (they install)."""
    shutil.copytree(ROOT / "search_spaces", tmp_path / "search_spaces")
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items()
           if k not in ("FWSWEEP_HOME", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "COLUMNS")}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "COLUMNS": "80"}
    for command in readme_commands():
        if command.startswith("make "):
            run = ["make", "-n", "-C", str(ROOT), *command.split()[1:]]
        else:
            run = ["bash", "-c", shortened(command)]
        proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stdout + proc.stderr, command
        if command.startswith("sweep run"):  # the live view, piped: plain lines, nothing of Ray's
            assert "== Status ==" not in proc.stdout and "Tuner.restore" not in proc.stdout, proc.stdout


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_point_into_the_repository(page):
    text = page.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path = (page.parent / target).resolve()
        assert path.exists() and ROOT in path.parents, f"{page.name} links {target}, which is not in the repo"

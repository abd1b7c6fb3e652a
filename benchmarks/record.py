"""Every benchmark's results as JSON in benchmarks/results/, with what is needed to judge them.

A benchmark wraps its measurement in `record(name, args)` and stores its numbers in the returned dict's
"results"; on exit the file benchmarks/results/<name>.json holds them with the machine (CPU model,
logical and usable cores, memory), the torch/Python versions, the 1-minute load average before and after,
the git commit of the code measured, and the start/end times. `benchmarks/render.py` turns these files
into the tables of docs/benchmarks.md, so the docs say only what was measured.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def simd() -> str | None:
    """The widest x86 vector instructions the CPU reports (the C kernels are built for them): 'AVX-512',
    'AVX2', or None (another architecture, or an older x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, memory, library versions."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "simd": simd(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gib"] = None
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def git_commit() -> str | None:
    """The commit measured, '+dirty' with local edits to anything but benchmarks/results/ (where the
    earlier benchmarks of one batch write their JSON: that changes no code measured). FWSWEEP_GIT_COMMIT,
    where set, names it instead: a tree sent to a lent GPU machine is a copy whose .git need not be the
    sender's (one such copy reported the session's first commit, "+dirty")."""
    import subprocess

    if os.environ.get("FWSWEEP_GIT_COMMIT"):
        return os.environ["FWSWEEP_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        edits = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if edits else "")


def write(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write atomically: a half-written file would break the render of every table."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


@contextmanager
def scratch_home() -> Iterator[Path]:
    """FWSWEEP_HOME for a benchmark's sweeps: the user's if set, else a temp folder removed at the end
    (sweep state, checkpoints and the local MLflow store come to hundreds of MB per run)."""
    if os.environ.get("FWSWEEP_HOME"):
        yield Path(os.environ["FWSWEEP_HOME"])
        return
    with tempfile.TemporaryDirectory(prefix="fwsweep-bench-", ignore_cleanup_errors=True) as home:
        os.environ["FWSWEEP_HOME"] = home
        try:
            yield Path(home)
        finally:
            del os.environ["FWSWEEP_HOME"]


@contextmanager
def record(
    name: str, args: dict[str, Any], kind: str | None = None, results_dir: Path = RESULTS_DIR
) -> Iterator[dict[str, Any]]:
    """Yield the payload; fill payload["results"]. Written on a clean exit only (no partial figures).

    `kind` (default: name) picks the table renderer in render.py; several files may share one kind.
    """
    payload: dict[str, Any] = {
        "benchmark": name,
        "kind": kind or name,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "args": args,
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_before": list(os.getloadavg()),
        "git_commit": git_commit(),
        "results": None,
    }
    yield payload
    payload["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    payload["load_average_after"] = list(os.getloadavg())
    payload["machine"] = machine()
    path = write(name, payload, results_dir)
    print(f"results written to {path}")

"""Find or start the MLflow tracking server a sweep logs to.

Without a URI, fwsweep runs one local `mlflow server` per FWSWEEP_HOME (SQLite database + artifact folder
under `sweep.paths.mlflow_dir()`), bound to 127.0.0.1 on a free port, detached so later commands
(`sweep ui`, the next sweep) reuse it. Its pid and URL live in `server.json` in that folder.
With a URI, the server must already answer its `/health` endpoint: a sweep that cannot log is refused
before any trial starts, rather than training for hours and losing the record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from sweep import paths
from sweep.errors import Problem, UserError

HEALTH_TIMEOUT_S = 3.0  # one /health probe of a given server
START_TIMEOUT_S = 90.0  # a fresh local server is usually healthy in 4-10 s; a loaded machine is slower
STATE_FILE = "server.json"
LOG_FILE = "server.log"
LOCK_FILE = "server.lock"
USERS_DIR = "users"  # one file per command using the local server: "<pid>-<id>"
KEEP_FILE = "keep"  # present: the local server stays up when its last user ends (`sweep ui --detach`)


@dataclass(frozen=True)
class TrackingServer:
    """Where runs are logged. `started_here`: this call launched the local server (vs. reused/given)."""

    url: str
    started_here: bool = False
    pid: int | None = None


# ---------------------------------------------------------------------------------------------- health


def is_healthy(url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """True when a server answers `GET <url>/health` with 200 (or asks for credentials)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
            return resp.status == 200
    except urllib.error.HTTPError as err:
        return err.code in (401, 403)  # up, behind authentication (MLflow's client sends the credentials)
    except (OSError, ValueError):
        return False


def ensure_server(uri: str | None, meanwhile: Callable[[], object] | None = None) -> TrackingServer:
    """The server to log to: check a given URI, else reuse or start the local one.

    `uri` None falls back to $MLFLOW_TRACKING_URI, then to the local server. Non-HTTP URIs
    (`sqlite:///...`, `file:...`) need no server and are returned as they are. `meanwhile` is called
    once the server is known to be good or while a local one boots (never after a failed check).
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return ensure_local_server(meanwhile=meanwhile)
    if not uri.startswith(("http://", "https://")):
        _call(meanwhile)
        return TrackingServer(url=uri)
    if not is_healthy(uri):
        raise UserError(Problem(
            "--tracking-uri / MLFLOW_TRACKING_URI / tracking.uri",
            f"no MLflow server answers at {uri} (GET {uri.rstrip('/')}/health failed)",
            "start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), correct the URL, or leave the URI "
            "unset so fwsweep starts its own local server",
        ))
    _call(meanwhile)
    return TrackingServer(url=uri.rstrip("/"))


def _call(meanwhile: Callable[[], object] | None) -> None:
    if meanwhile is not None:
        meanwhile()


@contextlib.contextmanager
def tracking_server(uri: str | None, keep: bool = False,
                    meanwhile: Callable[[], object] | None = None) -> Iterator[TrackingServer]:
    """The server one command logs to, for as long as the command runs.

    Every command using the local server registers itself while it runs; the last one out stops the
    server unless it was kept (`keep`, `sweep ui --detach`). So no command leaves behind a server nobody
    asked for, two sweeps can share one, and `sweep ui` brings it back on the same port (same URLs).
    A given URI (or $MLFLOW_TRACKING_URI) is someone else's server: it is only checked, never stopped.
    `meanwhile` (e.g. starting Ray) runs while a local server boots, rather than after it.
    """
    server = ensure_server(uri, meanwhile)
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        yield server
        return
    folder = paths.mlflow_dir()
    lease = folder / USERS_DIR / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lease.parent.mkdir(exist_ok=True)
    lease.touch()
    if keep:
        (folder / KEEP_FILE).touch()
    try:
        yield server
    finally:
        lease.unlink(missing_ok=True)
        with _locked(folder):
            users = [p for p in (folder / USERS_DIR).iterdir() if _lease_alive(p)]
            if not users and not (folder / KEEP_FILE).exists():
                stop_local_server(folder)


def _lease_alive(lease: Path) -> bool:
    """A lease whose process died (a killed driver) is removed and does not keep the server up."""
    with contextlib.suppress(ValueError):
        if _exists(int(lease.name.split("-", 1)[0])):
            return True
    lease.unlink(missing_ok=True)
    return False


# ---------------------------------------------------------------------------------------------- local server


def ensure_local_server(folder: Path | None = None,
                        meanwhile: Callable[[], object] | None = None) -> TrackingServer:
    """Reuse the local server recorded in `folder` (default mlflow_dir()) when alive, else start one."""
    folder = folder or paths.mlflow_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(Problem("FWSWEEP_HOME", f"cannot create {folder} for the local MLflow server "
                                f"({err})", "point FWSWEEP_HOME at a writable folder, or pass --tracking-uri")
                        ) from None
    with _locked(folder):  # two sweeps starting at once must not start two servers
        state = read_state(folder)
        port = None
        if state:
            alive = _is_mlflow_process(state.get("pid"))
            if alive and is_healthy(state["url"]):
                _call(meanwhile)
                return TrackingServer(url=state["url"], started_here=False, pid=state["pid"])
            if alive:  # hung: replace it (a pid now owned by another program is left alone)
                _kill_tree(state["pid"])
            (folder / STATE_FILE).unlink(missing_ok=True)
            # Same port when free: a running sweep, an open browser tab and printed links keep working.
            port = _port_of(state["url"]) if _port_is_free(_port_of(state["url"])) else None
        try:
            server = start_server(folder, port=port, meanwhile=meanwhile)
        except RuntimeError as err:
            fix = f"see {folder / LOG_FILE}; or run your own server and pass --tracking-uri"
            raise UserError(Problem("local MLflow server", str(err), fix)) from None
        (folder / STATE_FILE).write_text(json.dumps(asdict(server) | {"started_at": time.time()}))
        return server


def read_state(folder: Path | None = None) -> dict | None:
    """The recorded local server ({url, pid, ...}) or None."""
    path = (folder or paths.mlflow_dir()) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "url" in state and "pid" in state else None


def start_server(folder: Path, host: str = "127.0.0.1", port: int | None = None,
                 timeout: float = START_TIMEOUT_S, meanwhile: Callable[[], object] | None = None
                 ) -> TrackingServer:
    """Launch `mlflow server` detached (own process group) on `folder`, and wait until it is healthy.

    Lean on purpose: one worker and no job-execution processes (2 processes, ~0.5 GB, instead of 15 and
    3 GB). Raises RuntimeError with the server log's tail if it does not come up.
    """
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--serve-artifacts",
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    with open(folder / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _call(meanwhile)  # the server needs 4-8 s to boot: other start-up work overlaps it
    except BaseException:
        _kill_tree(proc.pid)
        raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(url, timeout=1.0):
            return TrackingServer(url=url, started_here=True, pid=proc.pid)
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    _kill_tree(proc.pid)
    proc.wait(timeout=10)
    raise RuntimeError(
        f"the local MLflow server did not become healthy at {url} within {timeout:.0f} s; "
        f"last lines of {folder / LOG_FILE}:\n{_tail(folder / LOG_FILE)}"
    )


def stop_local_server(folder: Path | None = None) -> bool:
    """Stop the recorded local server and its whole process tree; False if none was running."""
    folder = folder or paths.mlflow_dir()
    state = read_state(folder)
    if not state:
        return False
    alive = _is_mlflow_process(state.get("pid"))
    if alive:
        _kill_tree(state["pid"])
    (folder / STATE_FILE).unlink(missing_ok=True)
    (folder / KEEP_FILE).unlink(missing_ok=True)
    return alive


def stop_servers_under(folder: Path) -> list[int]:
    """Stop every `mlflow server` whose store lies under `folder` (Linux); their pids.

    For test sessions: a test that runs a sweep with FWSWEEP_HOME in a temporary folder starts a detached
    local server there, which would outlive the session.
    """
    marker = str(Path(folder).resolve()).encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            text = cmdline.read_bytes().replace(b"\0", b" ")
            if b"mlflow server " in text and marker in text:
                found.append(int(cmdline.parent.name))
    for pid in found:
        _kill_tree(pid, grace_s=5.0)
    return found


def _port_of(url: str) -> int | None:
    with contextlib.suppress(ValueError, IndexError):
        return int(url.rstrip("/").rsplit(":", 1)[1])
    return None


def _port_is_free(port: int | None, host: str = "127.0.0.1") -> bool:
    if not port:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- processes


def stop_process_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by `pid` and every descendant, then SIGKILL what is left."""
    _kill_tree(pid, grace_s)


def _kill_tree(pid: int | None, grace_s: float = 10.0) -> None:
    if not pid or not _exists(pid):
        return
    victims = [pid, *_descendants(pid)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)  # the server runs in its own session: pgid == pid
    for p in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_exists(p) for p in victims):
        _reap(victims)
        time.sleep(0.1)
    for p in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # SIGKILL is delivered asynchronously
    while time.monotonic() < deadline and any(_exists(p) for p in victims):
        _reap(victims)
        time.sleep(0.05)


def _reap(pids: list[int]) -> None:
    """Collect our own exited children so they do not linger as zombies (and look alive)."""
    for p in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p, os.WNOHANG)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    return True


def _descendants(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc; elsewhere the process group kill covers it)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _is_mlflow_process(pid: int | None) -> bool:
    """Alive and still an mlflow server (a recorded pid may have been reused by another program)."""
    if not pid or not _exists(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True  # no /proc (macOS): trust the pid plus the health check
    return b"mlflow server " in cmdline


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / LOCK_FILE, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

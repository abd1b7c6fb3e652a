"""The MLflow tracking server a command logs to: check a given URI, or find, start and keep up the local one.

Without a URI, fwsweep runs one local `mlflow server` per FWSWEEP_HOME (SQLite database + artifact folder
under `sweep.paths.mlflow_dir()`), bound to 127.0.0.1. It is owned by the commands that use it: each holds
a lease while it runs, watches the server (a watchdog thread) and brings it back on the same port over the
same store if it dies; the last one out stops it. Its port is remembered across stops, so printed links
work again when `sweep ui` brings it back.

With a URI, it is checked before anything starts: a scheme MLflow cannot use, or an HTTP(S) server that
does not answer `/health`, is a user error (exit 2), rather than a sweep that trains for hours unrecorded.

Trials need not wait for a booting local server: `tracking_server(..., wait=False)` returns at once and
`is_ready(url)` / `wait_ready(url)` tell writers when the server answers (they buffer until then).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from filelock import FileLock

from sweep import local_mlflow, paths, tracking_probe
from sweep.errors import Problem, UserError

if TYPE_CHECKING:
    from sweep.config import SweepSpec

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 3.0  # one /health probe of a given server
END_PROBE_S = 10.0  # at a command's end, a server silent this long is not waited for (`answers_within`)
STORE_OPEN_TIMEOUT_S = 30.0  # opening a given database store (sqlite creates its tables on first use)
START_TIMEOUT_S = 180.0  # a fresh local server is healthy in 4-10 s when idle; 35-70 s measured at load 15
WATCH_EVERY_S = 2.0  # the watchdog checks that the server's process lives this often (no request)
PROBE_EVERY_S = 15.0  # ...and asks a live one for /health this often (sooner when a writer saw it fail)
HUNG_AFTER_S = 60.0  # a live server process that has not answered /health this long is replaced
FAILED_STARTS = 3  # starts in a row that exited with an error: the local server is failing (waiters stop)
STATE_FILE = "server.json"  # the running server: {url, pid, started_at}
PORT_FILE = "port"  # the port of the last server: kept across stops so links stay valid
LOG_FILE = "server.log"
DATABASE_FILE = "mlflow.db"
LOCK_FILE = "server.lock"
USERS_DIR = "users"  # one lease file per command using the local server: "<pid>-<id>"
KEEP_FILE = "keep"  # present: the local server stays up when its last user ends (`sweep ui --detach`)

# Schemes MLflow logs to without an HTTP server of its own (a database or a folder).
STORE_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
URI_FIX = ("pass --tracking-uri http://HOST:PORT of a running MLflow server (or sqlite:///PATH.db), or unset "
           "--tracking-uri / MLFLOW_TRACKING_URI / tracking.uri so fwsweep starts its own local server")


@dataclass(frozen=True)
class TrackingServer:
    """Where runs are logged. `started_here`: this call launched the local server (vs. reused/given)."""

    url: str
    started_here: bool = False
    pid: int | None = None


# ---------------------------------------------------------------------------------------------- URIs


def resolve_tracking_uri(given: str | None = None, spec_uri: str | None = None) -> str | None:
    """The tracking URI a command uses, checked; None means fwsweep's local server.

    Precedence: `--tracking-uri` (`given`), then $MLFLOW_TRACKING_URI, then the spec's `tracking.uri`.
    Every command that talks to MLflow calls this first, so a URI that cannot work stops it (UserError,
    exit 2) before Ray starts or anything is written.
    """
    for setting, value in (("--tracking-uri", given), ("MLFLOW_TRACKING_URI", os.environ.get(
            "MLFLOW_TRACKING_URI")), ("tracking.uri", spec_uri)):
        if value is not None and value.strip():
            return check_tracking_uri(value.strip(), setting)
    return None


def check_tracking_uri(uri: str, setting: str = "--tracking-uri") -> str:
    """`uri` as MLflow should get it, or a UserError naming `setting` when MLflow cannot log there."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not parsed.hostname:
            raise UserError(Problem(setting, f"{uri!r} names no host", URI_FIX))
        tracking_probe.check_server(uri, setting, redacted(uri), HEALTH_TIMEOUT_S)
        return uri.rstrip("/")
    folder = scheme == "file" or (not scheme and ":" not in uri and not any(c.isspace() for c in uri))
    if folder and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        raise UserError(Problem(setting, f"{uri!r} is a folder, MLflow's file store, which MLflow 3 refuses "
                                "(in maintenance mode)", "give a database file, sqlite:///PATH/mlflow.db (no "
                                "server needed), or a server's http://HOST:PORT; or set "
                                "MLFLOW_ALLOW_FILE_STORE=true to use the folder anyway"))
    if folder or scheme.split("+", 1)[0] in STORE_SCHEMES:
        return _opened(uri, setting)
    raise UserError(Problem(setting, f"{uri!r} is not a tracking URI MLflow can use "
                            f"({'scheme ' + repr(scheme) if scheme else 'no scheme'}; "
                            "MLflow takes http(s)://, sqlite://, postgresql://, mysql://, file:)", URI_FIX))


def redacted(uri: str) -> str:
    """`uri` with any password in it replaced by ***, for messages."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.password is None:
        return uri
    return uri.replace(f":{parsed.password}@", ":***@", 1)


def _check_sqlite_path(uri: str, setting: str) -> None:
    """A sqlite database's file must be writable, or creatable in a writable folder: said at once (MLflow
    itself retries for a minute, then fails with 'unable to open database file'). Tried, not inferred
    from permission bits, which root ignores."""
    path = uri.split("://", 1)[1][1:].split("?", 1)[0]  # sqlite:///rel.db -> rel.db, sqlite:////abs -> /abs
    if path in ("", ":memory:"):
        return
    file = Path(path)
    fix = "give a sqlite:///PATH whose folder you can write to (sqlite:////abs/path or sqlite:///relative)"
    target = file if file.exists() else next((p for p in file.absolute().parents if p.exists()), Path("/"))
    try:
        if target is file:
            with open(file, "r+b"):
                pass
        else:
            with tempfile.TemporaryFile(dir=target):
                pass
    except OSError as err:
        raise UserError(Problem(setting, f"{uri}: cannot write {target} ({err.strerror or err})",
                                fix)) from None


_opened_stores: set[str] = set()  # database stores this process has opened: a command resolves its URI twice


def _opened(uri: str, setting: str) -> str:
    """`uri` once MLflow has opened the store there and answered one query: a database it cannot open (a
    folder that does not exist or is not writable, a server that refuses, a missing driver) is a UserError
    now, not a traceback once Ray has started. Bounded: an unreachable database host may not time out."""
    if uri in _opened_stores:
        return uri
    if urllib.parse.urlparse(uri).scheme.lower().split("+", 1)[0] == "sqlite":
        _check_sqlite_path(uri, setting)
    outcome: list[BaseException | None] = []

    def query() -> None:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001  (whatever the store raised is the message)
            outcome.append(err)

    worker = threading.Thread(target=query, name="fwsweep-store-check", daemon=True)
    worker.start()
    worker.join(STORE_OPEN_TIMEOUT_S)
    if not outcome:
        raise UserError(Problem(setting, f"MLflow could not open {redacted(uri)} within "
                                f"{STORE_OPEN_TIMEOUT_S:.0f} s",
                                "check that the database answers, or use another tracking URI"))
    if outcome[0] is not None:
        err = outcome[0]
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)[:240]
        raise UserError(Problem(setting, f"MLflow cannot open {redacted(uri)} ({first})",
                                "for sqlite:///PATH the folder of PATH must exist and be writable; for a "
                                "database server check its host, port, credentials and driver"))
    _opened_stores.add(uri)
    return uri


# ---------------------------------------------------------------------------------------------- health


HEALTHY = (200, 401, 403)  # 401/403: up, behind authentication (MLflow's client sends the credentials)


def is_healthy(url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """True when a server answers `GET <url>/health` with 200 (or asks for credentials). HTTPS is asked as
    MLflow's client asks, with its TLS settings (a server with a private CA answers here as it does for
    logging); plain HTTP (the local server, polled while it boots) with urllib, which needs no second of
    importing MLflow first."""
    if url.lower().startswith("https://"):
        import requests

        try:
            return tracking_probe.get(url, "/health", timeout).status_code in HEALTHY
        except (requests.exceptions.RequestException, ValueError):
            return False
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
            return resp.status in HEALTHY
    except urllib.error.HTTPError as err:
        return err.code in HEALTHY
    except (OSError, ValueError):
        return False


def answers_within(url: str, seconds: float) -> bool:
    """Whether the server at `url` answers `/health` within `seconds` (asked every few seconds meanwhile).
    For the end of a command: a server that hangs (stopped, a network that drops packets) would hold each
    request of a reconcile for a minute of the client's retries; this says so in seconds."""
    deadline = time.monotonic() + seconds
    while True:
        if is_healthy(url, timeout=min(HEALTH_TIMEOUT_S, max(deadline - time.monotonic(), 0.5))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))


_readiness: dict[str, threading.Event] = {}  # url -> set while this process knows it to answer
_failing: dict[str, str] = {}  # url -> why the local server there failed its last FAILED_STARTS starts
_suspicions: dict[str, threading.Event] = {}  # url -> set when a writer's request to it failed


def _ready_event(url: str) -> threading.Event:
    return _readiness.setdefault(url.rstrip("/"), threading.Event())


def _suspect_event(url: str) -> threading.Event:
    return _suspicions.setdefault(url.rstrip("/"), threading.Event())


def suspect(url: str) -> None:
    """A request to `url` failed as if the server were down: its watchdog (if any) probes it now."""
    event = _suspicions.get(url.rstrip("/"))
    if event is not None:
        event.set()


def is_ready(url: str) -> bool:
    """False while the local server at `url` is booting or being restarted by this process.

    For writers: buffer while False instead of failing requests. A URL this process does not manage
    (a given server, or a Ray worker) counts as ready: the writer's own retries cover it.
    """
    event = _readiness.get(url.rstrip("/"))
    return event is None or event.is_set()


def wait_ready(url: str, timeout: float | None = None) -> bool:
    """Block until `is_ready(url)`; False on timeout, or at once while the local server there keeps failing
    to start (`failing_reason`): a sweep that ended then does not wait minutes for a server that cannot
    come up (its records keep every result; `sweep sync` later)."""
    key = url.rstrip("/")
    event = _readiness.get(key)
    deadline = None if timeout is None else time.monotonic() + timeout
    while event is not None and not event.is_set():
        left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
        if key in _failing or left <= 0:
            return False
        event.wait(left)
    return True


def failing_reason(url: str) -> str | None:
    """Why this process's local server at `url` fails to start (its last FAILED_STARTS starts exited with
    an error), or None."""
    return _failing.get(url.rstrip("/"))


# ---------------------------------------------------------------------------------------------- commands


def ensure_server(uri: str | None, meanwhile: Callable[[], object] | None = None) -> TrackingServer:
    """The server to log to, without a lease: a checked URI, else the local one (reused or started).

    `meanwhile` runs once the URI is checked, or while a local server boots.
    """
    uri = resolve_tracking_uri(uri)
    if uri is not None:
        _call(meanwhile)
        return TrackingServer(url=uri)
    folder = _local_folder()
    with _locked(folder):
        server, proc = _reuse_or_launch(folder)
    _call(meanwhile, on_error=lambda: _kill_tree(proc.pid if proc else None))
    _wait_healthy(folder, server, proc)
    return server


@contextlib.contextmanager
def tracking_server(uri: str | None, keep: bool = False, meanwhile: Callable[[], object] | None = None,
                    *, spec_uri: str | None = None, wait: bool = True,
                    meanwhile_stopping: Callable[[], object] | None = None) -> Iterator[TrackingServer]:
    """The server one command logs to, kept up for as long as the command runs.

    A given URI (`uri`, $MLFLOW_TRACKING_URI, `spec_uri`) is someone else's server: checked, never
    started or stopped. Otherwise the local server: this command takes a lease on it (under the lock,
    so a command ending at that moment cannot stop a server just reused), watches it and restarts it
    on the same port if it dies; the last command out stops it unless it was kept (`keep`: `sweep ui
    --detach`). `meanwhile` (e.g. starting Ray) overlaps the server's boot. `wait=False` yields before
    the server answers: `is_ready(server.url)` turns True once it does (a sweep trains meanwhile).
    `meanwhile_stopping` (e.g. stopping Ray) runs once at the end, while the server shuts down.
    """
    uri = resolve_tracking_uri(uri, spec_uri)
    if uri is not None:
        _call(meanwhile)
        try:
            yield TrackingServer(url=uri)
        finally:
            _call(meanwhile_stopping)
        return
    folder = _local_folder()
    with _locked(folder):
        server, proc = _reuse_or_launch(folder)
        lease = _take_lease(folder)
        if keep:
            (folder / KEEP_FILE).touch()
    if proc is not None or not is_healthy(server.url, timeout=1.0):
        _ready_event(server.url).clear()  # writers buffer until the watchdog (or the wait) sees it answer
    watchdog = Watchdog(folder, server.url)
    try:
        _call(meanwhile)
        if wait:
            _wait_healthy(folder, server, proc)
        watchdog.start()
        yield server
    finally:
        watchdog.stop()
        # meanwhile_stopping runs once: during the server's shutdown if this command stops it, else after
        pending = [meanwhile_stopping] if meanwhile_stopping is not None else []
        if _release(folder, [lease], meanwhile=lambda: _call(pending.pop() if pending else None)):
            _readiness.pop(server.url, None)
            _failing.pop(server.url, None)
        _call(pending.pop() if pending else None)  # the server was kept, reused by others, or gone


def running_server_url(uri: str | None = None, spec_uri: str | None = None) -> str | None:
    """The server to read from without starting one: a checked URI, else the local server if it answers."""
    uri = resolve_tracking_uri(uri, spec_uri)
    if uri is not None:
        return uri
    state = read_state()
    return state["url"] if state and is_healthy(state["url"]) else None


def _call(fn: Callable[[], object] | None, on_error: Callable[[], object] | None = None) -> None:
    if fn is None:
        return
    try:
        fn()
    except BaseException:
        if on_error is not None:
            on_error()
        raise


# ---------------------------------------------------------------------------------------------- leases


def _take_lease(folder: Path) -> Path:
    lease = folder / USERS_DIR / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lease.parent.mkdir(exist_ok=True)
    lease.touch()
    return lease


def active_users(folder: Path | None = None) -> list[int]:
    """Pids of the commands holding a lease on the local server; leases of dead processes are removed."""
    users = (folder or paths.mlflow_dir()) / USERS_DIR
    pids = []
    for lease in users.iterdir() if users.is_dir() else ():
        with contextlib.suppress(ValueError):
            pid = int(lease.name.split("-", 1)[0])
            if _exists(pid):
                pids.append(pid)
                continue
        lease.unlink(missing_ok=True)  # a killed driver's lease does not keep the server up
    return pids


# ---------------------------------------------------------------------------------------------- watchdog


_WATCHDOGS: weakref.WeakSet[Watchdog] = weakref.WeakSet()  # this process's (leave_local_server stops them)


class Watchdog:
    """Keeps the local server at `url` up while a command uses it, and says when it answers.

    While the server answers, the watchdog sleeps: every WATCH_EVERY_S it checks that the server's process
    lives (a look at /proc, not a request, since a sweep's driver shares the cores with its trials),
    and every PROBE_EVERY_S, or at once when a writer's request failed (`suspect`), it asks `/health`.
    While the server does not answer, `is_ready(url)` is False (writers buffer) and it probes every 0.25 s.
    A dead server is relaunched on the same port over the same store; a live one that has not answered
    for HUNG_AFTER_S is replaced. Several commands may watch one server: the lock and the state file make
    exactly one of them restart it.
    """

    def __init__(self, folder: Path, url: str) -> None:
        self.folder, self.url = folder, url
        self.restarts = 0
        self._failed_launches = 0
        self._reason = ""  # why its last start failed, as last said
        self._next_try = 0.0
        self._last_healthy = 0.0
        self._pid: int | None = None  # the server's process, from the state file when it last answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fwsweep-mlflow-watchdog", daemon=True)
        _WATCHDOGS.add(self)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        _suspect_event(self.url).set()  # wakes the sleeping loop
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        ready, suspect = _ready_event(self.url), _suspect_event(self.url)
        next_probe = 0.0
        while not self._stop.is_set():
            if ready.is_set() and not suspect.is_set() and time.monotonic() < next_probe and self._alive():
                suspect.wait(WATCH_EVERY_S)  # woken early by a writer's failed request, or by stop()
                continue
            suspect.clear()
            if is_healthy(self.url, timeout=HEALTH_TIMEOUT_S):
                _failing.pop(self.url.rstrip("/"), None)
                ready.set()
                self._last_healthy, self._failed_launches = time.time(), 0
                self._pid = (read_state(self.folder) or {}).get("pid")
                next_probe = time.monotonic() + PROBE_EVERY_S
                suspect.wait(WATCH_EVERY_S)
                continue
            ready.clear()
            if time.monotonic() >= self._next_try:
                try:
                    self._revive()
                except Exception as err:  # noqa: BLE001 - retried after a back-off
                    log.warning("could not restart the local MLflow server: %s", err)
                    self._back_off()
            self._stop.wait(0.25)

    def _alive(self) -> bool:
        """The server's process still exists (False when its pid is unknown: then probe)."""
        return self._pid is not None and _exists(self._pid)

    def _revive(self) -> None:
        check_store(self.folder)  # the commands checked it before their first start (_local_folder)
        with _locked(self.folder):
            state = read_state(self.folder)
            if state and state.get("url") != self.url:
                return  # another command replaced it on another port: not ours to touch
            if state and _is_mlflow_process(state.get("pid")):
                if not self._hung(state) or is_healthy(state["url"]):
                    return  # booting, busy, or restarted by another command meanwhile
                log.warning("the local MLflow server at %s has not answered for %.0f s: replacing it on the "
                            "same port", self.url, HUNG_AFTER_S)
                _kill_tree(state["pid"])
                (self.folder / STATE_FILE).unlink(missing_ok=True)
            elif self._failed_launches or not self._last_healthy:  # never answered: say why (once a reason)
                self._failed_to_start(boot_failure(self.folder / LOG_FILE))
            else:
                log.warning("the local MLflow server at %s is down: restarting it on the same port", self.url)
            _reuse_or_launch(self.folder)
            self.restarts += 1
            self._back_off()

    def _back_off(self) -> None:
        """The next restart waits 2, 4, ... up to 30 s; reset once the server answers (a server that cannot
        boot, or a restart that cannot even be tried, is retried slowly)."""
        self._failed_launches += 1
        self._next_try = time.monotonic() + min(2.0 ** self._failed_launches, 30.0)

    def _failed_to_start(self, reason: str) -> None:
        """The last start exited before answering. Said once per reason (it is retried with a back-off up to
        30 s); after FAILED_STARTS in a row the server counts as failing: `wait_ready` stops waiting."""
        if reason != self._reason:
            log.warning("the local MLflow server at %s did not start (%s): starting it again", self.url,
                        reason)
            self._reason = reason
        if self._failed_launches + 1 >= FAILED_STARTS and self.url.rstrip("/") not in _failing:
            _failing[self.url.rstrip("/")] = reason
            log.warning("the local MLflow server keeps failing to start; MLflow will lack this command's "
                        "results until it starts (the sweep's own records keep them all): fix the cause "
                        "(see %s), then `sweep sync` the sweep", self.folder / LOG_FILE)

    def _hung(self, state: dict) -> bool:
        """Silent for HUNG_AFTER_S since it last answered; one that never answered gets START_TIMEOUT_S
        to boot (a loaded machine boots slowly, and killing a slow boot only starts another)."""
        started = state.get("started_at", 0.0)
        if self._last_healthy > started:
            return time.time() - self._last_healthy > HUNG_AFTER_S
        return time.time() - started > START_TIMEOUT_S


# ---------------------------------------------------------------------------------------------- local server


def _local_folder(folder: Path | None = None) -> Path:
    """The local server's folder (default mlflow_dir()), created, its database checked before any lock
    or server file is made there."""
    folder = folder or paths.mlflow_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(Problem("FWSWEEP_HOME", f"cannot create {folder} for the local MLflow server "
                                f"({err})", "point FWSWEEP_HOME at a writable folder, or pass --tracking-uri")
                        ) from None
    check_store(folder)
    return folder


def ensure_local_server(folder: Path | None = None,
                        meanwhile: Callable[[], object] | None = None) -> TrackingServer:
    """Reuse the local server recorded in `folder` (default mlflow_dir()) when alive, else start one."""
    folder = _local_folder(folder)
    with _locked(folder):
        server, proc = _reuse_or_launch(folder)
    _call(meanwhile, on_error=lambda: _kill_tree(proc.pid if proc else None))
    _wait_healthy(folder, server, proc)
    return server


def _reuse_or_launch(folder: Path) -> tuple[TrackingServer, subprocess.Popen | None]:
    """Under the lock: the recorded server if alive (answering, or still booting), else a new one.

    A new one takes the remembered port when free (links and running sweeps keep working). Returns the
    launched process too (None when reused); the caller waits for it to answer outside the lock.
    """
    state = read_state(folder)
    if state:
        pid = state.get("pid")
        if _is_mlflow_process(pid):
            booting = time.time() - state.get("started_at", 0) < START_TIMEOUT_S
            if booting or is_healthy(state["url"]):
                return TrackingServer(url=state["url"], started_here=False, pid=pid), None
            _kill_tree(pid)  # hung: replace it (a pid now owned by another program is left alone)
        (folder / STATE_FILE).unlink(missing_ok=True)
    _stop_left_behind(folder)
    port = remembered_port(folder)
    proc, url = launch_server(folder, port=port if _port_is_free(port) else None)
    server = TrackingServer(url=url, started_here=True, pid=proc.pid)
    (folder / STATE_FILE).write_text(json.dumps(asdict(server) | {"started_at": time.time()}))
    (folder / PORT_FILE).write_text(str(_port_of(url)))
    return server, proc


def _wait_healthy(folder: Path, server: TrackingServer, proc: subprocess.Popen | None) -> None:
    """Block until the server answers; a UserError with the log's tail if it does not come up."""
    try:
        _wait_until_healthy(server.url, proc, START_TIMEOUT_S, folder / LOG_FILE)
    except ServerDidNotStart as err:
        if proc is not None:
            with _locked(folder):
                _forget(folder, proc.pid)
        fix = f"see {folder / LOG_FILE}; or run your own server and pass --tracking-uri"
        raise UserError(Problem("local MLflow server", err.reason, fix)) from None
    _ready_event(server.url).set()


def _forget(folder: Path, pid: int) -> None:
    _kill_tree(pid)
    state = read_state(folder)
    if state and state.get("pid") == pid:
        (folder / STATE_FILE).unlink(missing_ok=True)


def check_store(folder: Path) -> None:
    """A UserError naming the fix when the local database cannot be opened: the server would die at boot,
    again at every restart, and the sweep would run unrecorded."""
    db = folder / DATABASE_FILE
    why = store_damage(db)
    if why is not None:
        aside = f"mv {shlex.quote(str(db))} {shlex.quote(str(db))}.damaged"
        raise UserError(Problem(
            str(db), f"the local MLflow server's database is damaged: {why}",
            f"move it aside (`{aside}`) and run the command again: it starts a new database, "
            "and `sweep sync NAME` brings a sweep's runs back into it from the sweep's own records"))


def store_damage(db: Path) -> str | None:
    """Why MLflow cannot open `db`, or None (a missing or empty one is fine: the server makes it whole).

    Reads only SQLite's table list and the schema version (milliseconds, whatever the database's size).
    """
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=local_mlflow.READ_TIMEOUT_S)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return None
            left = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
            if left:
                return f"a change of its tables was stopped half-way (MLflow's table {left[0]} is left over)"
            if "alembic_version" not in tables or not con.execute("SELECT * FROM alembic_version").fetchall():
                return "it has tables but no schema version (alembic_version): it was never completed"
    except sqlite3.DatabaseError as err:  # not a database, a damaged page
        if "locked" in str(err):  # busy (another server's long write), not damaged: the server will wait
            return None
        return f"SQLite cannot read it ({err})"
    return None


def remembered_port(folder: Path | None = None) -> int | None:
    """The port the local server last ran on (kept after it stops), or None."""
    with contextlib.suppress(OSError, ValueError):
        return int(((folder or paths.mlflow_dir()) / PORT_FILE).read_text().strip())
    return None


def read_state(folder: Path | None = None) -> dict | None:
    """The recorded local server ({url, pid, started_at, ...}) or None."""
    path = (folder or paths.mlflow_dir()) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "url" in state and "pid" in state else None


def launch_server(folder: Path, host: str = "127.0.0.1", port: int | None = None
                  ) -> tuple[subprocess.Popen, str]:
    """Launch `mlflow server` detached (own session) on `folder`; returns at once with (process, url).

    Lean on purpose: one worker and no job-execution processes (2 processes, ~0.5 GB, instead of 15 and
    3 GB).
    """
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    cmd = [
        sys.executable, "-m", "sweep.local_mlflow", "server",  # `mlflow server`, its new database built aside
        "--backend-store-uri", f"sqlite:///{folder / DATABASE_FILE}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--serve-artifacts",
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    with open(folder / LOG_FILE, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, url


def start_server(folder: Path, host: str = "127.0.0.1", port: int | None = None,
                 timeout: float = START_TIMEOUT_S, meanwhile: Callable[[], object] | None = None
                 ) -> TrackingServer:
    """Launch `mlflow server` on `folder` and wait until it is healthy (tests, benchmarks).

    Raises RuntimeError with the server log's tail if it does not come up.
    """
    proc, url = launch_server(folder, host, port)
    _call(meanwhile, on_error=lambda: _kill_tree(proc.pid))  # the server's boot overlaps other work
    _wait_until_healthy(url, proc, timeout, folder / LOG_FILE)
    return TrackingServer(url=url, started_here=True, pid=proc.pid)


class ServerDidNotStart(RuntimeError):
    """The server exited while starting, or did not answer in time: `reason` in one line (for a user),
    the log's last lines in the text (for a test or benchmark)."""

    def __init__(self, reason: str, log_file: Path) -> None:
        self.reason = reason
        super().__init__(f"{reason}; last lines of {log_file}:\n{_tail(log_file)}")


def _wait_until_healthy(url: str, proc: subprocess.Popen | None, timeout: float, log_file: Path) -> None:
    """Poll `/health` until it answers; ServerDidNotStart if `proc` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(url, timeout=1.0):
            return
        if proc is not None and proc.poll() is not None:
            raise ServerDidNotStart(f"the MLflow server exited while starting (exit code {proc.returncode}): "
                                    f"{boot_failure(log_file)}", log_file)
        time.sleep(0.1)
    if proc is not None:
        _kill_tree(proc.pid)
    raise ServerDidNotStart(f"the MLflow server did not answer at {url} within {timeout:.0f} s", log_file)


def boot_failure(log_file: Path) -> str:
    """Why the server's last start failed, in one line: the log's last error line (a traceback's last line
    is the error itself), or a pointer to the log."""
    for line in reversed(_tail(log_file, 40).splitlines()):
        text = line.strip()
        if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", text) or text.startswith("ERROR"):
            return text[:300]
    return f"see {log_file}"


def stop_local_server(folder: Path | None = None, meanwhile: Callable[[], object] | None = None) -> bool:
    """Stop the recorded local server and its whole process tree; False if none was running.

    Its port stays remembered: the next start reuses it when free. `meanwhile` runs between asking the
    processes to end and waiting for them (its shutdown takes about a second and a half).
    """
    folder = folder or paths.mlflow_dir()
    state = read_state(folder)
    (folder / KEEP_FILE).unlink(missing_ok=True)
    if not state:
        return False
    alive = _is_mlflow_process(state.get("pid"))
    if alive:
        _kill_tree(state["pid"], meanwhile=meanwhile)
    left_behind = _stop_left_behind(folder)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return alive or bool(left_behind)


def leave_local_server(folder: Path | None = None) -> None:
    """What the end of `tracking_server` does, for a command that ends without unwinding (the process
    exits from a thread, sweep.runner): its watchdogs stop, its leases go, and the local server stops
    unless other commands use it or it is kept."""
    for watchdog in list(_WATCHDOGS):
        watchdog.stop()
    folder = folder or paths.mlflow_dir()
    ours = list((folder / USERS_DIR).glob(f"{os.getpid()}-*")) if (folder / USERS_DIR).is_dir() else []
    if ours:
        _release(folder, ours)


def _release(folder: Path, leases: list[Path], meanwhile: Callable[[], object] | None = None) -> bool:
    """A command's leases go; the last command out stops the local server unless it is kept. True if
    this stopped it."""
    with _locked(folder):
        for lease in leases:
            lease.unlink(missing_ok=True)
        return not active_users(folder) and not (folder / KEEP_FILE).exists() and \
            stop_local_server(folder, meanwhile=meanwhile)


def stop_unless_used(folder: Path | None = None) -> tuple[bool, list[int]]:
    """`sweep ui --stop`: stop the local server unless commands still use it; (stopped, their pids).

    A running sweep keeps it (its watchdog would only bring it back); it is no longer kept by `--detach`,
    so it stops when the last of them ends.
    """
    folder = folder or paths.mlflow_dir()
    if not folder.is_dir():
        return False, []
    with _locked(folder):
        (folder / KEEP_FILE).unlink(missing_ok=True)
        users = active_users(folder)
        return (False if users else stop_local_server(folder)), users


def stop_servers_under(folder: Path) -> list[int]:
    """Stop every `mlflow server` whose store lies under `folder`; their pids.

    For test sessions: a test that runs a sweep with FWSWEEP_HOME in a temporary folder starts a detached
    local server there, which would outlive the session.
    """
    return [proc.pid for proc in _stop(_trees(_server_processes(Path(folder), within=True)), grace_s=5.0)]


def _stop_left_behind(folder: Path) -> list[psutil.Process]:
    """Stop the server processes still working in `folder` once its recorded server is gone or stopped.

    Killing only a server's launcher (`kill PID`, the pid in server.json) leaves its uvicorn worker
    serving the port and writing the store, named by no record: the next start would take another port,
    and nothing would ever stop it. Returns what it stopped.
    """
    return _stop(_server_processes(folder))


def _server_processes(folder: Path, within: bool = False) -> list[psutil.Process]:
    """MLflow server processes (launcher or worker) working in `folder`: launch_server starts each local
    server there, and its worker inherits the folder. `within`: also those working under it, or whose
    command line names a store under it (a launcher whose folder was since deleted)."""
    folder = folder.resolve()
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cwd, cmdline = proc.info["cwd"], " ".join(proc.info["cmdline"] or ())
        if proc.pid == os.getpid() or not _is_server_process(cmdline):
            continue
        working_in = cwd is not None and (Path(cwd).is_relative_to(folder) if within else Path(cwd) == folder)
        names_store = within and _is_server_command(cmdline) and str(folder) in cmdline
        if working_in or names_store:
            found.append(proc)
    return found


def _trees(roots: list[psutil.Process]) -> list[psutil.Process]:
    """`roots` and all their descendants, each once."""
    procs = list(roots)
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs += [child for child in root.children(recursive=True) if child not in procs]
    return procs


def _stop(procs: list[psutil.Process], grace_s: float = 10.0,
          meanwhile: Callable[[], object] | None = None) -> list[psutil.Process]:
    """SIGTERM `procs`, run `meanwhile`, SIGKILL what is left after `grace_s`; returns `procs`."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    try:
        _call(meanwhile)
    finally:
        _, alive = psutil.wait_procs(procs, timeout=grace_s)  # also reaps our own children
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5.0)
    return procs


def _port_of(url: str) -> int | None:
    return urllib.parse.urlparse(url).port


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
    """SIGTERM `pid` and every descendant, then SIGKILL what is left after `grace_s`."""
    _kill_tree(pid, grace_s)


def _kill_tree(pid: int | None, grace_s: float = 10.0, meanwhile: Callable[[], object] | None = None) -> None:
    root = _process(pid)
    if root is not None:
        _stop(_trees([root]), grace_s, meanwhile)


def _process(pid: int | None) -> psutil.Process | None:
    """The live process `pid` (a zombie counts as gone), or None."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.Error:
        return None


def _exists(pid: int) -> bool:
    return _process(pid) is not None


def _descendants(pid: int) -> list[int]:
    """Every descendant of `pid` (children, grandchildren, ...)."""
    proc = _process(pid)
    with contextlib.suppress(psutil.Error):
        return [child.pid for child in proc.children(recursive=True)] if proc else []
    return []


def _is_mlflow_process(pid: int | None) -> bool:
    """Alive and still an mlflow server (a recorded pid may have been reused by another program)."""
    proc = _process(pid)
    if proc is None:
        return False
    try:
        return _is_server_command(" ".join(proc.cmdline()))
    except psutil.AccessDenied:
        return True  # cannot see its command line: trust the pid plus the health check
    except psutil.Error:
        return False


def _is_server_command(cmdline: str) -> bool:
    """`python -m sweep.local_mlflow server ...` (launch_server) or `mlflow server ...` (fwsweep before
    2026-12-02, still running after an upgrade): both hold "mlflow server "."""
    return "mlflow server " in cmdline


def _is_server_process(cmdline: str) -> bool:
    """A server's launcher, or its worker (`uvicorn ... mlflow.server.fastapi_app:app`; gunicorn's
    `mlflow.server:app` in older MLflow)."""
    return _is_server_command(cmdline) or "mlflow.server" in cmdline


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One command (or watchdog) at a time reads and changes the local server's state."""
    with FileLock(folder / LOCK_FILE, thread_local=False):
        yield


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------- UI links


SHARED_VIEW_TAG = "mlflow.sharedViewState."  # the MLflow UI's own saved-view tags on an experiment


def searched_params(spec: SweepSpec) -> list[str]:
    """The child runs' param names of what the sweep searches (`model.name`, `train.lr`, `model.fast_lr`)."""
    from sweep.config import Distribution, resolve_param

    names = ["model.name"] if len(spec.models) > 1 else []
    for section, entries in spec.space.items():
        models = spec.models if section == "common" else [section]
        for key, value in entries.items():
            if not isinstance(value, Distribution):
                continue
            for model in models:
                target = resolve_param(key, model)
                if target and ".".join(target) not in names:
                    names.append(".".join(target))
    return names


def runs_view(sweep: str, metric: str, mode: str, params: list[str]) -> dict[str, object]:
    """The MLflow UI state of a sweep's runs table: its trials, best first, the metric and params shown."""
    return {
        "searchFilter": f"tags.sweep = '{sweep}' and tags.`mlflow.parentRunId` IS NOT NULL",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": mode == "min",
        "selectedColumns": [f"metrics.`{metric}`", *(f"params.`{p}`" for p in params)],
    }


def runs_table_link(url: str, experiment_id: str, view: dict[str, object],
                    share_key: str | None = None) -> str:
    """A link to the runs table in Model-training mode showing `view`.

    MLflow 3.17's UI reads the sort and the filter from the URL, but the columns only from a saved view
    (`viewStateShareKey`, an experiment tag): with `share_key` the link opens that view, else the URL
    carries what it can (order and filter, MLflow's default columns).
    """
    query: dict[str, str] = {"workflowType": "machine_learning"}
    if share_key:
        query["viewStateShareKey"] = share_key
    else:
        query |= {"searchFilter": str(view["searchFilter"]), "orderByKey": str(view["orderByKey"]),
                  "orderByAsc": str(view["orderByAsc"]).lower()}
    return f"{url.rstrip('/')}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def run_link(url: str, experiment_id: str, run_id: str, tab: str | None = None) -> str:
    """A link to one run in Model-training mode (MLflow 3 otherwise opens runs as GenAI "Evaluations").

    `tab`: None (overview), "model-metrics", "system-metrics" or "artifacts".
    """
    page = f"{run_id}/{tab}" if tab else run_id
    return f"{url.rstrip('/')}/#/experiments/{experiment_id}/runs/{page}?workflowType=machine_learning"


def sweep_link(url: str | None, spec: SweepSpec) -> str | None:
    """The link a person follows to see a sweep in the MLflow UI, or None (no HTTP server, no runs yet).

    Saves the sweep's view on its experiment (the tag `mlflow.sharedViewState.fwsweep-NAME`, rewritten
    each time, so every link printed for the sweep stays valid). Never raises: a link is not worth failing
    a command over; where the view cannot be saved (a read-only user) the link keeps the order and filter.
    """
    if not url or not url.startswith(("http://", "https://")) or not wait_ready(url, START_TIMEOUT_S) \
            or not is_healthy(url):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(url)
    try:
        experiment = client.get_experiment_by_name(spec.experiment)
    except (MlflowException, OSError):
        return None
    if experiment is None:
        return None
    view = runs_view(spec.name, spec.metric.name, spec.metric.mode, searched_params(spec))
    key = f"fwsweep-{spec.name}"
    try:
        client.set_experiment_tag(experiment.experiment_id, SHARED_VIEW_TAG + key, json.dumps(view))
    except (MlflowException, OSError):
        key = None
    return runs_table_link(url, experiment.experiment_id, view, key)

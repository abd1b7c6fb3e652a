"""A Tune callback that ends a sweep at once when the local Ray this process started loses its raylet or
its GCS server (`ray stop` in another terminal, a kill by hand, the system's out-of-memory killer).

Without it Tune goes on: trials fail one after another ("ActorUnavailableError", "ActorDiedError", a
traceback each, all counted failed), and soon Ray itself ends the driver with exit code 1 ("The
connection to the plasma store is failed", or a GCS call that waits 60 s and then ends the process),
before any word of ours and with the local MLflow server left running. Here the driver lets go of Ray
at the next step of Tune's loop and says what happened; Tune's saved state keeps the trials that were
running, so `sweep resume` continues them from their last checkpoints on a new local Ray.

Tune's loop can also be held inside Ray when the GCS server goes: a call to it (starting the next
trial) waits up to 60 s and then Ray ends the process. A thread of the watch sees the loss too; when the
loop has not taken over after STUCK_S seconds, it hands the sweep to `on_stuck`, which brings MLflow level,
says the same and ends the process itself (sweep.runner).

A joined cluster (--address) has no processes of this one's to watch: there a lost node is Tune's
business (`retries.max_failures` moves its trials to the other nodes).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from sweep.errors import in_chain
from sweep.live_callbacks import LiveCallback
from sweep.storage_watch import TUNE_TRIAL_LOGGER

CRITICAL = ("raylet", "gcs_server")  # Ray's process types (ray_constants.PROCESS_TYPE_*) a node cannot lose
DYING_WAIT_S = 3.0  # how long a trial's Ray system error waits to see whether the node is going down
STUCK_S = 5.0  # a loss Tune's loop has not acted on after this long: the loop is held inside Ray


class RayNodeLost(RuntimeError):
    """A process of the local Ray node ended under the sweep."""

    def __init__(self, process: str, pid: int, returncode: int) -> None:
        self.process, self.pid, self.returncode = process, pid, returncode
        super().__init__(f"{process} (pid {pid}) {ended(returncode)}")


def ended(returncode: int) -> str:
    """How a process ended, in words: a signal by name (SIGKILL also by its likely senders), or an exit."""
    if returncode == 0:
        return "shut down (as `ray stop` does)"
    if returncode > 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    why = " (the out-of-memory killer, or a kill by hand)" if -returncode == signal.SIGKILL else ""
    return f"was stopped by {name}{why}"


def node_lost(err: BaseException | None) -> RayNodeLost | None:
    """The RayNodeLost behind `err` (Tune's clean-up may raise on top of it), if any."""
    return in_chain(err, lambda e: isinstance(e, RayNodeLost))  # type: ignore[return-value]


def _started_processes() -> dict[str, list[Any]]:
    """Ray's record of the processes this process started for its local node ({type: [ProcessInfo]}),
    on its private node object; empty when it joined a cluster, or on a Ray version without it."""
    try:
        from ray._private import worker

        return dict(worker._global_node.all_processes) if worker._global_node is not None else {}
    except Exception:  # noqa: BLE001 - another Ray version's internals: watch nothing rather than fail
        return {}


def local_node_processes() -> dict[str, Any]:
    """The raylet and GCS server (subprocess.Popen) of the local Ray that this process started."""
    found = {}
    for kind in CRITICAL:
        for info in _started_processes().get(kind) or []:
            if hasattr(getattr(info, "process", None), "poll"):
                found[kind] = info.process
    return found


def is_ray_system_error(err: BaseException | None) -> bool:
    """An error of Ray's machinery (an actor or worker lost, a dead raylet), not of the trial's code."""
    import ray.exceptions as rex

    return isinstance(err, rex.RayActorError | rex.WorkerCrashedError | rex.NodeDiedError |
                      rex.LocalRayletDiedError | rex.RaySystemError | rex.ObjectLostError)


def local_node_tree() -> list[Any]:
    """Every live process of the local node this process started (raylet, GCS server, Ray's monitors)
    with their descendants (workers, agents), as psutil processes (safe against a reused pid)."""
    import psutil

    tree = []
    for infos in _started_processes().values():
        for info in infos:
            pid = getattr(getattr(info, "process", None), "pid", None)
            try:
                root = psutil.Process(pid)
                tree += [root, *root.children(recursive=True)]
            except (psutil.Error, TypeError, ValueError):
                continue
    return tree


def end_processes(tree: list[Any]) -> None:
    """Kill what is still running of `tree`: with its node gone, Ray's agents and workers would linger
    for a while, and Ray cannot shut them down."""
    import psutil

    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(tree, timeout=5)


def let_go_of_ray() -> None:
    """Disconnect this driver from a Ray that lost its node, and stop what is left of that node. Tune's
    clean-up after an error stops each trial's actor and frees its placement group through the GCS; with
    the node gone, such calls end the process from inside Ray (exit 1). Disconnected, with Ray's
    auto-connect off, they fail at once instead (Ray is not running), and the error unwinds to the
    runner, which says what happened."""
    try:
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False  # what RAY_ENABLE_AUTO_CONNECT=0 sets at import
    except (ImportError, AttributeError):
        pass
    from sweep.runner import stop_ray

    tree = local_node_tree()
    stop_ray()
    end_processes(tree)


def first_lost(processes: dict[str, Any], wait_s: float = 0.0) -> RayNodeLost | None:
    """The first of `processes` (local_node_processes) that has ended, waiting up to `wait_s` for one."""
    deadline = time.monotonic() + wait_s
    while processes:  # none on a joined cluster
        for kind, process in processes.items():
            code = process.poll()
            if code is not None:
                return RayNodeLost(kind, process.pid, code)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return None


def check_local_ray(processes: dict[str, Any], wait_s: float = 0.0) -> None:
    """Raise RayNodeLost, after letting go of Ray, when one of `processes` has ended (waiting up to
    `wait_s` for one): for a loop that waits on Ray (Tune's, through RayNodeWatch; the seed runs of
    `sweep compare`)."""
    lost = first_lost(processes, wait_s)
    if lost is not None:
        let_go_of_ray()
        raise lost


class _HushNodeLossTracebacks(logging.Filter):
    """Drops Tune's traceback of a trial that failed because the node went down (the sweep ends with one
    message instead); a Ray error on a node that stays up is logged as Tune logs it."""

    watch: RayNodeWatch | None = None  # the running sweep's (one sweep runs at a time in a process)

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if self.watch is None or not is_ray_system_error(err):
            return True
        return self.watch.lost(wait_s=DYING_WAIT_S) is None


NODE_LOSS_TRACEBACKS = _HushNodeLossTracebacks()


class RayNodeWatch(LiveCallback):
    """Checks the local node's raylet and GCS server at every step of Tune's loop (a waitpid each) and
    when a trial fails, and from a thread of its own in case the loop is held inside Ray; a session's own
    (its processes, `on_stuck`), so it pickles as a reference (LiveCallback)."""

    def __init__(self, sweep: str, on_stuck: Callable[[RayNodeLost], None] | None = None) -> None:
        super().__init__(sweep)
        self.on_stuck = on_stuck
        self._processes: dict[str, Any] = {}
        self._done = threading.Event()  # the sweep ended here, or the loop acted on a loss: no more watching

    def lost(self, wait_s: float = 0.0) -> RayNodeLost | None:
        return first_lost(self._processes, wait_s)

    def check(self) -> None:
        lost = None if self._done.is_set() else self.lost()
        if lost is not None:
            self.stop()  # before letting go (seconds): the thread must not act on this loss too
            let_go_of_ray()
            raise lost

    def stop(self) -> None:
        """The sweep is over here (ended, failed, interrupted): nothing more to watch."""
        self._done.set()
        if NODE_LOSS_TRACEBACKS.watch is self:
            NODE_LOSS_TRACEBACKS.watch = None

    def _watch_from_a_thread(self) -> None:
        noticed = None
        while not self._done.wait(0.5):
            lost = self.lost()
            if lost is None:
                continue
            noticed = noticed or time.monotonic()
            if time.monotonic() - noticed >= STUCK_S and not self._done.is_set():
                self._done.set()
                self.on_stuck(lost)  # ends the process
                return

    def setup(self, **info: Any) -> None:
        self._processes = local_node_processes()
        self._done.clear()
        NODE_LOSS_TRACEBACKS.watch = self
        logging.getLogger(TUNE_TRIAL_LOGGER).addFilter(NODE_LOSS_TRACEBACKS)  # once: a filter is added once
        if self._processes and self.on_stuck is not None:
            threading.Thread(target=self._watch_from_a_thread, name="fwsweep-ray-watch", daemon=True).start()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.check()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.check()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.stop()

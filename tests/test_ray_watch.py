"""sweep.ray_watch's parts, on real processes: how a lost node is told, found and named. A sweep whose
local Ray loses its raylet or GCS server end to end: test_faults.py."""

from __future__ import annotations

import logging
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import ray.exceptions

from sweep import live_callbacks, ray_watch
from sweep.ray_watch import NODE_LOSS_TRACEBACKS, RayNodeLost, RayNodeWatch, ended, node_lost


@pytest.fixture
def watch() -> Iterator[RayNodeWatch]:
    """A watch of a stand-in 'raylet' (a sleeping process), registered as a session's callback."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    w = RayNodeWatch("watch-test")
    w._processes = {"raylet": process}
    try:
        yield w
    finally:
        process.kill()
        process.wait()
        live_callbacks.unregister([w])
        NODE_LOSS_TRACEBACKS.watch = None


def test_how_a_process_ended_is_said_in_words() -> None:
    assert ended(-signal.SIGKILL) == "was stopped by SIGKILL (the out-of-memory killer, or a kill by hand)"
    assert ended(-signal.SIGTERM) == "was stopped by SIGTERM"
    assert ended(0) == "shut down (as `ray stop` does)"
    assert ended(3) == "exited with code 3"
    assert str(RayNodeLost("gcs_server", 12, -9)).startswith("gcs_server (pid 12) was stopped by SIGKILL")


def test_the_lost_node_is_found_behind_errors_raised_on_top_of_it() -> None:
    lost = RayNodeLost("raylet", 1, -9)
    try:
        try:
            raise lost
        except RayNodeLost:
            raise RuntimeError("Ray has not been started yet") from None  # Tune's clean-up, disconnected
    except RuntimeError as err:
        assert node_lost(err) is lost
    assert node_lost(ValueError("a trial's own error")) is None


def test_a_dead_process_is_named_and_a_live_one_is_not(watch: RayNodeWatch) -> None:
    assert watch.lost() is None
    process = watch._processes["raylet"]
    process.send_signal(signal.SIGKILL)
    lost = watch.lost(wait_s=5)
    assert lost is not None and (lost.process, lost.pid, lost.returncode) == ("raylet", process.pid, -9)


def test_with_nothing_to_watch_no_error_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A joined cluster: the driver started no Ray processes, and a trial's Ray error costs no wait."""
    w = RayNodeWatch("joined")
    try:
        started = time.monotonic()
        assert w.lost(wait_s=3) is None
        assert time.monotonic() - started < 0.5
    finally:
        live_callbacks.unregister([w])


def _trial_failed(err: BaseException) -> logging.LogRecord:
    try:
        raise err
    except BaseException:
        return logging.LogRecord(ray_watch.TUNE_TRIAL_LOGGER, logging.ERROR, __file__, 1,
                                 "Trial task failed for trial %s", ("lstm_1",), sys.exc_info())


def test_tunes_traceback_is_dropped_only_when_the_node_went_down(watch: RayNodeWatch,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_watch, "DYING_WAIT_S", 0.2)
    NODE_LOSS_TRACEBACKS.watch = watch
    unavailable = ray.exceptions.ActorUnavailableError("socket closed", None)
    assert NODE_LOSS_TRACEBACKS.filter(_trial_failed(unavailable))  # the node is up: Tune's words stay
    assert NODE_LOSS_TRACEBACKS.filter(_trial_failed(ValueError("the trial's own bug")))
    watch._processes["raylet"].send_signal(signal.SIGKILL)
    watch._processes["raylet"].wait()
    assert not NODE_LOSS_TRACEBACKS.filter(_trial_failed(unavailable))  # the sweep's one message says it
    assert NODE_LOSS_TRACEBACKS.filter(_trial_failed(ValueError("the trial's own bug")))


def test_the_watch_pickles_as_this_sessions_own(watch: RayNodeWatch) -> None:
    """Tune pickles its callbacks with the Tuner; a restore in this session gets this watch back (its
    processes are this session's), elsewhere a callback that does nothing."""
    assert pickle.loads(pickle.dumps(watch)) is watch
    live_callbacks.unregister([watch])
    assert not isinstance(pickle.loads(pickle.dumps(watch)), RayNodeWatch)

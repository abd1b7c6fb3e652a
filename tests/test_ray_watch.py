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


def test_a_seed_run_lost_by_ray_is_one_message_and_a_node_going_down_is_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`sweep compare`'s wait on its seed runs (compare._collect), on a real Ray: a raylet told to stop
    (`ray stop`) fails its tasks before its process ends, so a seed run's Ray error gives the node
    DYING_WAIT_S to go and then names it (CI once got Ray's NodeDiedError traceback, exit 1, here).
    A seed run lost on a node that stays up (its worker died): one message saying what to run again."""
    import os
    import threading

    import ray
    from ray._private import auto_init_hook

    from sweep import compare
    from sweep.errors import UserError

    monkeypatch.setattr(ray_watch, "DYING_WAIT_S", 2.0)
    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", True)  # letting go of Ray turns it off
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the 'raylet'
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        crash = ray.remote(max_retries=0)(lambda: os._exit(1))
        ref = crash.remote()
        ray.wait([ref], timeout=60)
        started = time.monotonic()
        with pytest.raises(UserError) as told:
            compare._collect("cmp", [ref], print, None, {"raylet": stand_in})
        words = " ".join(str(told.value).split())
        assert "seed run" in words and "Ray lost it" in words and "the same `sweep compare` again" in words
        assert time.monotonic() - started >= 2.0  # it gave the node its time to go

        ref = crash.remote()
        ray.wait([ref], timeout=60)
        threading.Timer(0.3, stand_in.kill).start()  # the raylet ends after its tasks failed
        with pytest.raises(RayNodeLost) as lost:
            compare._collect("cmp", [ref], print, None, {"raylet": stand_in})
        assert (lost.value.process, lost.value.pid) == ("raylet", stand_in.pid)
        assert not ray.is_initialized()  # it let go of Ray: nothing of Tune's or ours waits on it
    finally:
        stand_in.kill()
        stand_in.wait()
        ray.shutdown()

"""A SweepSpec -> one ray.tune.Tuner (OptunaSearch + a Tune scheduler + the MLflow callback) -> results.

Only this module talks to Ray Tune. Everything here is glue: search, scheduling, retries, checkpoints
and experiment state are Tune's and Optuna's own machinery.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep import capacity, live_callbacks, outcome, paths, tune_snapshots
from sweep.config import SweepSpec
from sweep.errors import Problem, TrialDiverged, UserError
from sweep.events import FINISHED_STATES, UNFINISHED, Listener, Phase, SweepEnded, SweepStarted, final_report
from sweep.locks import LockHeld, is_locked_elsewhere, process_lock
from sweep.space import MODEL_KEY, DefineByRun, trial_config
from sweep.store import SPEC_FILE, SweepStore, TrialRecord, hush_missing_results, open_storage, trial_threads

__all__ = ["SPEC_FILE", "SweepResult", "build_tuner", "connect_ray", "restore_tuner", "run_sweep",
           "trial_threads", "tune_trial"]


@dataclass
class SweepResult:
    name: str
    path: str  # the sweep's folder: a local path or a URI (s3://...)
    status_counts: dict[str, int]  # done, stopped early, diverged, failed, unfinished (sweep.events)
    total: int = 0  # budget.num_samples
    best: Any | None = None  # sweep.export.TrialRecord
    metric: str = "val_accuracy"
    mlflow_url: str | None = None
    exported: list[Path] = field(default_factory=list)
    wall_s: float = 0.0
    interrupted: bool = False
    tracking_behind: TrackingBehind | None = None  # MLflow could not be brought level at the end
    target_reached: tuple[str, int] | None = None  # (trial, epoch) that reached budget.target


@dataclass(frozen=True)
class TrackingBehind:
    """MLflow did not answer the end-of-sweep reconcile: what it lacks, and how to fix it."""

    url: str
    unsent_reports: int  # reports of this session the live logging could not deliver
    trials: int
    error: str

    def message(self, name: str) -> str:
        what = (f"{self.unsent_reports} result(s) of this session" if self.unsent_reports
                else "the final statuses and summary")
        return (f"MLflow at {self.url} did not answer ({self.error}): {what} of the sweep's {self.trials} "
                f"trial(s) are not in MLflow yet. They are safe in the sweep's records; once the server "
                f"answers, run `sweep sync {name}`")


# ---------------------------------------------------------------------------------------------- trainable


class TuneReporter:
    """The Reporter protocol on top of Tune's session: one tune.report per epoch, checkpoints persisted."""

    def __init__(self, workdir: Path, recorded_epochs: int | None = None) -> None:
        self.workdir = workdir  # the trial's scratch folder, removed when the trial ends
        self.restored_epoch = 0  # the epochs the checkpoint Tune restored this trial from holds
        # the epochs the sweep's records held when `sweep resume` started (None: not a resumed trial)
        self.recorded_epochs = recorded_epochs

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        from ray import tune

        epoch = int(metrics.get("epoch") or 0)
        if epoch <= max(self.restored_epoch, self.recorded_epochs or 0):
            return  # an epoch `sweep resume` repeats (from an older checkpoint): Tune has its result already
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._send(metrics, checkpoint)

    @staticmethod
    def _send(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        import ray
        from ray import tune

        # Where the epoch ran: the Ray node (Tune's hostname/node_ip coincide for nodes on one host) and the
        # GPU ids Ray assigned this trial ("" without a GPU).
        node = {"node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids())}
        # Tune counts iterations by reports; a restored trial that skipped repeated epochs would drift, so
        # the scheduler's time (training_iteration) is the epoch itself.
        epoch = int(metrics.get("epoch") or 0)
        tune.report(dict(metrics) | node | {"training_iteration": epoch}, checkpoint=checkpoint)

    def _report_unrecorded(self, history: list[dict[str, Any]]) -> None:
        """A resumed trial's epochs that its checkpoint holds and the sweep's records do not, reported as
        they were (from the checkpoint's history). Tune saves its results with its experiment state, on a
        timer; a driver killed after a trial's newer checkpoint and before the next save resumes that
        trial from the newer checkpoint (sweep.tune_checkpoints), past epochs the records never got."""
        if self.recorded_epochs is None:
            return  # not resumed: Tune logged every epoch this trial reported in this session
        for row in history:
            if self.recorded_epochs < int(row.get("epoch") or 0) <= self.restored_epoch:
                self._send(row)

    def close_with(self, final: dict[str, Any]) -> None:
        """End a restored trial whose final result is already recorded, without training it again.

        Tune closes a trial with the metrics of the checkpoint it restored it from: if that checkpoint is
        the final epoch's, nothing is needed; if it is older (the final epoch's checkpoint was not in
        Tune's state yet), the recorded final result is reported once more, as it was, so that Tune and
        the scheduler see the trial's real end. result.json then holds that row twice; fwsweep reads the
        repeat as the same epoch (store.parse_history) and MLflow logs a step once."""
        from ray import tune

        self.restore_dir()
        epoch = int(final.get("epoch") or 0)
        if self.restored_epoch < epoch:
            tune.report(dict(final) | {"training_iteration": epoch})

    def restore_dir(self) -> Path | None:
        from ray import tune

        from sweep.checkpoint import META_FILE

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        # Into the trial's workdir: to_directory() without a path copies into the system temp folder
        # under a name nothing removes, one left-over copy per restored trial.
        path = Path(checkpoint.to_directory(str(self.workdir / "restored")))
        history: list[dict[str, Any]] = []
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            self.restored_epoch = int(meta["epoch"])
            history = [row for row in meta.get("history") or [] if isinstance(row, dict)]
        self._report_unrecorded(history)
        return path


def tune_trial(config: dict[str, Any], spec: dict[str, Any] | None = None,
               recorded: dict[str, dict[str, Any]] | None = None) -> None:
    """The Tune trainable: the sampled config -> TrialConfig -> sweep.train.run_trial on this worker.

    `recorded` (a resume): trial id -> {"epochs": epochs its result.json holds, "final": its last result
    if that ended the trial, else None} (recorded_progress). Tune snapshots its state apart from the
    results it logs, so a driver stopped between the two can hand back a trial whose last results (even
    its final one) are logged but whose state is older. Such a trial is not trained past what is
    recorded: an ended one is closed with its final result (TuneReporter.close_with); another goes on from
    its checkpoint without reporting the epochs already recorded, after reporting those its checkpoint
    holds that the records lack."""
    import ray
    import torch
    from ray import tune

    from sweep import testing_faults
    from sweep.train import run_trial

    progress = (recorded or {}).get(tune.get_context().get_trial_id()) or {}
    workdir = paths.trial_scratch_dir()
    try:
        if progress.get("final"):
            TuneReporter(workdir).close_with(progress["final"])
            return
        sweep_spec = SweepSpec.model_validate(spec)
        trial = trial_config(sweep_spec, config)
        threads = trial_threads(sweep_spec, trial)
        torch.set_num_threads(threads)
        device = "cuda" if ray.get_gpu_ids() else "cpu"  # CUDA only when Ray assigned this trial a GPU
        trial = trial.model_copy(update={"train": trial.train.model_copy(update={"device": device,
                                                                                   "num_threads": threads})})
        # testing_faults.wrap wraps the reporter only when FWSWEEP_FAULT is set
        reporter = testing_faults.wrap(TuneReporter(workdir, progress.get("epochs")))
        run_trial(trial, reporter, workdir)
    except TrialDiverged:
        pass  # reported with `diverged: 1`; ending normally keeps Tune from retrying a hopeless trial
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- Ray


def _probe(address: str, setting: str = "--address") -> None:
    """Fail fast on an address where nothing listens (ray.init would retry for a minute). `setting`: where
    the address came from, for the message (--address, or RAY_ADDRESS).

    Ray Client (ray://) is refused: a sweep's driver must run on a cluster node (Tune's driver-side
    callbacks, experiment state and the MLflow writes live there), which `ray job submit` gives.
    """
    if address == "auto":
        return
    if address.startswith("ray://"):
        raise UserError(Problem(setting, f"{address!r} is a Ray Client address, which sweeps do not use",
                                "submit the sweep as a job (`ray job submit --address http://HEAD:8265 -- "
                                "sweep run SPEC`), or run it on a cluster node with --address HEAD:6379"))
    host, _, port = address.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(Problem(setting, f"{address!r} is not HOST:PORT (a port from 1 to 65535)",
                                "give the Ray head's GCS address, e.g. 10.0.0.5:6379"))
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as err:
        raise UserError(Problem(setting, f"no Ray cluster answers at {address} ({err.strerror or err})",
                                "start the head (`ray start --head`), check the host/port and firewall, or "
                                "drop --address / RAY_ADDRESS to run on this machine")) from None


def _ray_address(given: str | None) -> tuple[str | None, str]:
    """The Ray address to join (--address, else RAY_ADDRESS, else None: a local Ray) and which it was."""
    if given:
        return given, "--address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


def connect_ray(address: str | None = None) -> bool:
    """Start a local Ray (all cores here) or join `address` / RAY_ADDRESS. True if this call started it."""
    import ray

    # Tune warns when it forces snapshots often (1 checkpoint an epoch): never, where tune_snapshots could
    # not turn those off
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    address, setting = _ray_address(address)
    if address:
        _probe(address, setting)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as err:  # auth or version mismatch: name the flag and the env knobs
            raise UserError(Problem("--address", f"cannot join the Ray cluster at {address}: {err}",
                                    "use the same Ray version and RAY_AUTH_MODE (and RAY_AUTH_TOKEN) as the "
                                    "head")) from None
        return True
    # A private local cluster. With RAY_AUTH_MODE unset, ray.init turns token auth on itself (making
    # ~/.ray/auth_token on first use) and exports RAY_AUTH_MODE=token to the workers it starts. Setting
    # the variable here would be too late for Ray's already-loaded config, so only its notice is hushed.
    import logging

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # On an overloaded machine the node's agents can miss Ray's fixed 30 s start-up wait: try once more.
    for attempt in (1, 2):
        try:
            # No worker processes prestarted for this driver: Tune's trials run in actors, which Ray gives
            # workers of their own, so those two sat idle (1.4 CPU-s of a contended start; a sweep of 6
            # short trials ended 1.3 s sooner over 4 paired runs, docs/benchmarks.md).
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     _system_config={"prestart_worker_first_driver": False})
            return True
        except Exception as err:  # "The current node timed out during startup"
            stop_ray()
            if attempt == 2:
                raise UserError(Problem("ray", f"Ray did not start on this machine (tried twice): {err}",
                                        "try again when the machine is less busy, or start Ray yourself "
                                        "(`ray start --head --num-cpus 2`) and pass --address "
                                        "127.0.0.1:6379")) from None
    return True


def stop_ray() -> None:
    """Shut down the Ray this process started, after freeing the Ray handles Tune left in reference
    cycles. Else the garbage collector may free one (an ObjectRef, an actor handle) from another thread
    (the MLflow writer, the live view) while `ray.shutdown` is between shutting the core worker down and
    unsetting it, and Ray then ends the whole process with exit code 1 ("The core worker has already
    been shutdown ... The process will exit"), without a word of ours: seen once, under load."""
    import gc

    import ray

    gc.collect()
    ray.shutdown()


# ---------------------------------------------------------------------------------------------- Tuner


def _sampler(spec: SweepSpec) -> Any:
    import optuna

    cfg = spec.searcher
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = {} if cfg.n_startup_trials is None else {"n_startup_trials": cfg.n_startup_trials}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if cfg.name == "random" or cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.sampler == "tpe":  # multivariate + group: TPE models the conditional per-model subspaces jointly
        return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, group=True, constant_liar=True,
                                          **startup)
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=cfg.seed, **startup)
    if cfg.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=cfg.seed, warn_independent_sampling=False)
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise UserError(Problem("searcher.sampler", "cmaes needs the `cmaes` package",
                                "pip install cmaes, or use sampler: tpe")) from None
    return optuna.samplers.CmaEsSampler(seed=cfg.seed, warn_independent_sampling=False, **startup)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _trial_name(trial: Any) -> str:
    return f"{trial.config.get(MODEL_KEY, 'trial')}_{trial.trial_id}"


def _quiet_tune() -> None:
    """No Ray status tables or hints: the sweep's own view (sweep.cli, fed by sweep.tune_events) replaces
    them. `verbose=0` stops the legacy trial table; Tune's Ctrl-C notices ("Stop signal received",
    "Resume experiment with: Tuner.restore(...)") are warnings of `ray.tune.tune`: we say `sweep resume`.
    `ray.tune.utils.util` warns when a step is slow ("may be a performance bottleneck"): a note for Ray's
    developers, not for a person waiting on a sweep."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no new-engine output either (verbose=0 is silent)
    for name in ("ray.tune.tune", "ray.tune.utils.util"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # A resumed trial closed with its recorded final result (TuneReporter.close_with) reports that epoch
    # once more; Optuna keeps the first value for a step and says so: expected, nothing to act on.
    warnings.filterwarnings("ignore", message=r"The reported value is ignored because this `step=",
                            category=UserWarning)


AUTO_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
JSON_LOGGER_MARK = ".json-logger-only"  # in a sweep's folder: its saved Tuner carries its own JSON logger


@contextlib.contextmanager
def json_logger_only(store: SweepStore, fresh: bool) -> Any:
    """Tune's default CSV and TensorBoard loggers off for this fit. They write every result twice more, on
    the driver, with a TensorBoard writer thread per trial; the sweep's records are result.json (its own
    JSON logger, sweep.result_log.ResultLog, see build_tuner) and its view is MLflow. A sweep begun by an
    older fwsweep has no logger of its own (no mark): Tune keeps adding its defaults there. A user's
    setting of the variable wins."""
    if fresh:
        store.write_text(JSON_LOGGER_MARK, "Tune's default CSV/TensorBoard loggers are off for this sweep\n")
    if os.environ.get(AUTO_LOGGERS_ENV) is not None or not (fresh or store.exists(JSON_LOGGER_MARK)):
        yield
        return
    os.environ[AUTO_LOGGERS_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(AUTO_LOGGERS_ENV, None)


def _trainable(spec: SweepSpec, recorded: dict[str, dict[str, Any]] | None = None) -> Any:
    from ray import tune

    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    trainable = functools.partial(tune_trial, spec=spec.model_dump(mode="json"), recorded=recorded or {})
    return tune.with_resources(trainable, resources)


def recorded_progress(records: list[TrialRecord]) -> dict[str, dict[str, Any]]:
    """Each unfinished trial's recorded progress, for tune_trial: {"epochs": the epochs its result.json
    holds, "final": its last result (our metrics, without Tune's own keys) if that ended the trial, else
    None}. A result ends a trial when Tune said done (its scheduler stopped it) or it is the trial's
    own final report (events.final_report)."""
    from ray.tune.result import AUTO_RESULT_KEYS

    tune_keys = {*AUTO_RESULT_KEYS, "done", "trial_id", "should_checkpoint"}
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.status == "TERMINATED":
            continue
        if not r.history:  # none recorded: a checkpoint Tune restores it from has every epoch to report
            out[r.trial_id] = {"epochs": 0, "final": None}
            continue
        last = r.history[-1]
        ended = bool(last.get("done")) or final_report(last)
        final = {k: v for k, v in last.items() if k not in tune_keys} if ended else None
        out[r.trial_id] = {"epochs": int(last.get("epoch") or 0), "final": final}
    return out


def _callbacks(spec: SweepSpec, tracker: Any, store: SweepStore, on_event: Listener | None = None,
               on_stuck: Callable[[Any], None] | None = None) -> list[Any]:
    """This session's Tune callbacks: the local Ray's watch (`on_stuck`: see sweep.ray_watch), the
    storage watch, the live view's events and the live MLflow logging (kept by the runner). The Ray
    watch, the events and the logging pickle as references to this session's objects
    (sweep.live_callbacks), so a restored Tuner gets them without private Tune APIs."""
    from sweep.ray_watch import RayNodeWatch
    from sweep.storage_watch import StorageWatch, hush_state_upload_messages
    from sweep.testing_faults import driver_callbacks

    hush_state_upload_messages()
    out: list[Any] = driver_callbacks()  # none unless FWSWEEP_FAULT asks
    if on_event is not None:
        from sweep.tune_events import SweepEvents

        out.append(SweepEvents(on_event, spec))
    local = store.local_path()
    # first: a trial that failed on the storage, or on a dead local Ray, ends the sweep before the others
    # count it as failed
    watch = StorageWatch(folder=str(local)) if local else StorageWatch(uri=store.uri)
    return [RayNodeWatch(spec.name, on_stuck), watch, *out] + ([tracker] if tracker is not None else [])


def _tracker(spec: SweepSpec, tracking_url: str | None, store: SweepStore) -> Any:
    """The live MLflow callback of this sweep session (None without tracking); the runner keeps it."""
    if tracking_url is None:
        return None
    from sweep.mlflow_runs.callback import MlflowSweepCallback
    from sweep.mlflow_runs.content import git_commit
    from sweep.mlflow_runs.reconcile import error_text

    return MlflowSweepCallback(tracking_url, spec, git=git_commit(),
                               error_text=functools.partial(error_text, store))


def build_tuner(spec: SweepSpec, callbacks: list[Any] | None = None, store: SweepStore | None = None) -> Any:
    from ray import tune

    from sweep.result_log import ResultLog
    from sweep.schedulers import build_scheduler
    from sweep.searcher import SweepConcurrencyLimiter, SweepOptunaSearch

    searcher = SweepOptunaSearch(space=DefineByRun(spec), metric=spec.metric.name, mode=spec.metric.mode,
                                 sampler=_sampler(spec))
    searcher = SweepConcurrencyLimiter(searcher, max_concurrent=spec.budget.max_concurrent)
    store = store or open_storage(spec.storage).sweep(spec.name)
    run_config = tune.RunConfig(
        name=spec.name,
        storage_path=store.storage.root,
        storage_filesystem=_tune_filesystem(store),
        failure_config=tune.FailureConfig(max_failures=spec.retries.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
        callbacks=list(callbacks or []) + [ResultLog()],  # result.json: what sweep.store reads
        stop=_stopper(spec),
        verbose=0,
    )
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=build_scheduler(spec), num_samples=spec.budget.num_samples,
        time_budget_s=spec.budget.time_budget_s, reuse_actors=True, trial_dirname_creator=_trial_dirname,
        trial_name_creator=_trial_name,
    )
    return tune.Tuner(_trainable(spec), tune_config=tune_config, run_config=run_config)


def _stopper(spec: SweepSpec) -> Any:
    if spec.budget.target is None:
        return None
    from sweep.stopping import TargetReached

    return TargetReached(spec.metric.name, spec.metric.mode, spec.budget.target)


def _tune_filesystem(store: SweepStore) -> Any:
    """Object storage goes to Tune as a pyarrow filesystem (pickled to every worker, which resolves its own
    credentials); a local folder as a plain path, as Tune has always taken it."""
    return store.storage.fs if store.storage.remote else None


def restore_tuner(spec: SweepSpec, store: SweepStore | None = None, on_event: Listener | None = None) -> Any:
    """The saved Tuner. Its pickled callbacks come back as the ones this session registered for the sweep
    (sweep.live_callbacks), so no private Tune API swaps callbacks in. A trial whose named checkpoint Tune
    deleted after its last saved state goes on from its newest one (sweep.tune_checkpoints)."""
    from ray import tune

    from sweep.tune_checkpoints import restore_named_checkpoints

    store = store or open_storage(spec.storage).sweep(spec.name)
    records = store.load_trials(spec)
    for restored in restore_named_checkpoints(store, records):
        if on_event is not None:
            on_event(Phase(restored.message()))
    trainable = _trainable(spec, recorded_progress(records))
    return tune.Tuner.restore(store.path, trainable=trainable, resume_unfinished=True,
                              resume_errored=True, storage_filesystem=_tune_filesystem(store))


# ---------------------------------------------------------------------------------------------- sweep


def _check_start(spec: SweepSpec, resume: bool, store: SweepStore) -> None:
    store.storage.check()  # unreachable endpoint, no credentials, no bucket: one message, nothing started
    restorable = store.can_restore()
    if resume:
        if not restorable and store.exists(SPEC_FILE):  # driver stopped before Tune's first save
            raise UserError(Problem(spec.name, f"no sweep state to resume in {store.uri}: it stopped before "
                                    "its first trial was saved",
                                    f"{store.how_to_remove()} and start again with `sweep run SPEC`"))
        if not restorable:
            raise UserError(Problem(spec.name, f"no sweep state to resume in {store.uri}",
                                    "start it with `sweep run SPEC` (see `sweep list`; --storage / "
                                    "$FWSWEEP_STORAGE say where sweeps live)"))
        store.check_resumable(spec)  # (a live driver's lock on a local sweep: run_sweep takes it next)
        old = store.read_spec()
        if old is not None and old.model_dump() != spec.model_dump():
            raise UserError(Problem(spec.name, "this sweep was started from a different spec",
                                    f"resume with the saved spec ({store.where(SPEC_FILE)}) or start a new "
                                    "sweep with another --name"))
    elif restorable:
        raise UserError(Problem(spec.name, f"a sweep with this name already exists in {store.uri}",
                                f"continue it with `sweep resume {spec.name}`, or pass --name NEW_NAME"))
    elif store.exists(SPEC_FILE):  # only its spec: the driver stopped before Tune's first save
        raise UserError(Problem(spec.name, f"{store.uri} already holds a sweep that stopped before its first "
                                "trial was saved (nothing there to resume)",
                                f"{store.how_to_remove()} to start over, or pass --name NEW_NAME"))


def run_sweep(spec: SweepSpec, *, address: str | None = None, tracking_uri: str | None = None,
              resume: bool = False, announce: Callable[[str], None] | None = None,
              storage: str | None = None, on_event: Listener | None = None) -> SweepResult:
    """Run (or resume) a sweep to the end, export its best config, and say where everything is.

    `storage`: where sweeps live (--storage), else the spec's storage:, else $FWSWEEP_STORAGE, else
    $FWSWEEP_HOME/sweeps. `announce` receives one line for people once the tracking server is known,
    before trials start; `on_event` every `sweep.events` event (phases, trials starting, reporting and
    ending, counts) for the live view.
    """
    from ray import tune  # noqa: F401  (fail early if Ray is broken)

    from sweep.tracking import resolve_tracking_uri

    start = time.monotonic()
    paths.check_home()
    store = open_storage(storage or spec.storage).sweep(spec.name)
    _check_start(spec, resume, store)  # every cheap check first: nothing starts or is written on a mistake
    address, setting = _ray_address(address)
    if address:
        _probe(address, setting)
    _sampler(spec)
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri)  # exit 2 on a URI that cannot work
    with driver_lock(store):  # before Ray starts: a second driver of this sweep is refused at once
        result = _start_and_run(spec, address, uri, resume, announce, store, on_event)
    result.wall_s = time.monotonic() - start
    return result


def _start_and_run(spec: SweepSpec, address: str | None, uri: str | None, resume: bool,
                   announce: Callable[[str], None] | None, store: SweepStore,
                   on_event: Listener | None) -> SweepResult:
    """Ray and the tracking server (`uri`; None: the local one) started or joined side by side, the sweep
    run, both stopped."""
    from sweep.tracking import redacted, tracking_server

    ray_started: list[bool] = []
    if on_event is not None:
        import ray

        steps = [] if ray.is_initialized() else [f"joining Ray at {address}" if address else "starting Ray"]
        steps += [] if uri else ["the local MLflow server"]
        on_event(Phase(f"sweep {spec.name}: " + (" and ".join(steps) or "preparing") + "..."))

    def start_ray() -> None:  # Ray's start (~4 s) and then Tune's overlap a local MLflow server's boot
        sigterm = signal.getsignal(signal.SIGTERM)
        ray_started.append(connect_ray(address))
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)  # ray.init replaced the caller's SIGTERM handler: keep it
        capacity.check_resources(spec)  # before Tune/MLflow write anything: a trial no node fits would hang

    def stop_started_ray() -> None:  # after the reconcile; overlaps the local MLflow server's shutdown
        if any(ray_started):
            import ray

            if ray.is_initialized():
                stop_ray()

    try:
        # trials start while the server boots; Ray stops while it shuts down
        with tracking_server(uri, meanwhile=start_ray, wait=False,
                             meanwhile_stopping=stop_started_ray) as server:
            if announce:
                how = "starting on 127.0.0.1; trials start meanwhile" if server.started_here else \
                    "reused" if not uri else "given"
                announce(f"MLflow: {redacted(server.url)} ({how}); sweep state: {store.uri}")
            try:
                result = _run(spec, resume, server.url, store, on_event)
            finally:
                if on_event is not None:
                    on_event(SweepEnded(spec.name))
    finally:  # e.g. the MLflow server failed to start after Ray did
        stop_started_ray()
    return result


DRIVER_LOCK = ".driver.lock"  # held (an OS file lock) by the process driving the sweep; gone with it


@contextlib.contextmanager
def driver_lock(store: SweepStore, again: str | None = None) -> Any:
    """Hold the sweep's driver lock while this process drives it (local folders; best effort). `again`: the
    command that continues it, when not `sweep resume NAME` (a comparison's)."""
    local = store.local_path()
    created = local is not None and not local.exists()
    with contextlib.ExitStack() as held:
        if local is not None:
            try:
                local.mkdir(parents=True, exist_ok=True)
                held.enter_context(process_lock(local / DRIVER_LOCK))
            except LockHeld:  # another live driver holds it
                raise _driven_error(store.name, again) from None
            except OSError:
                pass  # best effort: a folder that cannot be made here fails where the sweep writes to it
        try:
            yield
        finally:
            held.close()  # the lock released first
            if created:  # a start that failed before writing anything leaves no folder holding only the lock
                with contextlib.suppress(OSError):
                    if {p.name for p in local.iterdir()} <= {DRIVER_LOCK}:
                        (local / DRIVER_LOCK).unlink(missing_ok=True)
                        local.rmdir()


def _driven_error(name: str, again: str | None = None) -> UserError:
    return UserError(Problem(
        name, f"this sweep is running: another process drives it (it holds the sweep's {DRIVER_LOCK})",
        f"let it finish, or stop it (Ctrl-C there), then `{again or f'sweep resume {name}'}`; two drivers "
        "would each run trials and delete the other's checkpoints"))


def is_driven(store: SweepStore) -> bool:
    """True while a live process drives the sweep: its lock is held (local), or (object storage) Tune
    saved its state in the last 30 s."""
    local = store.local_path()
    if local is None:
        saved = store.state_mtime()
        return saved is not None and time.time() - saved < 30
    return is_locked_elsewhere(local / DRIVER_LOCK)


def _run(spec: SweepSpec, resume: bool, tracking_url: str, store: SweepStore,
         on_event: Listener | None = None) -> SweepResult:
    """The sweep on a connected Ray (left running: the caller stops a Ray it started), its driver lock held.

    Afterwards MLflow is brought level with the sweep's records (`sweep.mlflow_runs.reconcile`), whatever
    the live logging managed to send."""
    from sweep import export, tracking
    from sweep.ray_watch import RayNodeWatch

    tracker = _tracker(spec, tracking_url, store)
    on_stuck = functools.partial(_end_held_driver, spec, tracking_url, store, tracker, on_event)
    callbacks = _callbacks(spec, tracker, store, on_event, on_stuck)  # registered before a restore unpickles
    unsent = 0
    try:
        _quiet_tune()
        if resume:
            with storage_faults(spec, store):  # it reads Tune's state and may copy a checkpoint back
                tuner = restore_tuner(spec, store, on_event)
        else:
            store.write_spec(spec)
            tuner = build_tuner(spec, callbacks, store)
        if on_event is not None:
            on_event(SweepStarted(spec.name, spec.metric.name, spec.metric.mode, spec.budget.num_samples,
                                  spec.max_epochs, spec.budget.max_concurrent, resumed=resume))
        # Tune snapshots its experiment state every >= 10 s by default: a driver killed in that window
        # forgets the trials that finished in it, and `resume` re-runs their last epoch. Here every 2 s, or
        # longer where a snapshot (which grows with the trials) would take over 5% of the driver's time.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", tune_snapshots.snapshot_period())
        # Tune fetches every trial's result itself; what Ray would print as "Unhandled error" at exit are the
        # futures of trials still running when the driver stops early (a storage fault): their tracebacks
        # would bury the one message that says what happened.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        hush_missing_results()
        with storage_faults(spec, store), ray_node_faults(spec), json_logger_only(store, fresh=not resume):
            tuner.fit()
    except BaseException:  # interrupted or failed: still no run left RUNNING, as far as the records go
        if tracker is not None:
            tracker.close(timeout_s=5.0)
        with contextlib.suppress(Exception):
            sync_after(spec, tracking_url, store)
        raise
    finally:
        for callback in callbacks:
            if isinstance(callback, RayNodeWatch):
                callback.stop()
        live_callbacks.unregister(callbacks)
    answering = None
    if tracker is not None:  # live logging ends before the reconcile, which then owns every write
        tracking.wait_ready(tracking_url, tracking.START_TIMEOUT_S)  # a sweep shorter than the server's boot
        answering = tracking.answers_within(tracking_url, tracking.END_PROBE_S)
        unsent = tracker.close(timeout_s=30.0 if answering else 2.0)
    with storage_faults(spec, store):
        records = store.load_trials(spec)
        best = export.best_trials(records, spec.metric.name, spec.metric.mode, k=1)
        exported = export.write_exports(spec.name, records=records, storage=store.storage.uri) if best else []
    writer = tracker.settled_writer() if tracker is not None else None
    mlflow_url, behind = sync_after(spec, tracking_url, store, records, unsent, writer, answering)
    if behind is None:
        from sweep.tracking import sweep_link

        mlflow_url = sweep_link(tracking_url, spec) or mlflow_url  # the runs table, best trial first
    counts: dict[str, int] = {}  # in users' words (sweep.events): done, stopped early, ..., unfinished
    for r in records:
        state = r.state(spec.max_epochs)
        state = state if state in FINISHED_STATES else UNFINISHED  # Tune saves a cut-off trial as pending
        counts[state] = counts.get(state, 0) + 1
    interrupted = bool(counts.get(UNFINISHED)) or not outcome.budget_spent(spec, records)
    return SweepResult(
        name=spec.name, path=store.uri, status_counts=counts, total=spec.budget.num_samples,
        best=best[0] if best else None,
        metric=spec.metric.name, mlflow_url=mlflow_url or tracking_url, exported=exported,
        wall_s=0.0, interrupted=interrupted, tracking_behind=behind,
        target_reached=outcome.reached_target(spec, records),
    )


STORAGE_SOURCE = "the sweep's storage"  # what a storage fault's message is headed by


@contextlib.contextmanager
def storage_faults(spec: SweepSpec, store: SweepStore) -> Any:
    """A write to the sweep's storage that fails (read-only, full, no permission; an object store that
    does not answer or refuses) -> one UserError saying what failed, where, and how to go on; Tune's saved
    state is kept, so `sweep resume` continues."""
    from sweep.storage_watch import storage_error

    try:
        yield
    except Exception as err:
        failed = storage_error(err)
        if failed is None:
            raise
        what = failed.strerror or str(failed).splitlines()[0][:300]
        if failed.filename and paths.PROBE not in str(failed.filename):
            what += f" ({failed.filename})"
        failure, first = (("the object store did not answer or refused a write", "once it answers again,")
                          if store.storage.remote else
                          ("writing the sweep's state failed", "make it writable (or free space), then"))
        raise UserError(Problem(
            store.uri, f"{failure}: {what}",
            f"{first} `sweep resume {spec.name}`: the trials Tune saved are kept, and MLflow is brought "
            "level at its end"), source=STORAGE_SOURCE) from None


@contextlib.contextmanager
def ray_node_faults(spec: SweepSpec) -> Any:
    """The local Ray losing its raylet or GCS server mid-sweep (sweep.ray_watch) -> one UserError saying
    which process ended and how, and how to go on."""
    from sweep.ray_watch import node_lost

    try:
        yield
    except Exception as err:
        lost = node_lost(err)
        if lost is None:
            raise
        raise NodeLostError(spec, lost) from None


class NodeLostError(UserError):
    """The sweep's message for a local Ray that lost its node; `lost` says which process, for a caller
    with other advice (`sweep compare`)."""

    def __init__(self, spec: SweepSpec, lost: Exception) -> None:
        self.lost = lost
        super().__init__(Problem(
            "local Ray", f"its {lost}, so no trial can run or report",
            f"`sweep resume {spec.name}` starts a new local Ray: trials that were running go on from their "
            "last checkpoints (if memory ran out, lower budget.max_concurrent or the model's size first)"),
            source="Ray")


def _end_held_driver(spec: SweepSpec, tracking_url: str, store: SweepStore, tracker: Any,
                     on_event: Listener | None, lost: Exception) -> None:
    """Tune's loop is held inside Ray by a call to a GCS server that is gone, and Ray would end the
    process after 60 s with exit code 1 and not a word: from the watch's thread, what the runner does on
    any error (MLflow brought level), the sweep's message, the node's leftovers stopped, exit code 2."""
    from sweep import tracking
    from sweep.errors import exit_now
    from sweep.ray_watch import end_processes, local_node_tree

    if on_event is not None:
        with contextlib.suppress(Exception):
            on_event(SweepEnded(spec.name))  # the live view lets go of the terminal
    if tracker is not None:
        with contextlib.suppress(Exception):
            tracker.close(timeout_s=5.0)
    with contextlib.suppress(Exception):
        sync_after(spec, tracking_url, store)
    end_processes(local_node_tree())
    with contextlib.suppress(Exception):
        tracking.leave_local_server()
    exit_now(NodeLostError(spec, lost))


def sync_after(spec: SweepSpec, tracking_url: str, store: SweepStore, records: list[Any] | None = None,
               unsent: int = 0, writer: Any = None, answering: bool | None = None
               ) -> tuple[str | None, TrackingBehind | None]:
    """The reconcile that ends run/resume/compare: (parent run URL, None), or (None, what MLflow lacks)
    when the server does not answer (or refuses); the results stay in the sweep's records. `writer`: the
    live logging's, once settled (what it sent need not be asked for again). `answering`: whether the server
    answered `/health` just now (None: asked here); one that does not is not waited for."""
    import logging

    from sweep import tracking
    from sweep.mlflow_runs.content import git_commit
    from sweep.mlflow_runs.reconcile import sync_sweep

    records = store.load_trials(spec) if records is None else records
    if answering is None:
        answering = tracking.answers_within(tracking_url, tracking.END_PROBE_S)
    failure = None
    if answering:
        try:
            return sync_sweep(store, tracking_url, spec=spec, records=records, writer=writer,
                              git=git_commit()).url, None
        except Exception as err:  # noqa: BLE001 - the sweep's results are safe on disk: say so, exit non-zero
            logging.getLogger(__name__).debug("reconcile failed", exc_info=True)
            failure = str(err).splitlines()[0][:300]
    why = tracking.failing_reason(tracking_url)  # the local server cannot start: that, not a refusal
    error = (f"the local MLflow server cannot start: {why}" if why else failure
             or f"no answer to GET /health for {tracking.END_PROBE_S:.0f} s")
    return None, TrackingBehind(tracking_url, unsent, len(records), error)

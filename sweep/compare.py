"""A fair multi-model comparison: equal tuning budgets, then every best config retrained over seeds.

For each (model, difficulty) the spec is narrowed to that model and task (same trials, scheduler, searcher
and epochs for every model) and tuned with `sweep.runner.run_sweep`. The best config of each is then
retrained once per seed as Ray tasks (`retrain_seed`, in the package so workers import it), each a child
run of one comparison parent run in MLflow. State lives in the sweep storage (sweep.store: a folder or
s3://...; the spec's storage:, --storage or $FWSWEEP_STORAGE), in the folder NAME beside its tuning sweeps:

    comparison.json   manifest: spec, tuning sweeps, best configs, MLflow parent run (rerun skips done work)
    seed_runs.jsonl   one line per finished seed run: history and final metrics
    seed_runs/        per-seed working folders (checkpoints; on the worker's own disk, $FWSWEEP_HOME/sweeps)
    report/           what `sweep report NAME` writes (also logged to the parent run under report/)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sweep import paths
from sweep.config import Difficulty, LevelBudget, SweepSpec, TrialConfig, dump_yaml
from sweep.errors import Problem, TrialDiverged, UserError
from sweep.events import Listener
from sweep.mlflow_runs import content, identity
from sweep.mlflow_runs.writer import RunWriter, rows_of
from sweep.report import SeedRun, seed_run_from_dict, seed_run_to_dict, write_report
from sweep.store import SweepStore, open_sweep

MANIFEST = "comparison.json"
SEED_RUNS = "seed_runs.jsonl"
REPORT_DIR = "report"
ROLE_TAG = identity.ROLE_TAG  # comparison | seed
VERSIONED = ("fwsweep", "torch", "ray", "optuna", "mlflow", "numpy", "scipy", "pydantic")


# ---------------------------------------------------------------------------------------------- specs


def tuning_name(spec: SweepSpec, model: str, difficulty: Difficulty) -> str:
    return f"{spec.name}.{model}.{difficulty.label}"


def tuning_spec(spec: SweepSpec, entry: str, difficulty: Difficulty) -> SweepSpec:
    """The spec narrowed to one entry (a model, or a variant: a model with settings fixed) and one
    difficulty; budget, scheduler and searcher stay the same for every entry."""
    model, fixed = spec.entry_model(entry)
    data = spec.model_dump(mode="json", exclude={"compare"})
    data["name"] = tuning_name(spec, entry, difficulty)
    data["models"] = [model]
    data["space"] = {k: v for k, v in data["space"].items() if k in ("common", model)}
    if fixed:  # a model section's constant wins over a common entry of the same name (sweep.space)
        own = {k: v for k, v in (data["space"].get(model) or {}).items() if k not in fixed}
        data["space"][model] = own | fixed
        data["description"] = f"{spec.description or spec.name}: {entry} = {model} with " + \
            ", ".join(f"{k}={v}" for k, v in fixed.items())
    data["task"] |= {"name": difficulty.task, "pairs": difficulty.pairs}
    level = _level_budget(spec, difficulty)
    if level.max_epochs is not None:
        data["budget"]["max_epochs"] = level.max_epochs
    if level.steps_per_epoch is not None:
        data["train"]["steps_per_epoch"] = level.steps_per_epoch
    data["tracking"]["experiment"] = spec.experiment
    return SweepSpec.model_validate(data)


def _level_budget(spec: SweepSpec, difficulty: Difficulty) -> LevelBudget:
    """The level's own budget (compare.level_budgets), or an empty one: the spec's budget applies."""
    return (spec.compare.level_budgets.get(difficulty.label) if spec.compare else None) or LevelBudget()


def retrain_epochs(spec: SweepSpec, difficulty: Difficulty) -> int:
    """Epochs of a level's seed runs: its own budget's, else compare.retrain_epochs, else max_epochs."""
    return _level_budget(spec, difficulty).max_epochs or \
        (spec.compare.retrain_epochs if spec.compare else None) or spec.max_epochs


def level_budgets(spec: SweepSpec) -> dict[str, dict[str, int | None]]:
    """Each level's step budget as run: tuning epochs, seed-run epochs, steps per epoch."""
    out = {}
    for difficulty in spec.difficulties():
        sub = tuning_spec(spec, spec.compared_models()[0], difficulty)
        out[difficulty.label] = {"max_epochs": sub.max_epochs, "steps_per_epoch": sub.train.steps_per_epoch,
                                 "retrain_epochs": retrain_epochs(spec, difficulty)}
    return out


def seed_config(best: TrialConfig, seed: int, epochs: int) -> TrialConfig:
    """The tuned config with another initialisation/batch-order seed; the data stay the same for all."""
    data = best.to_dict()
    data["train"] |= {"seed": seed, "epochs": epochs}
    return TrialConfig.model_validate(data)


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    name: str
    spec: dict[str, Any]
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> sweep name, best config
    git_commit: str | None = None  # of the code that ran the comparison (the report may be rewritten later)
    git_commits: list[str] = field(default_factory=list)  # every commit a run or rerun of it ran from
    started: float = field(default_factory=time.time)
    storage: str | None = None  # the sweep storage it lives in (None: $FWSWEEP_STORAGE or the default)

    @property
    def store(self) -> SweepStore:
        return open_sweep(self.name, self.storage)

    def save(self) -> None:
        self.store.write_text(MANIFEST, json.dumps(self.__dict__, indent=1))  # never half-written

    @classmethod
    def load(cls, name: str, storage: str | None = None) -> Manifest:
        store = open_sweep(name, storage)
        text = store.read_text(MANIFEST)
        if text is None:
            raise UserError(Problem(name, f"no comparison of that name in {store.storage.uri}",
                                    "run `sweep compare SPEC` first, or check the name and --storage / "
                                    "$FWSWEEP_STORAGE / FWSWEEP_HOME"))
        return cls(**json.loads(text) | {"storage": storage or json.loads(text).get("storage")})


def key(model: str, difficulty: Difficulty) -> str:
    return f"{model}/{difficulty.label}"


def load_seed_runs(name: str, storage: str | None = None) -> list[SeedRun]:
    lines = (open_sweep(name, storage).read_text(SEED_RUNS) or "").splitlines()
    return [seed_run_from_dict(json.loads(line)) for line in lines if line.strip()]


def _append_seed_run(name: str, run: SeedRun, storage: str | None = None) -> None:
    """Object stores cannot append: the file is rewritten whole (it holds one short line per seed run)."""
    store = open_sweep(name, storage)
    text = store.read_text(SEED_RUNS) or ""
    store.write_text(SEED_RUNS, text + json.dumps(seed_run_to_dict(run)) + "\n")


# ---------------------------------------------------------------------------------------------- mlflow


def _parent_run(manifest: Manifest, spec: SweepSpec) -> None:
    """Create (or reuse, on a rerun) the comparison's parent run."""
    w = RunWriter(manifest.tracking_uri)
    manifest.experiment_id = identity.experiment_id(w.client, spec.experiment)
    if manifest.parent_run_id:
        run = w.client.get_run(manifest.parent_run_id)
        if run.info.lifecycle_stage == "active":
            w.set_status(run, "RUNNING")
            return
    cmp = spec.compare
    manifest.parent_run_id = w.create_run(
        manifest.experiment_id, f"compare {spec.name}",
        {ROLE_TAG: "comparison", "comparison": spec.name, identity.SWEEP_TAG: spec.name,
         "git_commit": manifest.git_commit or "unknown", "fwsweep_version": _version("fwsweep") or "unknown"})
    params = {"models": ", ".join(spec.compared_models()),
              "difficulties": ", ".join(d.label for d in spec.difficulties()),
              "seeds": ", ".join(map(str, cmp.seed_list)), "num_samples": spec.budget.num_samples,
              "max_epochs": spec.max_epochs, "scheduler": spec.scheduler.name, "searcher": spec.searcher.name,
              "sampler": spec.searcher.sampler, "test": cmp.test, "alpha": cmp.alpha}
    w.log_params(manifest.parent_run_id, content.as_params(params))
    w.upload_text(manifest.parent_run_id, dump_yaml(spec.model_dump(mode="json")), "spec.yaml")


def _adopt_tuning_runs(manifest: Manifest, sweep_name: str) -> None:
    """Nest a tuning sweep's parent run under the comparison run (MLflow's UI nests by this tag)."""
    w = RunWriter(manifest.tracking_uri)
    parent = identity.find_parent(w.client, manifest.experiment_id, sweep_name)
    if parent is not None:
        w.set_tags(parent.info.run_id, {identity.PARENT_RUN_TAG: manifest.parent_run_id,
                                        "comparison": manifest.name}, parent.data.tags)


class MlflowSeedReporter:
    """A Reporter that keeps the history and logs each report, once per step, to the seed's child run."""

    def __init__(self, writer: RunWriter | None, run_id: str | None, restore: Path | None = None) -> None:
        self.history: list[dict[str, Any]] = []
        self.run_id = run_id
        self.restore = restore
        self.writer = writer if run_id else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.history.append(dict(metrics))
        if self.writer is not None:
            self.writer.log_rows(self.run_id, rows_of([metrics]))

    def restore_dir(self) -> Path | None:
        return self.restore


def retrain_seed(config: dict[str, Any], workdir: str, tracking_uri: str | None, experiment_id: str | None,
                 parent_run_id: str | None, tags: dict[str, str]) -> dict[str, Any]:
    """One seed run (a Ray task, or called directly): train, log to its MLflow child run, return it."""
    from sweep import testing_faults
    from sweep.checkpoint import find_checkpoint
    from sweep.train import run_trial

    trial = TrialConfig.model_validate(config)
    run_id = None
    w = RunWriter(tracking_uri) if tracking_uri else None
    if w is not None:
        run_name = f"{tags['model']} {tags['difficulty']} seed {tags['seed']}"
        run_id = w.create_run(experiment_id, run_name, tags | {ROLE_TAG: "seed"}, parent_id=parent_run_id)
        w.log_params(run_id, content.trial_params(trial.to_dict()))
        w.upload_text(run_id, dump_yaml(trial.to_dict()), "trial_config.yaml")
    # a retried or rerun seed continues from its last checkpoint (the trajectory is the same, see train.py)
    reporter = MlflowSeedReporter(w, run_id, restore=find_checkpoint(Path(workdir)))
    status = "FINISHED"
    try:  # testing_faults: the reliability tests' faults (FWSWEEP_FAULT) reach seed runs as they reach trials
        outcome = run_trial(trial, testing_faults.wrap(reporter), Path(workdir))
        result, history = outcome.status, outcome.history
    except TrialDiverged:
        result, status, history = "diverged", "FAILED", reporter.history
    except BaseException:
        if w is not None:
            w.end(run_id, "FAILED")
        raise
    if w is not None:
        w.end(run_id, status)
    final = dict(history[-1]) if history else {}
    return {"model": tags.get("model", trial.model.name), "task": trial.task.name, "pairs": trial.task.pairs,
            "seed": trial.train.seed, "status": result, "history": history, "final": final,
            "run_id": run_id}


# ---------------------------------------------------------------------------------------------- provenance


def git_commit() -> str | None:
    """The commit of the code that runs (this package's checkout), '+dirty' with local edits."""
    commit, dirty = content.git_commit(Path(__file__).resolve().parent)
    return commit and commit + ("+dirty" if dirty else "")


def clean_commit(commits: list[str]) -> bool:
    """One known commit with no local edits: the only provenance a published result can cite."""
    return len(commits) == 1 and commits[0] != "unknown" and not commits[0].endswith("+dirty")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def provenance(manifest: Manifest) -> dict[str, Any]:
    """Everything needed to rerun the comparison: spec, budgets, seeds, tuned configs, versions, commit."""
    spec = SweepSpec.model_validate(manifest.spec)
    cmp = spec.compare
    commits = manifest.git_commits or [manifest.git_commit or "unknown"]  # an older manifest: one commit
    return {
        "comparison": spec.name,
        "models": spec.compared_models(),
        "difficulties": [d.label for d in spec.difficulties()],
        "seeds": cmp.seed_list,
        "tuning_budget": {"trials": spec.budget.num_samples, "max_epochs": spec.max_epochs,
                          "scheduler": spec.scheduler.name, "searcher": f"{spec.searcher.name}/"
                          f"{spec.searcher.sampler} seed {spec.searcher.seed}",
                          "retrain_epochs": cmp.retrain_epochs or spec.max_epochs}
        | ({"level_budgets": level_budgets(spec)} if cmp.level_budgets else {}),
        "git_commit": manifest.git_commit or "unknown",
        "git_commits": commits,
        "reproducible_from_one_clean_commit": clean_commit(commits),
        "report_git_commit": git_commit() or "unknown",
        "versions": {p: _version(p) for p in VERSIONED},
        "tracking": {"uri": manifest.tracking_uri, "experiment": spec.experiment,
                     "parent_run_id": manifest.parent_run_id},
        "reproduce": "save `spec` below as a YAML file and run `sweep compare FILE`; or retrain one tuned "
                     "config with `sweep train --config best_configs/MODEL.DIFFICULTY.yaml`",
        "tuning_sweeps": {k: v["sweep"] for k, v in manifest.tuning.items()},
        "best_configs": {k: v.get("best_config") for k, v in manifest.tuning.items()},
        "spec": manifest.spec,
    }


# ---------------------------------------------------------------------------------------------- run


def run_comparison(spec: SweepSpec, *, address: str | None = None, tracking_uri: str | None = None,
                   log=print, on_event: Listener | None = None) -> list[Path]:
    """Tune every (model, difficulty) with the same budget, retrain the best over seeds, write the report.

    A rerun with the same name skips the tuning sweeps and seed runs already done (it resumes).
    `on_event` receives each tuning sweep's `sweep.events` (the live view).
    """
    from sweep.runner import driver_lock
    from sweep.tracking import tracking_server

    if spec.compare is None:
        raise UserError(Problem("compare", "the spec has no compare: section",
                                "add one (see docs/reports.md) or use `sweep run` for a single sweep"))
    check_workers_reach_tracking(address, tracking_uri or spec.tracking.uri)
    again = f"sweep compare SPEC (the same spec, {spec.name})"  # a second driver: its seeds would run twice
    with driver_lock(open_sweep(spec.name, spec.storage), again), \
            tracking_server(tracking_uri, spec_uri=spec.tracking.uri) as server:  # one for every sweep in it
        return _compare(spec, server.url, address, log, on_event)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_workers_reach_tracking(address: str | None, tracking_uri: str | None) -> None:
    """Seed runs log to MLflow from the Ray workers: refuse, before anything starts, a cluster on other
    machines (an --address / $RAY_ADDRESS host that is not loopback) with a tracking store only this
    machine can reach (the local server, a 127.0.0.1 / localhost URL, a local file or SQLite store)."""
    import os
    from urllib.parse import urlparse

    address = address or os.environ.get("RAY_ADDRESS") or ""
    head = address.rstrip("/").rpartition(":")[0]
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not head or _is_loopback(head):
        return  # a local Ray, or nodes on this machine: 127.0.0.1 reaches them all
    parsed = urlparse(uri)
    this_machine_only = (not uri or parsed.scheme in ("", "file", "sqlite")
                         or parsed.scheme in ("http", "https") and _is_loopback(parsed.hostname or ""))
    if not this_machine_only:
        return
    where = uri or "the local MLflow server (127.0.0.1)"
    raise UserError(Problem("--tracking-uri", f"the seed runs log from the Ray workers at {address}, which "
                            f"cannot reach {where}",
                            "give a tracking server every node can reach: --tracking-uri "
                            "http://MLFLOW_HOST:5000 (or the spec's tracking.uri / $MLFLOW_TRACKING_URI)"))


def _compare(spec: SweepSpec, tracking_url: str, address: str | None, log,  # noqa: ANN001
             on_event: Listener | None = None) -> list[Path]:
    from sweep.ray_watch import node_lost
    from sweep.runner import connect_ray, run_sweep, stop_ray

    store = open_sweep(spec.name, spec.storage)
    manifest = Manifest.load(spec.name, spec.storage) if store.exists(MANIFEST) else \
        Manifest(spec.name, {}, storage=spec.storage)
    if manifest.spec and manifest.spec != spec.model_dump(mode="json"):
        raise UserError(Problem(spec.name, "a different comparison with this name already exists",
                                f"give the spec another name, or {store.how_to_remove()}"))
    manifest.spec, manifest.tracking_uri = spec.model_dump(mode="json"), tracking_url
    commit = git_commit() or "unknown"
    manifest.git_commit = manifest.git_commit or commit
    manifest.git_commits = list(dict.fromkeys([*(manifest.git_commits or [manifest.git_commit]), commit]))
    if not clean_commit(manifest.git_commits):
        log(f"warning: this comparison is not reproducible from one clean commit "
            f"({', '.join(manifest.git_commits)}); its report will say so. Run it from a clean checkout "
            "(git worktree add) for results to publish.")
    _parent_run(manifest, spec)
    manifest.save()
    ray_started = False  # one Ray for every sweep and the seed runs, started only if there is work
    try:
        for difficulty in spec.difficulties():
            for model in spec.compared_models():
                k = key(model, difficulty)
                if manifest.tuning.get(k, {}).get("best_config"):
                    continue
                sub = tuning_spec(spec, model, difficulty)
                log(f"tuning {k}: {sub.budget.num_samples} trials ({sub.scheduler.name}, "
                    f"{sub.max_epochs} epochs max)")
                ray_started = connect_ray(address) or ray_started
                resume = open_sweep(sub.name, sub.storage).can_restore()  # an interrupted rerun
                manifest.tuning[k] = {"sweep": sub.name}
                manifest.save()
                result = run_sweep(sub, address=address, tracking_uri=tracking_url, resume=resume,
                                   on_event=on_event)
                _adopt_tuning_runs(manifest, sub.name)
                if result.best is None:
                    raise UserError(Problem(k, "no tuning trial finished with a result",
                                            f"check its trials with `sweep show {sub.name}`"))
                manifest.tuning[k] |= {"best_config": result.best.config.to_dict(),
                                       "best_trial": result.best.trial_id,
                                       "best_value": result.best.value(spec.metric.name)}
                manifest.save()
        _retrain_all(spec, manifest, address, log)
        files = make_report(spec.name, tracking_uri=tracking_url, storage=spec.storage)
        _sync_tuning_sweeps(spec, manifest, tracking_url, log)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        RunWriter(tracking_url).end(manifest.parent_run_id, status)
        lost = node_lost(err) or getattr(err, "lost", None)  # in the seed runs, or in a tuning sweep
        if lost is not None:
            raise UserError(Problem(
                "local Ray", f"its {lost}, so no trial or seed run can go on",
                "run the same `sweep compare` again: the tuning sweeps and seed runs that finished are "
                "kept, and an interrupted tuning sweep goes on from its checkpoints"), source="Ray") from None
        raise
    finally:
        if ray_started:
            stop_ray()
    RunWriter(tracking_url).end(manifest.parent_run_id, "FINISHED")
    return files


def _sync_tuning_sweeps(spec: SweepSpec, manifest: Manifest, tracking_url: str, log) -> None:  # noqa: ANN001
    """Bring every tuning sweep's MLflow runs level with its records (also the ones a rerun skipped)."""
    from sweep.runner import sync_after
    from sweep.store import open_storage

    for difficulty in spec.difficulties():
        for model in spec.compared_models():
            sub = tuning_spec(spec, model, difficulty)
            store = open_storage(sub.storage).sweep(sub.name)
            if store.read_spec() is None:
                continue  # not tuned yet (the comparison stopped before it)
            _, behind = sync_after(sub, tracking_url, store)
            if behind is not None:
                log(behind.message(sub.name))


def _retrain_all(spec: SweepSpec, manifest: Manifest, address: str | None, log) -> None:
    """Every (model, difficulty, seed) not yet done, as Ray tasks with the spec's per-trial resources."""
    import ray

    cmp = spec.compare
    done = {(r.model, r.task, r.pairs, r.seed) for r in load_seed_runs(spec.name, spec.storage)}
    jobs = []
    for difficulty in spec.difficulties():
        for model in spec.compared_models():
            best = TrialConfig.model_validate(manifest.tuning[key(model, difficulty)]["best_config"])
            for seed in cmp.seed_list:
                if (model, difficulty.task, difficulty.pairs, seed) in done:
                    continue
                tags = {"model": model, "task": difficulty.task, "difficulty": difficulty.label,
                        "seed": str(seed), "comparison": spec.name, "sweep": spec.name}
                workdir = paths.sweep_dir(spec.name) / "seed_runs" / f"{model}.{difficulty.label}.s{seed}"
                config = seed_config(best, seed, retrain_epochs(spec, difficulty))
                threads = config.train.num_threads or max(1, int(spec.resources.cpu))
                config.train.num_threads = threads
                config.train.device = "cuda" if spec.resources.gpu > 0 else "cpu"  # Ray gives GPUs as asked
                jobs.append((config.to_dict(), str(workdir), tags))
    if not jobs:
        return
    _close_orphans(manifest)
    log(f"retraining {len(jobs)} seed runs (best config x {len(cmp.seed_list)} seeds)")
    from sweep.ray_watch import local_node_processes
    from sweep.runner import connect_ray, stop_ray

    started = connect_ray(address)
    node = local_node_processes()  # a local Ray that loses its node ends the comparison with one message
    try:
        task = ray.remote(retrain_seed).options(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu,
                                                max_retries=max(spec.retries.max_failures, 0),
                                                retry_exceptions=spec.retries.max_failures != 0)
        limit = cmp.max_concurrent or spec.budget.max_concurrent
        pending: list[Any] = []
        for config, workdir, tags in jobs:
            while len(pending) >= limit:
                pending = _collect(spec.name, pending, log, spec.storage, node)
            pending.append(task.remote(config, workdir, manifest.tracking_uri, manifest.experiment_id,
                                       manifest.parent_run_id, tags))
        while pending:
            pending = _collect(spec.name, pending, log, spec.storage, node)
    finally:
        if started:
            stop_ray()


def _close_orphans(manifest: Manifest) -> None:
    """Seed runs a killed earlier attempt left RUNNING end as KILLED (their rerun gets a fresh run)."""
    w = RunWriter(manifest.tracking_uri)
    runs = identity.search_all(w.client, manifest.experiment_id, (
        f"tags.`{ROLE_TAG}` = 'seed' and tags.`mlflow.parentRunId` = '{manifest.parent_run_id}' "
        "and attributes.status = 'RUNNING'"))
    for run in runs:
        w.end(run.info.run_id, "KILLED")


def _collect(name: str, pending: list[Any], log, storage: str | None,  # noqa: ANN001
             node: dict[str, Any]) -> list[Any]:
    """Record the next seed run that ends (`pending` less it), or `pending` after a second without one;
    the local node's processes (`node`) are checked each second."""
    import ray

    from sweep.ray_watch import DYING_WAIT_S, check_local_ray, is_ray_system_error

    ready, rest = ray.wait(pending, num_returns=1, timeout=1.0)
    check_local_ray(node)
    if not ready:
        return pending
    try:
        record = ray.get(ready[0])
    except Exception as err:
        if not is_ray_system_error(err):
            raise
        check_local_ray(node, wait_s=DYING_WAIT_S)  # a raylet told to stop fails its tasks before it ends
        raise UserError(Problem("seed run", f"Ray lost it: {str(err).split('. ')[0]}",
                                "run the same `sweep compare` again: the seed runs that finished are kept "
                                "(or set retries.max_failures for Ray to retry a lost seed run)"),
                        source="Ray") from err
    run = seed_run_from_dict(record)
    _append_seed_run(name, run, storage)
    log(f"  {run.model} {run.difficulty} seed {run.seed}: {run.status}, test error {run.test_error_pct:.2f}%")
    return rest


# ---------------------------------------------------------------------------------------------- report


def make_report(name: str, tracking_uri: str | None = None, storage: str | None = None) -> list[Path]:
    """Write the report of comparison NAME into its folder and log it to the comparison's parent run.

    A comparison in object storage gets its report there too (report/), written first to a local copy in
    $FWSWEEP_HOME/reports/NAME; the returned paths are the local files."""
    manifest = Manifest.load(name, storage)
    spec = SweepSpec.model_validate(manifest.spec)
    if manifest.parent_run_id:
        from sweep.tracking import resolve_tracking_uri

        resolve_tracking_uri(tracking_uri, spec.tracking.uri)  # a bad URI: exit 2 before anything is written
    runs = load_seed_runs(name, manifest.storage)
    if not runs:
        raise UserError(Problem(name, "has no finished seed runs yet", "run `sweep compare` on its spec"))
    cmp = spec.compare
    store = manifest.store
    local = store.local_path()
    out = local / REPORT_DIR if local else paths.home() / "reports" / name
    files = write_report(runs, out, provenance(manifest), thresholds=cmp.thresholds, test=cmp.test,
                         alpha=cmp.alpha, title=f"Comparison {name}")
    best_dir = out / "best_configs"
    best_dir.mkdir(exist_ok=True)
    for k, v in manifest.tuning.items():
        if v.get("best_config"):
            path = best_dir / (k.replace("/", ".") + ".yaml")
            path.write_text(dump_yaml(v["best_config"]), encoding="utf-8")
            files.append(path)
    store.upload(out, REPORT_DIR)
    if manifest.parent_run_id:
        from sweep.tracking import tracking_server

        with tracking_server(tracking_uri, spec_uri=spec.tracking.uri) as server:
            RunWriter(server.url).upload_path(manifest.parent_run_id, out, REPORT_DIR)
    return files

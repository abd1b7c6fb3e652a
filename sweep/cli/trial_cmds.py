"""Commands: `train` (one trial, without Ray) and `validate` (check trial configs and sweep specs)."""

from __future__ import annotations

import contextlib
import copy
import json
import shlex
import shutil
import signal
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import typer
from rich.markup import escape

from sweep.cli import app
from sweep.cli.output import console, err_console
from sweep.cli.signals import interrupted_exit_code
from sweep.config import read_yaml_value
from sweep.errors import Problem, UserError, naming_flags
from sweep.files import write_atomic
from sweep.models.registry import model_names
from sweep.tasks.registry import task_names

# The --model/--task choices, from the registries (typer lists and checks a Literal's values)
ModelChoice = Literal[tuple(model_names())]  # type: ignore[valid-type]
TaskChoice = Literal[tuple(task_names())]  # type: ignore[valid-type]

# What `sweep train` runs without a config: FW-LSTM on a small ART (K=4). Reaches >= 97% validation
# accuracy in about 6 epochs (~500 steps, under a minute on one CPU core). Also in
# search_spaces/trials/art_k4_fw_lstm.yaml. One torch thread: with torch's default (all cores) this
# small model ran at 0.7 steps/s on a busy 2-core machine, against 10 steps/s with one thread.
DEFAULT_TRIAL: dict[str, Any] = {
    "task": {
        "name": "art",
        "pairs": 4,
        "train_size": 10_000,
        "val_size": 2_000,
        "test_size": 5_000,
        "seed": 0,
    },
    "model": {"name": "fw_lstm", "hidden_size": 50},
    "train": {
        "epochs": 30, "lr": 0.003, "batch_size": 128, "target_accuracy": 0.98, "seed": 0, "num_threads": 1
    },
}

# Flag -> (section, field) it sets.
_FLAG_FIELDS = {
    "--task": ("task", "name"),
    "--pairs": ("task", "pairs"),
    "--hidden-size": ("model", "hidden_size"),
    "--epochs": ("train", "epochs"),
    "--lr": ("train", "lr"),
    "--seed": ("train", "seed"),
    "--device": ("train", "device"),
}
# What may change when resuming (the rest would not be the same trial).
_RESUMABLE_CHANGES = {
    "epochs",
    "device",
    "cuda_graph",
    "num_threads",
    "target_accuracy",
    "keep_checkpoints",
    "eval_batch_size",
}
# Model fields every model has, kept when --model switches to another model.
_COMMON_MODEL_FIELDS = ("hidden_size", "embed_size", "head_size")


@app.command()
def train(
    config_arg: Path | None = typer.Argument(
        None, metavar="CONFIG", help="trial config YAML (same as --config)"
    ),
    config_opt: Path | None = typer.Option(
        None, "--config", "-c", metavar="CONFIG", help="trial config YAML (e.g. from `sweep export`)"
    ),
    sets: list[str] = typer.Option(
        [], "--set", metavar="SECTION.FIELD=VALUE", help="override one field (repeatable; value read as YAML)"
    ),
    model: ModelChoice | None = typer.Option(None, "--model", metavar="|".join(model_names()),
                                             help="the model to train"),
    task: TaskChoice | None = typer.Option(None, "--task", metavar="|".join(task_names()),
                                           help="the task variant"),
    pairs: int | None = typer.Option(None, "--pairs", metavar="K", help="K, key-value pairs per sequence"),
    hidden_size: int | None = typer.Option(None, "--hidden-size", metavar="R",
                                           help="R, recurrent hidden units"),
    epochs: int | None = typer.Option(None, "--epochs", metavar="N", help="maximum epochs"),
    lr: float | None = typer.Option(None, "--lr", metavar="RATE", help="learning rate"),
    seed: int | None = typer.Option(
        None, "--seed", metavar="SEED", help="seed of initialisation and batch order (train.seed)"
    ),
    device: Literal["auto", "cpu", "cuda"] | None = typer.Option(
        None, "--device", metavar="auto|cpu|cuda", help="where to train; cuda without a GPU is an error"),
    out: Path | None = typer.Option(None, "--out", metavar="PATH",
                                    help="run folder; default: FWSWEEP_HOME/train/<name>"),
    resume: Path | None = typer.Option(None, "--resume", metavar="PATH",
                                       help="continue the run in this folder"),
) -> None:
    """Train one trial (without Ray): checkpoints, metrics.json and config.yaml go to the run folder.

    Without a config it trains FW-LSTM on a small ART (K=4). Ctrl-C saves the state; `--resume DIR`
    continues exactly where it stopped.
    """
    from sweep.config import TrialConfig, dump_yaml, read_yaml, validate_as

    flags = {
        "--model": model,
        **dict(zip(_FLAG_FIELDS, (task, pairs, hidden_size, epochs, lr, seed, device), strict=True)),
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if config_arg is not None and config_opt is not None:
        raise UserError(Problem("--config", "given twice (as an argument and as --config)", "give it once"))
    config_file = config_arg or config_opt

    if resume is not None:
        if config_file is not None or out is not None:
            flag = "--config" if config_file is not None else "--out"
            raise UserError(
                Problem(
                    flag,
                    "cannot be combined with --resume (the run folder has its config)",
                    f"drop {flag}; to change the number of epochs use --epochs",
                )
            )
        restore_from = None
        if _is_checkpoint_in_run(resume):  # a checkpoint folder: continue its run from that checkpoint
            restore_from, resume = resume, resume.parent.parent
        run_dir = resume
        base = read_yaml(resume / "config.yaml") if (resume / "config.yaml").exists() else None
        if base is None:
            raise UserError(
                Problem(
                    "--resume",
                    f"{resume} holds no config.yaml: not a `sweep train` run folder",
                    "give the folder printed when the run started or stopped",
                )
            )
        source = str(resume / "config.yaml")
    else:
        base = read_yaml(config_file) if config_file is not None else copy.deepcopy(DEFAULT_TRIAL)
        source = str(config_file) if config_file is not None else "the default trial"
    data = _apply_overrides(base, given, sets)
    if config_file is not None and "models" in base:
        raise UserError(
            [
                Problem(
                    "models",
                    "unknown field: this file is a sweep spec, not a trial config",
                    f"run it with `sweep run {config_file}`, or train one of its trials from `sweep export`",
                )
            ],
            source=source,
        )
    named = {"model.name" if flag == "--model" else ".".join(_FLAG_FIELDS[flag]): f"{flag} {value}"
             for flag, value in given.items()}
    with naming_flags(named, sets):
        config = validate_as(TrialConfig, data, source)
    _check_device(config)
    if resume is not None:
        _check_resumable(base, config, resume)
    else:
        run_dir = out if out is not None else _default_run_dir(config)
        _check_fresh(run_dir, out is not None)

    _train(config, run_dir, resume is not None, dump_yaml(config.to_dict()),
           restore_from if resume is not None else None)


@app.command()
def validate(
    files: list[Path] = typer.Argument(
        ..., metavar="FILE", help="trial configs and/or sweep specs (a spec has `models:`)"
    ),
) -> None:
    """Check files without running anything: every problem in every file at once (exit 2), else a summary."""
    from sweep.config import SweepSpec, TrialConfig, load_spec, load_trial_config, read_yaml

    errors: list[UserError] = []
    for path in files:
        try:
            data = read_yaml(path)
            # a spec has `models:` or another key only a spec has (so a spec missing `models` says so)
            if "models" in data or set(data) & (set(SweepSpec.model_fields) - set(TrialConfig.model_fields)):
                spec = load_spec(path)
                summary = (
                    f"sweep spec '{spec.name}': {', '.join(spec.models)} on {spec.task.difficulty}, "
                    f"{spec.budget_text()}, "
                    f"searcher {spec.searcher.name}/{spec.searcher.sampler}, scheduler {spec.scheduler.name}"
                )
            else:
                cfg = load_trial_config(path)
                summary = (
                    f"trial config: {cfg.model.name} (hidden_size {cfg.model.hidden_size}) on "
                    f"{cfg.task.difficulty}, {cfg.train.epochs} epochs, lr {cfg.train.lr:g}, "
                    f"seed {cfg.train.seed}"
                )
            console.print(f"[green]ok[/] {escape(f'{path}: {summary}')}", soft_wrap=True)
        except UserError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        problems = [
            Problem(
                p.where if not e.source or p.where.startswith(e.source) else f"{e.source}: {p.where}",
                p.message,
                p.fix,
            )
            for e in errors
            for p in e.problems
        ]
        raise UserError(problems, source=f"{len(errors)} of {len(files)} files")


# ------------------------------------------------------------------------------------------ helpers


def _apply_overrides(base: dict[str, Any], flags: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """The config mapping with the shortcut flags, then each --set, applied (later wins)."""
    data = copy.deepcopy(base)
    for flag, value in flags.items():
        if flag == "--model":
            old = data.get("model") if isinstance(data.get("model"), dict) else {}
            if old.get("name") != value:  # another model: keep only the fields every model has
                data["model"] = {"name": value, **{k: old[k] for k in _COMMON_MODEL_FIELDS if k in old}}
            continue
        section, field = _FLAG_FIELDS[flag]
        _section(data, section, flag)[field] = value
    for item in sets:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise UserError(
                Problem(
                    f"--set {item}",
                    "expected section.field=value",
                    "e.g. --set train.lr=0.001 or --set model.fast_lr=0.5",
                )
            )
        value = read_yaml_value(raw, f"--set {item}")
        _section(data, parts[0], f"--set {item}")[parts[1]] = value
    return data


def _check_device(config: Any) -> None:
    """An explicit `cuda` that is not there is refused (exit 2) rather than quietly training on the CPU;
    `auto` (the default) takes a GPU when there is one."""
    if config.train.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(Problem("train.device", "is cuda but no CUDA GPU is visible here",
                                "use --device auto (a GPU when there is one) or --device cpu"))


def _section(data: dict[str, Any], name: str, flag: str) -> dict[str, Any]:
    section = data.setdefault(name, {})
    if not isinstance(section, dict):
        raise UserError(Problem(name, f"must be a mapping to apply {flag}", f"fix `{name}:` in the config"))
    return section


def _check_resumable(base: dict[str, Any], config: Any, run_dir: Path) -> None:
    from sweep.config import TrialConfig, validate_as

    saved = validate_as(TrialConfig, base, str(run_dir / "config.yaml")).to_dict()
    now = config.to_dict()
    problems = [
        Problem(
            f"{section}.{name}",
            f"cannot change when resuming ({saved[section].get(name)!r} -> {value!r})",
            f"start a new run instead; only train.{', train.'.join(sorted(_RESUMABLE_CHANGES))} may change",
        )
        for section in ("task", "model", "train")
        for name, value in now[section].items()
        if saved[section].get(name) != value and not (section == "train" and name in _RESUMABLE_CHANGES)
    ]
    if problems:
        raise UserError(problems, source=f"--resume {run_dir}")


def _default_run_dir(config: Any) -> Path:
    from sweep.paths import check_home, train_dir

    check_home()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return train_dir() / f"{config.model.name}-{config.task.difficulty}-{stamp}"


def _check_fresh(run_dir: Path, explicit: bool) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        what = "is a file" if not run_dir.is_dir() else "already holds files"
        raise UserError(
            Problem(
                "--out" if explicit else str(run_dir),
                f"{run_dir} {what}",
                "choose a new folder, or continue that run with "
                f"`sweep train --resume {shlex.quote(str(run_dir))}`",
            )
        )


class _RunFolderReporter:
    """Keeps metrics.json in the run folder current and prints one line per epoch."""

    def __init__(
        self,
        run_dir: Path,
        restore: Path | None,
        history: list[dict[str, Any]],
        total_epochs: int,
        print_line: Any,
    ) -> None:
        self.run_dir, self._restore, self.history = run_dir, restore, history
        self.total_epochs, self.print_line = total_epochs, print_line
        self.status = "running"

    def restore_dir(self) -> Path | None:
        return self._restore

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.history = [h for h in self.history if h["epoch"] < metrics["epoch"]] + [dict(metrics)]
        self.write()
        line = (
            f"epoch {metrics['epoch']:>3}/{self.total_epochs}  step {metrics['step']:>7}  "
            f"loss {metrics['train_loss']:.4f}  val loss {metrics['val_loss']:.4f}  "
            f"val acc {metrics['val_accuracy']:.2%}  {metrics['steps_per_s']:.0f} steps/s"
        )
        if "test_accuracy" in metrics:
            line += f"  test acc {metrics['test_accuracy']:.2%}"
        self.print_line(line)

    def write(self) -> None:
        final = self.history[-1] if self.history else {}
        body = {"status": self.status, "final": final, "history": self.history}
        write_atomic(self.run_dir / "metrics.json", json.dumps(body, indent=1) + "\n")


def _is_checkpoint_in_run(path: Path) -> bool:
    from sweep.checkpoint import CHECKPOINTS, is_checkpoint

    return is_checkpoint(path) and path.parent.name == CHECKPOINTS


RUN_LOCK = ".train.lock"  # held (an OS file lock) by the process training a run folder; gone with it


def _hold_run_lock(held: contextlib.ExitStack, run_dir: Path, flag: str) -> None:
    """Held (in `held`) while this process trains `run_dir`: a second `sweep train --resume` of a run being
    trained would load, save and prune the same checkpoints beside it."""
    from sweep.locks import LockHeld, process_lock

    try:
        held.enter_context(process_lock(run_dir / RUN_LOCK))
    except LockHeld:
        raise UserError(Problem(flag, f"{run_dir} is being trained by another process (it holds the run's "
                                f"{RUN_LOCK})", "let it finish, or stop it (Ctrl-C there), then "
                                f"`sweep train --resume {shlex.quote(str(run_dir))}`")) from None


def _train(config: Any, run_dir: Path, resuming: bool, config_yaml: str, restore_from: Path | None) -> None:
    with contextlib.ExitStack() as held:  # the run's lock, from the moment the folder exists
        _train_holding(config, run_dir, resuming, config_yaml, restore_from, held)


def _train_holding(config: Any, run_dir: Path, resuming: bool, config_yaml: str, restore_from: Path | None,
                   held: contextlib.ExitStack) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sweep.checkpoint import find_checkpoint, load_resumable
    from sweep.errors import TrialDiverged
    from sweep.train import TrialInterrupted, run_trial, steps_per_epoch

    created = not run_dir.exists()
    restore, history = None, []
    if resuming:
        _hold_run_lock(held, run_dir, "--resume")  # before its checkpoints are read
        restore = restore_from or find_checkpoint(run_dir)
        if restore is None:
            raise UserError(
                Problem("--resume", f"{run_dir} holds no checkpoint yet", "start a new run instead")
            )
        history = load_resumable(restore)[1]["history"]  # a damaged checkpoint stops here: nothing written
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            _hold_run_lock(held, run_dir, "--out")
        write_atomic(run_dir / "config.yaml", config_yaml)
    except OSError as err:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise UserError(Problem("--out" if not resuming else "--resume", f"cannot write to {run_dir} ({err})",
                                "choose a folder you can write to")) from None

    total = config.train.epochs * steps_per_epoch(config)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  val acc {task.fields[val]}  {task.fields[speed]} steps/s"),
        TimeElapsedColumn(),
    )
    stop = threading.Event()
    console.print(
        f"training {config.model.name} on {config.task.difficulty} "
        f"({'resuming' if resuming else 'new run'}) -> {run_dir}",
        soft_wrap=True, markup=False,
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("train", total=total, loss="-", val="-", speed="-")
        def print_line(text: str) -> None:
            progress.console.print(text, soft_wrap=True, markup=False)

        reporter = _RunFolderReporter(run_dir, restore, history, config.train.epochs, print_line)
        last = {"t": time.perf_counter(), "step": None}

        def on_step(step: int, epoch: int, loss: float) -> None:
            now = time.perf_counter()
            fields: dict[str, Any] = {"loss": f"{loss:.4f}"}
            if last["step"] is not None and now > last["t"] and step > last["step"]:
                fields["speed"] = f"{(step - last['step']) / (now - last['t']):.0f}"
            if reporter.history:
                fields["val"] = f"{reporter.history[-1]['val_accuracy']:.2%}"
            last.update(t=now, step=step)
            progress.update(bar, completed=step, description=f"epoch {epoch}/{config.train.epochs}", **fields)

        def on_sigint(signum: int, frame: Any) -> None:
            if stop.is_set():  # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            stop.set()
            progress.console.print(
                "[yellow]stopping after this step and saving the state (Ctrl-C again "
                "to abort without saving)[/]",
                soft_wrap=True,
            )

        # Ctrl-C sets `stop` (the loop saves after the current step); only the main thread may do this.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.showwarning = lambda message, *_args, **_kw: progress.console.print(
                    f"[yellow]warning[/]: {escape(str(message))}"
                )
                outcome = run_trial(config, reporter, run_dir, on_step=on_step, stop=stop)
        except TrialInterrupted as info:
            reporter.status = "interrupted"
            reporter.write()
            progress.stop()
            err_console.print(
                f"[yellow]interrupted[/]: state saved to {escape(str(info.checkpoint_dir))}\n"
                f"resume with: sweep train --resume {escape(shlex.quote(str(run_dir)))}",
                soft_wrap=True,
            )
            raise typer.Exit(interrupted_exit_code()) from None
        except TrialDiverged as err:
            reporter.status = "diverged"
            reporter.write()
            progress.stop()
            err_console.print(f"[bold red]diverged[/]: {escape(str(err))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except UserError:
            if created and find_checkpoint(run_dir) is None:  # nothing trained: leave nothing behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
    reporter.history = outcome.history
    reporter.status = outcome.status
    reporter.write()
    m = outcome.metrics
    console.print(
        f"[bold]{outcome.status}[/] after {m.get('epoch')} epochs ({m.get('step')} steps, "
        f"{m.get('elapsed_s', 0):.0f} s): test accuracy [bold]{m.get('test_accuracy', float('nan')):.2%}[/] "
        f"(best val {outcome.best_val_accuracy:.2%})\nrun folder: {escape(str(run_dir))}",
        soft_wrap=True,
    )

"""Every configuration the user writes, as pydantic models, checked before anything starts.

Two documents:
- `TrialConfig` (task + model + train): one training run. `sweep train --config` reads it and
  `sweep export` writes it, so an exported config re-runs exactly.
- `SweepSpec` (a file in `search_spaces/`): a base TrialConfig plus the search space, searcher, scheduler,
  budget, resources, retries and tracking of a sweep.
"""

from __future__ import annotations

import builtins
import copy
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializeAsAny,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sweep.errors import Problem, UserError, did_you_mean
from sweep.models.params import ModelParams
from sweep.models.registry import MODELS, model_names, params_class
from sweep.safe_yaml import parse_yaml, read_yaml_file
from sweep.strict_numbers import refuse_yes_no
from sweep.tasks.registry import task_names

# Bounds on what a spec may ask for: far above any real sweep, low enough that a typo (an extra zero, a
# stray exponent) is refused before anything starts rather than queueing a sweep that never ends.
MAX_TRIALS = 10_000
MAX_EPOCHS = 100_000
MAX_TRAIN_SIZE = 10_000_000  # generated sequences held in memory
MAX_EVAL_SIZE = 1_000_000

NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
NAME_IN_WORDS = ("starts with a letter or digit and holds only letters, digits, '_', '.' and '-' "
                 "(at most 100 characters), e.g. art-quick")


def check_name(value: str, what: str = "name") -> str:
    """A sweep name is a folder name on every storage: a rule said in words, not as a regex."""
    if not value.strip():
        raise ValueError(f"{what} is empty; give a name that {NAME_IN_WORDS}")
    if not NAME_RULE.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid {what}: use one that {NAME_IN_WORDS}")
    return value


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default. A yes/no value is not a
    number (YAML reads `yes` as true, which pydantic would otherwise take as 1), and neither is NaN or
    infinity (`.nan`, `inf`: a field without bounds took them, and a bounded one said "should be less than
    or equal to 10" of a NaN)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        return refuse_yes_no(cls, info.field_name, v)


# ---------------------------------------------------------------------------------------------- trial


class TaskConfig(Strict):
    name: str = Field("art", description="art (Ba et al.) or mart (keys first, then values)")
    pairs: int = Field(4, ge=1, description="K, key-value pairs per sequence (the difficulty knob)")
    num_keys: int = Field(26, ge=1, le=1000, description="size of the key alphabet (letters a-z)")
    num_values: int = Field(10, ge=2, le=1000, description="size of the value alphabet (digits 0-9)")
    train_size: int = Field(100_000, ge=1, le=MAX_TRAIN_SIZE)
    val_size: int = Field(10_000, ge=1, le=MAX_EVAL_SIZE)
    test_size: int = Field(20_000, ge=1, le=MAX_EVAL_SIZE)
    seed: int = Field(0, ge=0, description="data seed: the same seed gives the same data everywhere")

    @field_validator("name")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in task_names():
            raise ValueError(f"unknown task {v!r}{did_you_mean(v, task_names())}; use one of: "
                             f"{', '.join(task_names())}")
        return v

    @model_validator(mode="after")
    def _enough_keys(self) -> TaskConfig:
        if self.pairs > self.num_keys:
            raise ValueError(
                f"pairs={self.pairs} needs at least that many distinct keys but num_keys={self.num_keys}; "
                "lower pairs or raise num_keys"
            )
        return self

    @property
    def difficulty(self) -> str:
        return f"{self.name}-K{self.pairs}"


class TrainConfig(Strict):
    lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate")
    batch_size: int = Field(128, ge=1, le=65536)
    epochs: int = Field(20, ge=1, le=MAX_EPOCHS,
                        description="maximum epochs; one report (and evaluation) per epoch")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="optimizer steps between evaluations; default: one pass over train_size"
    )
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")
    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="stop early once validation accuracy reaches this"
    )
    seed: int = Field(0, ge=0, description="seed of initialisation and batch order")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cuda_graph: bool = Field(
        True, description="on CUDA, replay each train step as one captured CUDA graph (the same kernels, "
        "launched at once: the step is otherwise bound by launching ~1,000 small kernels); CPU: no effect"
    )
    eval_batch_size: int = Field(2048, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per trial (older ones deleted)")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default: what Ray assigned")


def _coerce_model(value: Any) -> ModelParams:
    """Pick the model's own params class by `name`, so unknown or misplaced fields are caught."""
    if isinstance(value, ModelParams):
        return value
    if not isinstance(value, dict):
        raise ValueError("must be a mapping with at least `name:`")
    name = value.get("name")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}{did_you_mean(str(name), model_names())}; use one of: "
                         f"{', '.join(model_names())}")
    return params_class(name).model_validate(value)


class TrialConfig(Strict):
    """One training run: what `sweep train` runs and what `sweep export` writes."""

    task: TaskConfig = Field(default_factory=TaskConfig)
    model: SerializeAsAny[ModelParams] = Field(default_factory=lambda: params_class("fw_lstm")())
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> ModelParams:
        return _coerce_model(v)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------- space


class Distribution(Strict):
    """One searchable hyperparameter; exactly one of the keys is set. A plain value means 'fixed'."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    # builtins.int: inside this class the name `int` is the field below, not the type
    int: tuple[builtins.int, builtins.int] | None = None
    logint: tuple[builtins.int, builtins.int] | None = None
    choice: list[Any] | None = None
    step: float | None = Field(None, gt=0, description="quantisation step for uniform/int")

    @field_validator("uniform", "loguniform", "int", "logint", mode="before")
    @classmethod
    def _bounds_are_numbers(cls, v: Any) -> Any:
        if isinstance(v, list | tuple) and any(isinstance(x, bool) for x in v):
            raise ValueError("a bound is a yes/no value, not a number (YAML reads yes/no/on/off/true/false "
                             "as booleans); write numbers")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        kinds = [
            k for k in ("uniform", "loguniform", "int", "logint", "choice") if getattr(self, k) is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of uniform: [lo, hi], loguniform: [lo, hi], int: [lo, hi], "
                "logint: [lo, hi] or choice: [...]" + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        kind = kinds[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice: needs at least one value")
            return self
        lo, hi = getattr(self, kind)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{kind}: bounds must be finite numbers")
        if lo > hi:
            raise ValueError(f"{kind}: [{lo}, {hi}] is inverted; write the lower bound first")
        if kind in ("loguniform", "logint") and lo <= 0:
            raise ValueError(f"{kind}: a log range needs a lower bound > 0 (got {lo})")
        return self

    @property
    def kind(self) -> str:
        return next(
            k for k in ("uniform", "loguniform", "int", "logint", "choice") if getattr(self, k) is not None
        )

    def values(self) -> list[Any]:
        """The bounds or choices, to check them against the target field's own constraints."""
        return list(self.choice) if self.kind == "choice" else list(getattr(self, self.kind))


def _param_kind(value: Any) -> str:
    return "distribution" if isinstance(value, dict | Distribution) else "fixed"


# A mapping is a distribution to search; anything else is a fixed value (one clear error either way).
ParamSpec = Annotated[
    Annotated[Distribution, Tag("distribution")] | Annotated[int | float | str | bool, Tag("fixed")],
    Discriminator(_param_kind),
]


# What every trial reports each epoch that a sweep can rank trials by, and the direction that is better
# (sweep/train.py's Trial.end_epoch reports them; a test holds the two together).
RANKABLE_METRICS = {"val_accuracy": "max", "best_val_accuracy": "max", "val_loss": "min", "train_loss": "min"}


class Metric(Strict):
    name: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"

    @field_validator("name")
    @classmethod
    def _reported(cls, v: str) -> str:
        if v not in RANKABLE_METRICS:
            raise ValueError(f"{v!r} is not a metric the trials report{did_you_mean(v, RANKABLE_METRICS)}; "
                             f"use one of: {', '.join(RANKABLE_METRICS)}")
        return v

    @model_validator(mode="after")
    def _direction(self) -> Metric:
        better = RANKABLE_METRICS[self.name]
        if self.mode != better:
            raise ValueError(f"mode: {self.mode} would rank the worst {self.name} first; "
                             f"use mode: {better}")
        return self


class SearcherConfig(Strict):
    name: Literal["optuna", "random"] = Field(
        "optuna", description="optuna (OptunaSearch); 'random' is Tune's basic variant generator"
    )
    sampler: Literal["tpe", "random", "cmaes", "gp", "qmc"] = "tpe"
    seed: int = Field(0, ge=0)
    n_startup_trials: int | None = Field(None, ge=0, description="random trials before TPE/GP model")


class SchedulerConfig(Strict):
    name: Literal["asha", "hyperband", "median", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(3, gt=1)
    brackets: int = Field(1, ge=1)
    bootstrap_count: int = Field(
        0, ge=0, description="ASHA: a trial that reaches a rung before this many others have is stopped "
        "there (Optuna's bootstrap_count); 0, Ray's ASHA: the first trial at each rung always goes on")


class BudgetConfig(Strict):
    num_samples: int = Field(8, ge=1, description="trials to run")
    max_epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS,
                                   description="epochs per trial; default: train.epochs")
    time_budget_s: float | None = Field(None, gt=0, description="stop starting trials after this long")
    max_concurrent: int = Field(2, ge=1, le=MAX_TRIALS, description="trials running at once")
    target: float | None = Field(
        None, allow_inf_nan=False,
        description="end the sweep at the first report whose metric reaches this (>= when the metric is "
        "maximised, <= when minimised): running trials stop, no new ones start"
    )

    @field_validator("num_samples")
    @classmethod
    def _sane_trials(cls, v: int) -> int:
        if v > MAX_TRIALS:
            raise ValueError(f"{v:,} trials is more than the {MAX_TRIALS:,} a sweep may run (each trial "
                             "keeps a folder and an MLflow run); lower num_samples, or split the search")
        return v


class ResourcesConfig(Strict):
    cpu: float = Field(1, gt=0, description="CPUs per trial")
    gpu: float = Field(0, ge=0, description="GPUs per trial: a fraction in [0, 1] packs trials on one GPU")

    @field_validator("gpu")
    @classmethod
    def _gpu_fraction(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(
                f"gpu={v}: above 1 a trial must ask for whole GPUs; use a fraction <= 1 or an integer"
            )
        return v


class RetriesConfig(Strict):
    max_failures: int = Field(0, ge=-1, description="retries of a failed trial from its last checkpoint")


class TrackingConfig(Strict):
    experiment: str | None = Field(None, description="MLflow experiment; default: the sweep name")
    uri: str | None = Field(None, description="MLflow server URL; default: start/reuse the local server")

    @field_validator("experiment", "uri")
    @classmethod
    def _not_blank(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(f"is empty; give a value, or leave out `{info.field_name}:` for the default")
        return v


class Difficulty(Strict):
    """One difficulty level of a comparison: a task variant and its number of key-value pairs."""

    task: str = Field(description="art or mart")
    pairs: int = Field(ge=1, description="K, key-value pairs per sequence")

    @property
    def label(self) -> str:
        return f"{self.task}-K{self.pairs}"


LEVEL_PATTERN = re.compile(r"^(?P<task>[a-z_]+)-K(?P<pairs>\d+)$")


class LevelBudget(Strict):
    """One level's own step budget in a comparison, for every entry alike (tuning trials and seed runs):
    a harder level may need more steps before anything is learned."""

    max_epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS, description="epochs of its tuning trials and "
                                   "seed runs; default: the spec's (compare.retrain_epochs for seed runs)")
    steps_per_epoch: int | None = Field(None, ge=1, description="optimizer steps per epoch (an evaluation "
                                        "after each); default: the spec's train.steps_per_epoch")


class CompareSpec(Strict):
    """`compare:` section: a fair multi-model comparison (equal tuning budget, several seeds)."""

    models: list[str] | None = Field(None, description="models (or variant labels) to compare; default: the "
                                     "spec's `models`")
    variants: dict[str, dict[str, Any]] = Field(
        {}, description="extra entries LABEL: {model: NAME, FIELD: VALUE, ...}: a listed model with some "
        "model settings fixed (e.g. a smaller hidden_size for an equal-parameter comparison); "
        "name LABEL in models")
    tasks: list[str] | None = Field(None, description="task variants (art, mart); default: task.name")
    pairs: list[int] | None = Field(None, description="difficulty levels K; default: task.pairs")
    levels: list[str] | None = Field(None, description="difficulty levels as TASK-KN (art-K8, mart-K4), when "
                                     "they are not every task x pairs; instead of tasks and pairs")
    level_budgets: dict[str, LevelBudget] = Field(
        {}, description="LEVEL: {max_epochs: N, steps_per_epoch: S}: a level's own step budget (LEVEL as in "
        "levels, e.g. mart-K4), the same for every entry; other levels keep the spec's")
    seeds: int | list[int] = Field(5, description="retraining seeds of each best config: a count or a list")
    retrain_epochs: int | None = Field(None, ge=1, description="epochs of each seed run; default: max_epochs")
    thresholds: list[float] = Field([0.95, 0.99], description="val accuracies whose steps-to-reach we report")
    test: Literal["welch", "mannwhitney"] = Field("welch", description="significance test against the best")
    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise error rate (Holm-Bonferroni)")
    max_concurrent: int | None = Field(None, ge=1, description="seed runs at once; default: budget's")

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[str] | None) -> list[str] | None:
        for level in v or []:
            match = LEVEL_PATTERN.match(level)
            if not match or match["task"] not in task_names() or int(match["pairs"]) < 1:
                raise ValueError(f"{level!r} is not TASK-KN with TASK one of "
                                 f"{', '.join(task_names())} and N >= 1; write e.g. art-K8")
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("give at least one level, each once")
        return v

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str] | None) -> list[str] | None:
        unknown = [t for t in v or [] if t not in task_names()]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; use any of: {', '.join(task_names())}")
        return v

    @field_validator("pairs")
    @classmethod
    def _positive_pairs(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError("pairs: give at least one level, each >= 1")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int]) -> int | list[int]:
        seeds = list(range(v)) if isinstance(v, int) else v
        if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError("seeds: need at least 2 distinct seeds >= 0 for a confidence interval")
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: list[float]) -> list[float]:
        if any(not 0 < t <= 1 for t in v):
            raise ValueError("thresholds: accuracies must be in (0, 1]")
        if len(set(v)) != len(v):  # each is a column of the report's tables: twice is a mistake
            twice = sorted({t for t in v if v.count(t) > 1})
            raise ValueError(f"thresholds: {twice} given twice; list each once ([] for no steps-to-reach "
                             "columns)")
        return v

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


class SweepSpec(Strict):
    """A search-space file. Every field is checked before Ray starts."""

    name: str = Field(description="sweep name, used on disk: one that " + NAME_IN_WORDS)
    description: str = ""
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    metric: Metric = Field(default_factory=Metric)
    models: list[str] = Field(min_length=1, description="the models to search over (a categorical choice)")
    space: dict[str, dict[str, ParamSpec]] = Field(
        default_factory=dict, description="'common' and one section per model: param -> distribution"
    )
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    retries: RetriesConfig = Field(default_factory=RetriesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: str | None = Field(None, description="where sweeps live: a folder or s3://BUCKET/PREFIX "
                                "(gs://...); default: $FWSWEEP_STORAGE, else $FWSWEEP_HOME/sweeps")
    compare: CompareSpec | None = Field(None, description="a fair multi-model comparison (`sweep compare`)")

    @field_validator("name")
    @classmethod
    def _name_in_words(cls, v: str) -> str:
        return check_name(v, "sweep name")

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in MODELS]
        if unknown:
            hints = "".join(did_you_mean(str(m), model_names()) for m in unknown)
            raise ValueError(f"unknown model(s) {unknown}{hints}; use any of: {', '.join(model_names())}")
        if len(set(v)) != len(v):
            raise ValueError("a model is listed twice")
        return v

    @property
    def max_epochs(self) -> int:
        return self.budget.max_epochs or self.train.epochs

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def budget_text(self) -> str:
        """The budget in words, for summaries: '8 trials of up to 12 epochs (until val_accuracy >= 0.99)'."""
        until = f" (until {self.metric.name} {'>=' if self.metric.mode == 'max' else '<='} " \
            f"{self.budget.target:g})" if self.budget.target is not None else ""
        return f"{self.budget.num_samples} trials of up to {self.max_epochs} epochs{until}"

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        problems = space_problems(self)
        if self.scheduler.name in ("asha", "hyperband") and self.scheduler.grace_period > self.max_epochs:
            problems.append(
                f"scheduler.grace_period: {self.scheduler.grace_period} exceeds the {self.max_epochs} "
                "epochs a trial runs (budget.max_epochs or train.epochs); lower grace_period"
            )
        problems += _bootstrap_problems(self)
        target = self.budget.target
        if target is not None and "accuracy" in self.metric.name and not 0 < target <= 1:
            problems.append(f"budget.target: {target} is not an accuracy; {self.metric.name} is in [0, 1], "
                            "e.g. target: 0.99")
        if self.compare is not None:
            problems += compare_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def difficulties(self) -> list[Difficulty]:
        """The comparison's difficulty levels (`levels`, or task x pairs); the spec's own task by default."""
        cmp = self.compare or CompareSpec()
        if cmp.levels:
            return [Difficulty(task=m["task"], pairs=int(m["pairs"]))
                    for m in map(LEVEL_PATTERN.match, cmp.levels) if m]
        return [
            Difficulty(task=t, pairs=k)
            for t in (cmp.tasks or [self.task.name])
            for k in (cmp.pairs or [self.task.pairs])
        ]

    def compared_models(self) -> list[str]:
        """The comparison's entries: model names and variant labels."""
        return (self.compare.models if self.compare and self.compare.models else None) or list(self.models)

    def entry_model(self, entry: str) -> tuple[str, dict[str, Any]]:
        """(model name, fixed model settings) of a comparison entry: a model, or a variant of one."""
        variant = dict((self.compare.variants if self.compare else {}).get(entry) or {})
        return (variant.pop("model"), variant) if variant else (entry, {})


def _bootstrap_problems(spec: SweepSpec) -> list[str]:
    count = spec.scheduler.bootstrap_count
    if not count:
        return []
    if spec.scheduler.name != "asha":
        return [f"scheduler.bootstrap_count: only ASHA has it (scheduler.name is {spec.scheduler.name}); "
                "remove it or use name: asha"]
    if count >= spec.budget.num_samples:
        return [f"scheduler.bootstrap_count: {count} would stop every one of the {spec.budget.num_samples} "
                "trials (budget.num_samples) at the first rung; keep it well below num_samples (e.g. 1)"]
    return []


def compare_problems(spec: SweepSpec) -> list[str]:
    """The compare section must name listed models and feasible difficulty levels."""
    assert spec.compare is not None
    problems = []
    cmp = spec.compare
    extra = [m for m in cmp.models or [] if m not in spec.models and m not in cmp.variants]
    if extra:
        problems.append(f"compare.models: {extra} are neither in the spec's models {spec.models} nor "
                        "compare.variants; add them there")
    if cmp.models is not None and len(set(cmp.models)) != len(cmp.models):
        problems.append("compare.models: a model is listed twice")
    problems += [p for label, v in cmp.variants.items() for p in _variant_problems(spec, label, v)]
    if cmp.levels and (cmp.tasks or cmp.pairs):
        problems.append("compare.levels: give either levels or tasks and pairs, not both; remove one")
    problems += _level_budget_problems(spec)
    levels = [d.pairs for d in spec.difficulties()] if cmp.levels else cmp.pairs or []
    too_many = [k for k in levels if k > spec.task.num_keys]
    if too_many:
        field = "levels" if cmp.levels else "pairs"
        problems.append(f"compare.{field}: K={too_many} exceed task.num_keys={spec.task.num_keys}; "
                        "lower them")
    return problems


def _level_budget_problems(spec: SweepSpec) -> list[str]:
    """A level budget names a compared level, changes something, and leaves ASHA its grace period."""
    assert spec.compare is not None
    labels = [d.label for d in spec.difficulties()]
    problems = []
    for label, budget in spec.compare.level_budgets.items():
        where = f"compare.level_budgets.{label}"
        if label not in labels:
            problems.append(f"{where}: not a level of this comparison ({', '.join(labels)}); use one of them")
        elif budget.max_epochs is None and budget.steps_per_epoch is None:
            problems.append(f"{where}: empty; give max_epochs and/or steps_per_epoch, or remove it")
        elif budget.max_epochs is not None and spec.scheduler.name in ("asha", "hyperband") and \
                spec.scheduler.grace_period > budget.max_epochs:
            problems.append(f"{where}.max_epochs: {budget.max_epochs} is below scheduler.grace_period "
                            f"({spec.scheduler.grace_period}); raise it or lower grace_period")
    return problems


def _variant_problems(spec: SweepSpec, label: str, variant: dict[str, Any]) -> list[str]:
    """A variant is a listed model with constant model settings, under a label usable in sweep names."""
    where = f"compare.variants.{label}"
    if label in MODELS or len(label) > 40 or not NAME_RULE.fullmatch(label):  # it goes into sweep names
        return [f"{where}: a label is letters, digits, '_', '.', '-' (at most 40) and not a model's name; "
                "rename it, e.g. fw_lstm-R20"]
    model = variant.get("model")
    if model is None:
        return [f"{where}.model: missing; a variant names the model it varies: model: {spec.models[0]}"]
    if model not in spec.models:
        return [f"{where}.model: {model!r} is not in the spec's models {spec.models}; name one of them"]
    if label not in (spec.compare.models or []):
        return [f"{where}: defined but not compared; list {label} in compare.models (or remove it)"]
    problems = []
    fields = params_class(model).model_fields
    for name, value in variant.items():
        if name == "model":
            continue
        if name not in fields or name == "name":
            hint = did_you_mean(name, [f for f in fields if f != "name"])
            problems.append(f"{where}.{name}: not a setting of {model}{hint}; use one of its model fields")
        elif isinstance(value, dict | list):
            problems.append(f"{where}.{name}: a variant fixes a setting to one value; write a number or word")
    if not problems:
        try:  # the fixed settings must make a valid model
            params_class(model).model_validate({k: v for k, v in variant.items() if k != "model"})
        except ValidationError as err:
            problems += [f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    return problems


# Where a short space name lands in the trial config. Model fields win only for model sections.
def resolve_param(name: str, model: str | None) -> tuple[str, str] | None:
    """Map a space key ('lr', 'fast_lr', 'train.lr') to (section, field) of TrialConfig, or None."""
    if "." in name:
        section, field = name.split(".", 1)
        fields = _section_fields(section, model)
        return (section, field) if fields is not None and field in fields else None
    model_fields = params_class(model).model_fields if model else ModelParams.model_fields
    if name in model_fields and name != "name":
        return ("model", name)
    if name in TrainConfig.model_fields:
        return ("train", name)
    return None


def _section_fields(section: str, model: str | None) -> dict[str, Any] | None:
    if section == "train":
        return TrainConfig.model_fields
    if section == "task":
        return TaskConfig.model_fields
    if section == "model":
        return params_class(model).model_fields if model else ModelParams.model_fields
    return None


# Fields a sweep sets itself: searching them would run one thing and record another.
RESERVED: dict[tuple[str, str], str] = {
    ("model", "name"): "the model is chosen by `models:`; list the models there",
    ("train", "epochs"): "a trial's epochs are budget.max_epochs; set that instead",
    ("train", "device"): "a sweep trial runs where Ray places it; ask for GPUs with resources.gpu",
}


def space_problems(spec: SweepSpec) -> list[str]:
    """Every inconsistency between `space` and the models, collected rather than stopping at the first."""
    problems: list[str] = []
    for section, params in spec.space.items():
        if section != "common" and section not in spec.models:
            problems.append(
                f"space.{section}: not a listed model{did_you_mean(section, spec.models)}; sections are "
                f"'common' or one of {spec.models}"
            )
            continue
        models = spec.models if section == "common" else [section]
        for pname, dist in params.items():
            reserved = RESERVED.get(tuple(pname.split(".", 1))) or RESERVED.get(("model", pname))
            if reserved:
                problems.append(f"space.{section}.{pname}: cannot be searched or fixed here: {reserved}")
                continue
            for model in models:
                target = resolve_param(pname, model)
                if target is None:
                    known = sorted(
                        (set(params_class(model).model_fields) | set(TrainConfig.model_fields)) - {"name"}
                    )
                    problems.append(
                        f"space.{section}.{pname}: not a hyperparameter of {model}"
                        f"{did_you_mean(pname, known)}; known: {', '.join(known)}"
                    )
                    break
                if target in RESERVED:
                    problems.append(f"space.{section}.{pname}: cannot be searched or fixed here: "
                                    f"{RESERVED[target]}")
                    break
                problems.extend(_check_values(spec, section, pname, target, dist, model))
    return problems


def _check_values(
    spec: SweepSpec, section: str, pname: str, target: tuple[str, str], dist: Any, model: str
) -> list[str]:
    """Try every bound/choice against the target field's own validation (e.g. decay in (0, 1))."""
    where = f"space.{section}.{pname}"
    values = dist.values() if isinstance(dist, Distribution) else [dist]
    out: list[str] = []
    for value in values:
        try:
            trial_from_params(spec, model, {pname: value}, section_hint=target)
        except ValidationError as err:
            msg = err.errors()[0]["msg"]
            out.append(f"{where}: value {value!r} is invalid for {target[0]}.{target[1]} ({msg})")
            break
    return out


def trial_from_params(
    spec: SweepSpec, model: str, params: dict[str, Any], section_hint: tuple[str, str] | None = None
) -> TrialConfig:
    """The TrialConfig a sweep trial runs: the spec's base config with the sampled values applied."""
    base = {
        "task": spec.task.model_dump(),
        "model": {"name": model},
        "train": spec.train.model_dump() | {"epochs": spec.max_epochs},
    }
    for pname, value in params.items():
        target = section_hint or resolve_param(pname, model)
        if target is None:
            continue  # belongs to another model's section
        base[target[0]][target[1]] = value
    return TrialConfig.model_validate(base)


# ---------------------------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping read through the bounded safe loader; every failure is a UserError naming the file."""
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise UserError(
            Problem(
                str(path),
                "must be a YAML mapping (key: value lines) at the top level",
                "see search_spaces/quickstart.yaml for the layout",
            )
        )
    return data


def read_yaml_value(text: str, where: str) -> Any:
    """One value typed on the command line (`--set train.lr=0.01`), read as YAML within the same bounds."""
    return parse_yaml(text, where)


_UNION_TAGS = {"distribution", "fixed", "int", "float", "str", "bool"}


def problems_from(errors: list[Any], model: type[BaseModel] | None = None,
                  data: Any = None) -> list[Problem]:
    """One Problem per pydantic error, with the dotted field path (and the closest known field name for
    an unknown one, when the validated `model` and its input `data` are given)."""
    out = []
    for e in errors:
        loc = ".".join(str(x) for x in e["loc"] if str(x) not in _UNION_TAGS)
        msg = e["msg"].removeprefix("Value error, ")
        fix = ""
        if e["type"] == "extra_forbidden":
            known = _known_fields(model, e["loc"][:-1], data) if model is not None else []
            hint = did_you_mean(str(e["loc"][-1]), known)
            msg = "unknown field" + hint
            listing = f"; fields here: {', '.join(known)}" if known and not hint else ""
            fix = "remove it or check its spelling" + (listing or " (see the docs for the field names)")
        elif e["type"] == "missing":
            fix = "add this field"
        for part in msg.split("\n"):
            where = loc
            if not where and ": " in part:  # cross-field checks write "field.path: message"
                where, part = part.split(": ", 1)
            out.append(Problem(where or "(top level)", part, fix))
    return out


def _model_class(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (the model's own params class for `model:`), or None."""
    if isinstance(annotation, type) and issubclass(annotation, ModelParams):
        name = value.get("name") if isinstance(value, dict) else None
        return params_class(name) if name in MODELS else annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # Optional[X], Annotated[X, ...]
        found = _model_class(arg, value)
        if found is not None:
            return found
    return None


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...], data: Any) -> list[str]:
    """The field names valid at `loc` (a path of field names from `model`), for "did you mean"."""
    cls: type[BaseModel] | None = model
    node = data
    for part in loc:
        info = cls.model_fields.get(str(part)) if cls is not None else None
        if info is None:
            return []
        node = node.get(part) if isinstance(node, dict) else None
        cls = _model_class(info.annotation, node)
    return sorted(cls.model_fields) if cls is not None else []


def validate_as(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """Validate, reporting every problem at once.

    pydantic skips cross-field checks when a field fails; so each failing value is dropped (back to its
    default) and validation retried, until only the cross-field problems are left. A dropped required
    field then reads as missing: that echo of a problem already reported is not reported again.
    """
    problems: list[Problem] = []
    attempt = copy.deepcopy(data)
    dropped: set[tuple[Any, ...]] = set()
    for _ in range(50):
        try:
            result = model.model_validate(attempt)
        except ValidationError as err:
            real = [e for e in err.errors()
                    if not (e["type"] == "missing" and _under(_path(e["loc"]), dropped))]
            problems += [p for p in problems_from(real, model, data) if p not in problems]
            removed = [_drop(attempt, _path(e["loc"])) for e in real]
            dropped.update(loc for loc in removed if loc is not None)
            if not removed or all(loc is None for loc in removed):
                break
        else:
            if not problems:
                return result
            break
    raise UserError(problems, source=source)


def _path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x for x in loc if str(x) not in _UNION_TAGS)


def _under(path: tuple[Any, ...], dropped: set[tuple[Any, ...]]) -> bool:
    return any(path[: len(d)] == d for d in dropped)


def _drop(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Remove the value at `loc` (so its default applies): the path removed, or None if nothing was."""
    for depth in range(len(loc), 0, -1):
        parent = data
        for key in loc[: depth - 1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and loc[depth - 1] in parent:
            del parent[loc[depth - 1]]
            return tuple(loc[:depth])
    return None


def load_trial_config(path: str | Path) -> TrialConfig:
    return validate_as(TrialConfig, read_yaml(path), str(path))


def load_spec(path: str | Path) -> SweepSpec:
    return validate_as(SweepSpec, read_yaml(path), str(path))


def load_compare_spec(path: str | Path) -> tuple[SweepSpec, dict[str, Any] | None]:
    """A comparison's spec from a spec file or from a report's reproduce.yaml (the spec it ran is under
    `spec:`), so a published result re-runs from the file beside it; with the report's provenance."""
    data = read_yaml(path)
    if "comparison" in data and isinstance(data.get("spec"), dict):
        return validate_as(SweepSpec, data["spec"], f"{path}, under spec"), data
    return validate_as(SweepSpec, data, str(path)), None


def load_saved_spec(text: str, where: str, remove: str) -> SweepSpec:
    """The spec a sweep saved beside its state (`text`, read from `where`). Damage there is corrupt state,
    not a typo: the error names the file and how to recover (`remove`: how to delete the sweep)."""
    try:
        data = parse_yaml(text, where)
        if not isinstance(data, dict):
            raise UserError(Problem(where, "is not a YAML mapping"))
        return validate_as(SweepSpec, data, where)
    except UserError as err:
        first = err.problems[0]
        at = first.where.removeprefix(where).lstrip(":")
        detail = f"{'line ' + at.split(':')[0] + ': ' if at[:1].isdigit() else at + ': ' if at else ''}" \
            f"{first.message}"
        more = f" (and {len(err.problems) - 1} more problem(s))" if len(err.problems) > 1 else ""
        raise UserError(Problem(
            where, f"this sweep's saved spec is damaged ({detail}{more})",
            f"restore that file (a copy of the spec the sweep started from, e.g. `cp SPEC {where}` if you "
            f"still have it), or {remove} and start it again with `sweep run`",
        )) from None


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)

"""A SweepSpec's search space as an Optuna define-by-run function, and a sampled point back to a TrialConfig.

The space is conditional: `model` is a categorical choice and each model's own section is only sampled
when that model is chosen. Per-model parameters are named `<model>.<param>` so two models can search the
same parameter over different ranges without their Optuna distributions clashing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sweep.config import Distribution, SweepSpec, TrialConfig, trial_from_params
from sweep.models.registry import MODELS

if TYPE_CHECKING:
    import optuna

MODEL_KEY = "model"
COMMON = "common"


def param_name(section: str, name: str) -> str:
    """The Optuna/Tune name of a space entry: common params keep their name, model params get a prefix."""
    return name if section == COMMON else f"{section}.{name}"


def _suggest(trial: optuna.Trial, name: str, dist: Distribution) -> Any:
    kind = dist.kind
    if kind == "choice":
        return trial.suggest_categorical(name, dist.choice)
    lo, hi = getattr(dist, kind)
    if kind == "uniform":
        return trial.suggest_float(name, lo, hi, step=dist.step)
    if kind == "loguniform":
        return trial.suggest_float(name, lo, hi, log=True)
    if kind == "int":
        return trial.suggest_int(name, lo, hi, step=int(dist.step or 1))
    return trial.suggest_int(name, lo, hi, log=True)  # logint


class DefineByRun:
    """The define-by-run function handed to OptunaSearch.

    A class (not a closure) because OptunaSearch pickles its space with its state when Tune checkpoints
    the experiment; a module-level class holding a plain dict unpickles in `sweep resume`.
    """

    def __init__(self, spec: SweepSpec) -> None:
        self.spec_data = spec.model_dump(mode="json")

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        spec = SweepSpec.model_validate(self.spec_data)
        fixed: dict[str, Any] = {}
        model = trial.suggest_categorical(MODEL_KEY, list(spec.models)) if len(spec.models) > 1 else None
        if model is None:
            model = spec.models[0]
            fixed[MODEL_KEY] = model
        for section in (COMMON, model):
            for name, value in spec.space.get(section, {}).items():
                key = param_name(section, name)
                if isinstance(value, Distribution):
                    _suggest(trial, key, value)
                else:
                    fixed[key] = value  # a constant: returned, never sampled
        return fixed


def params_of(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model, {space name: value}) from a Tune config, dropping the model prefix of per-model params."""
    model = config[MODEL_KEY]
    prefix = f"{model}."
    params: dict[str, Any] = {}
    common: dict[str, Any] = {}
    for key, value in config.items():
        if key == MODEL_KEY:
            continue
        if key.startswith(prefix):
            params[key[len(prefix):]] = value
        elif not any(key.startswith(f"{m}.") for m in MODELS):
            common[key] = value
    return model, common | params  # a model's own value wins over a common one of the same name


def trial_config(spec: SweepSpec, config: dict[str, Any]) -> TrialConfig:
    """The TrialConfig that a Tune trial with this config runs (and that `sweep export` writes)."""
    model, params = params_of(config)
    return trial_from_params(spec, model, params)

"""The define-by-run space: conditional per-model params, constants, and the way back to a TrialConfig."""

from __future__ import annotations

import pickle

import optuna
import pytest

from sweep.config import SweepSpec
from sweep.space import DefineByRun, params_of, trial_config

SPEC = {
    "name": "space-test",
    "task": {"pairs": 3},
    "train": {"epochs": 7, "seed": 5},
    "models": ["fw_lstm", "fw_rnn", "lstm"],
    "space": {
        "common": {"lr": {"loguniform": [1e-4, 1e-2]}, "hidden_size": {"choice": [20, 50]}, "batch_size": 64},
        # the same name in two models, over different ranges: must not clash in Optuna
        "fw_lstm": {"decay": {"uniform": [0.5, 0.6]}, "inner_steps": {"int": [1, 3]}, "memory": "candidate"},
        "fw_rnn": {"decay": {"uniform": [0.9, 0.95]}, "fast_lr": {"uniform": [0.1, 1.0], "step": 0.1}},
    },
    "budget": {"max_epochs": 4},
}


def _sample(spec: SweepSpec, n: int, sampler: optuna.samplers.BaseSampler) -> list[dict]:
    study = optuna.create_study(sampler=sampler, direction="maximize")
    space = DefineByRun(spec)
    out = []
    for i in range(n):
        trial = study.ask()
        fixed = space(trial)
        config = {**trial.params, **fixed}
        study.tell(trial, float(i % 3))
        out.append(config)
    return out


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # group=True, as in the runner
def test_conditional_params_only_for_the_chosen_model():
    spec = SweepSpec.model_validate(SPEC)
    configs = _sample(spec, 40, optuna.samplers.TPESampler(seed=0, multivariate=True, group=True,
                                                           n_startup_trials=5))
    assert {c["model"] for c in configs} == {"fw_lstm", "fw_rnn", "lstm"}
    for c in configs:
        own = {k for k in c if "." in k}
        assert all(k.startswith(c["model"] + ".") for k in own), c
        assert c["batch_size"] == 64  # a constant comes back as-is
        if c["model"] == "fw_lstm":
            assert 0.5 <= c["fw_lstm.decay"] <= 0.6 and c["fw_lstm.memory"] == "candidate"
            assert c["fw_lstm.inner_steps"] in (1, 2, 3)
        if c["model"] == "fw_rnn":
            assert 0.9 <= c["fw_rnn.decay"] <= 0.95
            assert abs(c["fw_rnn.fast_lr"] * 10 - round(c["fw_rnn.fast_lr"] * 10)) < 1e-9  # step 0.1


def test_trial_config_applies_the_sample_to_the_spec_base():
    spec = SweepSpec.model_validate(SPEC)
    tc = trial_config(spec, {"model": "fw_rnn", "lr": 0.003, "hidden_size": 20, "batch_size": 64,
                             "fw_rnn.decay": 0.93, "fw_rnn.fast_lr": 0.4})
    assert tc.model.name == "fw_rnn" and tc.model.decay == 0.93 and tc.model.fast_lr == 0.4
    assert tc.model.hidden_size == 20 and tc.train.lr == 0.003 and tc.train.batch_size == 64
    assert tc.train.epochs == 4  # budget.max_epochs wins over train.epochs
    assert tc.train.seed == 5 and tc.task.pairs == 3


def test_params_of_drops_the_model_prefix():
    model, params = params_of({"model": "fw_lstm", "lr": 0.1, "fw_lstm.decay": 0.55})
    assert model == "fw_lstm" and params == {"lr": 0.1, "decay": 0.55}


def test_single_model_is_a_constant_not_a_choice():
    spec = SweepSpec.model_validate(SPEC | {"models": ["lstm"], "space": {"common": {"lr": 0.01}}})
    study = optuna.create_study()
    trial = study.ask()
    fixed = DefineByRun(spec)(trial)
    config = {**fixed, **trial.params}
    assert config == {"model": "lstm", "lr": 0.01}
    assert trial.params == {}  # nothing sampled


def test_space_pickles_for_resume():
    """OptunaSearch pickles its space with the searcher state; it must come back working."""
    spec = SweepSpec.model_validate(SPEC)
    space = pickle.loads(pickle.dumps(DefineByRun(spec)))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    assert space(trial)["batch_size"] == 64


@pytest.mark.parametrize("sampler", ["tpe", "random", "gp", "qmc"])
def test_every_sampler_builds_and_samples(sampler):
    from sweep.runner import _sampler

    spec = SweepSpec.model_validate(SPEC | {"searcher": {"sampler": sampler, "seed": 3}})
    configs = _sample(spec, 10, _sampler(spec))
    assert len({c["model"] for c in configs}) >= 2, "the sampler never varied the model"
    for c in configs:  # every proposal is a point of the space: its model's own ranges, the constants
        assert c["model"] in spec.models and c["batch_size"] == 64 and 1e-4 <= c["lr"] <= 1e-2
        if c["model"] == "fw_lstm":
            assert 0.5 <= c["fw_lstm.decay"] <= 0.6
    again = _sample(spec, 10, _sampler(spec))
    assert configs == again  # seeded: the same spec proposes the same trials

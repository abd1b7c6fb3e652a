"""The report's files exist and their numbers are the runs' numbers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import yaml

from sweep.report import SeedRun, summarize, write_report


def _run(model: str, seed: int, error_pct: float, reach95_step: int, pairs: int = 8, params: int = 1000):
    p = {"num_params": params}
    history = [
        {"epoch": 1, "step": 100, "val_accuracy": 0.5, "elapsed_s": 1.0, **p},
        {"epoch": 2, "step": reach95_step, "val_accuracy": 0.96, "elapsed_s": 2.0 + seed, **p},
        {"epoch": 3, "step": reach95_step + 100, "val_accuracy": 0.97, "elapsed_s": 3.0, **p},
    ]
    final = {"test_accuracy": 1 - error_pct / 100, "test_error": error_pct / 100, "num_params": params}
    return SeedRun(model, "art", pairs, seed, "completed", history, final, run_id=f"{model}-{seed}")


@pytest.fixture
def runs():
    good = [_run("fw_lstm", s, e, 200) for s, e in enumerate([1.0, 1.2, 0.8, 1.1, 0.9])]
    bad = [_run("ln_lstm", s, e, 400, params=2000) for s, e in enumerate([6.0, 6.5, 5.5, 6.2, 5.8])]
    same = [_run("fw_rnn", s, e, 300) for s, e in enumerate([1.0, 1.2, 0.8, 1.1, 0.9])]
    hard = [_run(m, s, 20.0 + s + (5 if m == "ln_lstm" else 0), 900, pairs=12) for m in ("fw_lstm", "ln_lstm")
            for s in range(3)]
    return good + bad + same + hard


def test_summary_numbers_and_significance(runs):
    rows = {(r.pairs, r.model): r for r in summarize(runs, thresholds=(0.95, 0.99))}
    best = rows[(8, "fw_lstm")]
    assert best.best and best.error_mean == pytest.approx(1.0) and best.n == 5
    assert best.error_ci == pytest.approx(2.7764451 * 0.158113883 / 5 ** 0.5, rel=1e-5)
    assert rows[(8, "ln_lstm")].significant is True and rows[(8, "ln_lstm")].p_holm < 0.05
    assert rows[(8, "fw_rnn")].significant is False  # identical errors: no difference
    assert rows[(8, "ln_lstm")].num_params == 2000
    reach95, reach99 = rows[(8, "ln_lstm")].reach
    assert (reach95.steps, reach95.reached, reach95.seconds) == (400, 5, pytest.approx(4.0))
    assert reach99.reached == 0
    assert rows[(12, "fw_lstm")].best and rows[(12, "ln_lstm")].error_mean == pytest.approx(26.0)


def test_report_files_exist_and_match_the_runs(runs, tmp_path):
    prov = {"models": ["fw_lstm", "fw_rnn", "ln_lstm"], "seeds": [0, 1, 2, 3, 4], "git_commit": "abc"}
    files = write_report(runs, tmp_path, prov, title="test")
    names = {p.name for p in files}
    assert {"report.md", "summary.csv", "seed_runs.csv", "reproduce.yaml", "difficulty.png",
            "curves_art-K8.png", "curves_art-K12.png"} <= names
    for p in files:
        assert p.stat().st_size > 0
    assert (tmp_path / "curves_art-K8.png").read_bytes()[:4] == b"\x89PNG"
    summary = list(csv.DictReader((tmp_path / "summary.csv").open()))
    ln = next(r for r in summary if (r["model"], r["pairs"]) == ("ln_lstm", "8"))
    assert float(ln["test_error_pct_mean"]) == pytest.approx(6.0)
    assert ln["steps_to_95"] == "400.0" and ln["significant"] == "True"
    seeds = list(csv.DictReader((tmp_path / "seed_runs.csv").open()))
    assert len(seeds) == len(runs)
    md = (tmp_path / "report.md").read_text()
    assert "### ART, K = 8" in md and "1.00 ± 0.20" in md and "not reached (0/5)" in md
    # each level's heading names the steps its runs trained (the longest run): budgets may differ by level
    assert "### ART, K = 8, 500 steps" in md and "### ART, K = 12, 1,000 steps" in md
    assert "git commit**: abc" in md


def test_a_reports_reproduce_yaml_is_what_sweep_compare_reruns(runs, tmp_path):
    """docs/results/reproduce.yaml re-runs the published comparison: `sweep compare` reads its spec."""
    from sweep.config import load_compare_spec, load_spec

    spec = load_spec("search_spaces/results_cpu.yaml")
    write_report(runs, tmp_path, {"comparison": spec.name, "git_commit": "abc",
                                  "spec": spec.model_dump(mode="json")})
    loaded, recorded = load_compare_spec(tmp_path / "reproduce.yaml")
    assert loaded == spec and recorded["git_commit"] == "abc"
    assert load_compare_spec("search_spaces/results_cpu.yaml") == (spec, None)  # a plain spec file

    from sweep.cli.output import console
    from sweep.cli.report_cmds import _same_code_note
    from sweep.compare import git_commit

    with console.capture() as other:
        _same_code_note(recorded)  # made by another commit: the user learns which one to check out
    here = git_commit() or "unknown"
    with console.capture() as same:
        _same_code_note({"git_commit": here.removesuffix("+dirty")})
    assert "made by commit abc" in other.get() and "git worktree add" in other.get()
    assert (same.get() == "") == (not here.endswith("+dirty"))  # local edits are not the same code


@pytest.mark.parametrize("compare, field", [
    ({"tasks": ["art", "nope"]}, "compare.tasks"),
    ({"seeds": 1}, "compare.seeds"),
    ({"seeds": [3, 3]}, "compare.seeds"),
    ({"models": ["fw_rnn"]}, "compare.models"),
    ({"pairs": [30]}, "compare.pairs"),
    ({"thresholds": [1.5]}, "compare.thresholds"),
    ({"thresholds": [0.95, 0.99, 0.95]}, "compare.thresholds"),
    ({"test": "ttest"}, "compare.test"),
    ({"seed": 3}, "compare.seed"),
    ({"levels": ["art-K8", "art8"]}, "compare.levels"),
    ({"levels": ["art-K8"], "pairs": [4]}, "compare.levels"),
    ({"levels": ["mart-K30"]}, "compare.levels"),
    ({"models": ["fw_lstm", "small"], "variants": {"small": {"model": "lstm", "hidden_size": 8}}},
     "compare.variants.small.model"),
    ({"models": ["fw_lstm", "small"], "variants": {"small": {"model": "fw_lstm", "hiden_size": 8}}},
     "compare.variants.small.hiden_size"),
    ({"models": ["fw_lstm", "small"], "variants": {"small": {"model": "fw_lstm", "hidden_size": -3}}},
     "compare.variants.small.hidden_size"),
    ({"models": ["fw_lstm", "small"], "variants": {"small": {"model": "fw_lstm", "hidden_size": [8, 16]}}},
     "compare.variants.small.hidden_size"),
    ({"models": ["fw_lstm", "ln_lstm"], "variants": {"ln_lstm": {"model": "fw_lstm", "hidden_size": 8}}},
     "compare.variants.ln_lstm"),
    ({"variants": {"small": {"model": "fw_lstm", "hidden_size": 8}}}, "compare.variants.small"),  # unused
    ({"models": ["fw_lstm", "small"], "variants": {"small": {"hidden_size": 8}}},
     "compare.variants.small.model"),
    ({"levels": ["art-K8"], "level_budgets": {"mart-K4": {"max_epochs": 40}}},
     "compare.level_budgets.mart-K4"),
    ({"levels": ["art-K8"], "level_budgets": {"art-K8": {}}}, "compare.level_budgets.art-K8"),
    ({"levels": ["art-K8"], "level_budgets": {"art-K8": {"max_epochs": -1}}}, "compare.level_budgets.art-K8"),
    ({"levels": ["art-K8"], "level_budgets": {"art-K8": {"steps": 400}}}, "compare.level_budgets.art-K8"),
])
def test_bad_compare_section_is_a_user_error_naming_the_field(tmp_path, compare, field):
    from sweep.config import load_spec
    from sweep.errors import UserError

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "models": ["fw_lstm", "ln_lstm"], "compare": compare}))
    with pytest.raises(UserError) as err:
        load_spec(path)
    assert any(p.where.startswith(field) for p in err.value.problems), err.value.render()


@pytest.mark.slow  # a `sweep` subprocess
def test_compare_without_compare_section_exits_2(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "plain", "models": ["lstm"]}))
    env = dict(os.environ, FWSWEEP_HOME=str(tmp_path / "home"))
    cli = [sys.executable, "-c", "from sweep.cli import main; main()"]
    done = subprocess.run([*cli, "compare", str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "compare:" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home" / "sweeps" / "plain").exists()  # nothing half-written


def test_each_tuning_sweep_gets_the_same_budget_and_only_its_models_space():
    from sweep.compare import seed_config, tuning_spec
    from sweep.config import load_spec

    spec = load_spec("search_spaces/paper_compare.yaml")
    subs = [tuning_spec(spec, m, d) for d in spec.difficulties() for m in spec.compared_models()]
    assert len(subs) == 3 * 6 and len({s.name for s in subs}) == len(subs)
    for sub in subs:
        assert sub.compare is None and len(sub.models) == 1
        assert (sub.budget, sub.scheduler, sub.searcher, sub.train) == (spec.budget, spec.scheduler,
                                                                        spec.searcher, spec.train)
        assert set(sub.space) <= {"common", sub.models[0]}
    hard = next(s for s in subs if s.name == "paper-compare.fw_rnn.mart-K16")
    assert (hard.task.name, hard.task.pairs, hard.experiment) == ("mart", 16, "paper-compare")
    from sweep.config import TrialConfig

    cfg = seed_config(TrialConfig(), seed=3, epochs=7)
    assert (cfg.train.seed, cfg.train.epochs, cfg.task.seed) == (3, 7, TrialConfig().task.seed)


def test_a_diverged_seed_is_left_out_of_the_mean_and_counted(runs):
    history = [{"step": 100, "val_accuracy": 0.1}]
    diverged = SeedRun("fw_lstm", "art", 8, 9, "diverged", history, {"diverged": 1})
    rows = {(r.pairs, r.model): r for r in summarize([*runs, diverged])}
    assert rows[(8, "fw_lstm")].n == 5 and rows[(8, "fw_lstm")].failed == 1
    assert rows[(8, "fw_lstm")].error_mean == pytest.approx(1.0)


def test_a_seed_run_continues_from_its_checkpoint(tmp_path):
    """An interrupted seed run (Ray retry or `sweep compare` rerun) resumes; its history stays whole."""
    from sweep.compare import retrain_seed
    from sweep.config import TrialConfig

    cfg = TrialConfig.model_validate({
        "task": {"name": "art", "pairs": 2, "num_keys": 4, "num_values": 4, "train_size": 256, "val_size": 64,
                 "test_size": 64},
        "model": {"name": "fw_lstm", "hidden_size": 8, "embed_size": 8, "head_size": 8},
        "train": {"epochs": 2, "steps_per_epoch": 4, "batch_size": 32, "num_threads": 1, "device": "cpu"}})
    tags = {"model": "fw_lstm", "difficulty": "art-K2", "seed": "0"}
    first = retrain_seed(cfg.to_dict(), str(tmp_path), None, None, None, tags)
    assert [h["step"] for h in first["history"]] == [4, 8]
    cfg.train.epochs = 3
    resumed = retrain_seed(cfg.to_dict(), str(tmp_path), None, None, None, tags)
    assert [h["step"] for h in resumed["history"]] == [4, 8, 12]
    assert resumed["history"][:2] == first["history"][:2] and "test_accuracy" in resumed["final"]


def test_levels_and_variants_give_each_entry_its_own_sweep_with_the_same_budget(tmp_path):
    """Issue 13's comparison: levels that are not a task x pairs grid, and a model at a fixed smaller width
    (an equal-parameter entry) beside the same model at the searched width."""
    from sweep.compare import tuning_spec
    from sweep.config import load_spec
    from sweep.space import DefineByRun, trial_config

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "eq", "models": ["fw_lstm", "ln_lstm"],
        "space": {"common": {"hidden_size": 50, "lr": {"loguniform": [1e-3, 1e-2]}}},
        "compare": {"models": ["fw_lstm", "ln_lstm", "fw_lstm-R20"], "levels": ["art-K16", "mart-K4"],
                    "variants": {"fw_lstm-R20": {"model": "fw_lstm", "hidden_size": 20}}}}))
    spec = load_spec(path)
    assert [d.label for d in spec.difficulties()] == ["art-K16", "mart-K4"]
    entries = spec.compared_models()
    subs = {(e, d.label): tuning_spec(spec, e, d) for d in spec.difficulties() for e in entries}
    assert len({s.name for s in subs.values()}) == 6
    small, full = subs[("fw_lstm-R20", "mart-K4")], subs[("fw_lstm", "mart-K4")]
    assert small.name == "eq.fw_lstm-R20.mart-K4" and small.models == ["fw_lstm"] and "hidden_size=20" in \
        small.description
    assert (small.budget, small.searcher, small.scheduler) == (full.budget, full.searcher, full.scheduler)
    optuna = pytest.importorskip("optuna")
    for sub, width in ((small, 20), (full, 50)):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        config = trial_config(sub, DefineByRun(sub)(trial) | trial.params)
        assert (config.model.name, config.model.hidden_size, config.task.name) == ("fw_lstm", width, "mart")


def test_a_level_budget_gives_one_level_more_steps_for_every_entry_alike(tmp_path):
    """mART needs more steps than ART before anything is learned: one comparison gives each level its own
    budget (tuning trials and seed runs), the same for every entry; other levels keep the spec's."""
    from sweep.compare import level_budgets, retrain_epochs, tuning_spec
    from sweep.config import load_spec
    from sweep.errors import UserError

    data = {"name": "lb", "models": ["fw_lstm", "fw_rnn"], "train": {"steps_per_epoch": 100},
            "budget": {"max_epochs": 18}, "scheduler": {"name": "asha", "grace_period": 2},
            "compare": {"levels": ["art-K8", "mart-K4"], "retrain_epochs": 12,
                        "level_budgets": {"mart-K4": {"max_epochs": 20, "steps_per_epoch": 400}}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(path)
    art, mart = spec.difficulties()
    for entry in spec.compared_models():
        for level, budget in ((art, (18, 100)), (mart, (20, 400))):
            sub = tuning_spec(spec, entry, level)
            assert (sub.max_epochs, sub.train.steps_per_epoch) == budget
    assert (retrain_epochs(spec, art), retrain_epochs(spec, mart)) == (12, 20)
    assert level_budgets(spec) == {
        "art-K8": {"max_epochs": 18, "steps_per_epoch": 100, "retrain_epochs": 12},
        "mart-K4": {"max_epochs": 20, "steps_per_epoch": 400, "retrain_epochs": 20}}
    data["compare"]["level_budgets"] = {"mart-K4": {"max_epochs": 1}}  # below ASHA's grace period
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as err:
        load_spec(path)
    assert [p.where for p in err.value.problems] == ["compare.level_budgets.mart-K4.max_epochs"]
    assert "grace_period" in err.value.render()


def test_a_report_of_code_that_was_not_one_clean_commit_says_so_first(runs, tmp_path):
    from sweep.compare import clean_commit

    assert clean_commit(["abc123"]) and not clean_commit(["abc123+dirty"]) and not clean_commit(["a", "b"])
    prov = {"git_commit": "abc123", "git_commits": ["abc123", "def456+dirty"],
            "reproducible_from_one_clean_commit": False}
    write_report(runs, tmp_path / "dirty", prov)
    md = (tmp_path / "dirty" / "report.md").read_text()
    assert md.index("not reproducible from one clean commit") < md.index("## Results")
    assert "`def456+dirty`" in md
    clean = {"git_commits": ["abc123"], "reproducible_from_one_clean_commit": True}
    write_report(runs, tmp_path / "clean", clean)
    assert "not reproducible" not in (tmp_path / "clean" / "report.md").read_text()


def test_every_pair_of_entries_is_tested_once_with_holm_within_the_level(runs, tmp_path):
    from sweep.report import pairwise

    contrasts = pairwise(runs)
    k8 = {(c.better, c.worse): c for c in contrasts if c.pairs == 8}
    assert len(k8) == 3 and len([c for c in contrasts if c.pairs == 12]) == 1  # C(3,2) and C(2,2)
    ln = k8[("fw_lstm", "ln_lstm")] if ("fw_lstm", "ln_lstm") in k8 else k8[("fw_rnn", "ln_lstm")]
    assert ln.diff == pytest.approx(5.0) and ln.significant and ln.p_holm >= ln.p_value
    same = next(c for c in k8.values() if {c.better, c.worse} == {"fw_lstm", "fw_rnn"})
    assert same.diff == pytest.approx(0.0) and same.p_value == 1.0 and same.significant is False
    write_report(runs, tmp_path, {})
    rows = list(csv.DictReader((tmp_path / "pairwise.csv").open()))
    assert len(rows) == len(contrasts)
    md = (tmp_path / "report.md").read_text()
    assert "### Every pair, ART, K = 8" in md and "| fw_lstm | ln_lstm | 5.00 |" in md  # K=12: 26 vs 21

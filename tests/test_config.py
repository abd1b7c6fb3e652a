"""Good input stays good, and the pieces behind the bad-input table (tests/test_bad_input.py) work alone:
the bounded YAML loader, yes/no is not a number, "did you mean", no false "Field required", the capacity
check, help that names its placeholders, and `sweep list` with one corrupt sweep among good ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli_in_process, spec_text

from sweep.capacity import check_resources
from sweep.config import SweepSpec, TrialConfig, read_yaml_value, validate_as
from sweep.errors import UserError
from sweep.safe_yaml import MAX_NODES, parse_yaml

FW_LSTM = "task: {name: art, pairs: 2, train_size: 64, val_size: 16, test_size: 16}\nmodel: {name: fw_lstm}\n"


def test_valid_files_give_a_summary(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "t.yaml").write_text(FW_LSTM)
    (tmp_path / "s.yaml").write_text("name: quick\nmodels: [fw_lstm, lstm]\nbudget: {num_samples: 4}\n")
    code, output = run_cli_in_process(["validate", str(tmp_path / "t.yaml"), str(tmp_path / "s.yaml")],
                                      monkeypatch, capsys)
    assert code == 0, output
    assert "trial config: fw_lstm" in output and "art-K2" in output
    assert "sweep spec 'quick'" in output and "4 trials" in output


@pytest.mark.parametrize("folder", ["search_spaces/trials", "search_spaces", "search_spaces/tests"])
def test_the_shipped_files_are_valid(folder: str, monkeypatch, capsys) -> None:
    files = sorted(str(p) for p in (ROOT / folder).glob("*.yaml"))
    assert files
    code, output = run_cli_in_process(["validate", *files], monkeypatch, capsys)
    assert code == 0, output
    assert output.count("ok ") == len(files)


def test_embedded_default_equals_the_shipped_example() -> None:
    from sweep.cli.trial_cmds import DEFAULT_TRIAL

    assert yaml.safe_load((ROOT / "search_spaces/trials/art_k4_fw_lstm.yaml").read_text()) == DEFAULT_TRIAL


# ---- the loader


def test_loader_keeps_what_yaml_users_write() -> None:
    """Anchors, merge keys (overridden locally), flow and block style, and 1e-3 (text in YAML 1.1)."""
    data = parse_yaml("base: &b {lr: 1e-3, x: 1}\nrun:\n  <<: *b\n  x: 2\nlist: [*b, *b]\n", "f.yaml")
    assert data["run"] == {"lr": "1e-3", "x": 2} and data["list"] == [data["base"]] * 2
    spec = validate_as(SweepSpec, {"name": "n", "models": ["lstm"], "train": {"lr": "1e-3"}}, "s")
    assert spec.train.lr == pytest.approx(1e-3)  # a number written as text is still that number


def test_duplicate_key_names_the_key_and_both_lines() -> None:
    with pytest.raises(UserError) as info:
        parse_yaml("a: 1\nb:\n  c: 1\n  d: 2\n  c: 3\n", "f.yaml")
    (problem,) = info.value.problems
    assert problem.where == "f.yaml:5" and "'c' is given twice (lines 3 and 5)" in problem.message


def test_alias_expansion_is_counted_not_performed() -> None:
    """Aliases that stay under the bound load; one level more is refused before anything walks it."""
    levels = ["a: &a [" + ", ".join(["1"] * 10) + "]"]
    levels += [f"{n}: &{n} [" + ", ".join([f"*{p}"] * 10) + "]" for p, n in zip("abc", "bcd", strict=True)]
    assert len(parse_yaml("\n".join(levels[:3]), "f")["c"]) == 10  # 1,000 values
    with pytest.raises(UserError, match=f"more than {MAX_NODES:,}"):
        parse_yaml("\n".join(levels) + "\ne: [" + ", ".join(["*d"] * 10) + "]", "f")


def test_set_values_are_read_by_the_same_loader() -> None:
    assert read_yaml_value("[a, b]", "--set x") == ["a", "b"]
    with pytest.raises(UserError, match="given twice"):
        read_yaml_value("{a: 1, a: 2}", "--set x")


# ---- types, names, messages


@pytest.mark.parametrize(("section", "field"), [("budget", "max_concurrent"), ("train", "epochs"),
                                                ("train", "lr"), ("model", "hidden_size")])
def test_yes_no_is_not_a_number(section: str, field: str) -> None:
    data = {"name": "n", "models": ["lstm"], section: {field: True}}
    if section == "model":
        data = {"model": {"name": "lstm", field: True}}
    with pytest.raises(UserError) as info:
        validate_as(SweepSpec if section != "model" else TrialConfig, data, "s.yaml")
    assert [p.where for p in info.value.problems] == [f"{section}.{field}"]
    assert "yes/no value" in info.value.problems[0].message


def test_a_failing_required_field_is_not_also_reported_missing() -> None:
    with pytest.raises(UserError) as info:
        validate_as(SweepSpec, {"name": "n!", "models": ["fw_lsmt"]}, "s.yaml")
    rendered = info.value.render()
    assert "Field required" not in rendered and "add this field" not in rendered
    assert {p.where for p in info.value.problems} == {"name", "models"}
    assert "did you mean 'fw_lstm'" in rendered and "letters, digits" in rendered


def test_a_truly_missing_field_is_reported() -> None:
    with pytest.raises(UserError) as info:
        validate_as(SweepSpec, {"name": "n"}, "s.yaml")
    assert [(p.where, p.fix) for p in info.value.problems] == [("models", "add this field")]


def test_a_common_value_wrong_for_every_model_is_reported_once() -> None:
    data = {"name": "n", "models": ["fw_lstm", "fw_rnn", "lstm"], "space": {"common": {"hidden_size": 0}}}
    with pytest.raises(UserError) as info:
        validate_as(SweepSpec, data, "s.yaml")
    assert [p.where for p in info.value.problems] == ["space.common.hidden_size"]
    assert info.value.render().count("is invalid for model.hidden_size") == 1


# ---- resources a cluster cannot give (the unit; tests/test_bad_input.py runs it on a real Ray)


@pytest.fixture
def no_autoscaler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml
    monkeypatch.delenv("FWSWEEP_SKIP_CAPACITY_CHECK", raising=False)
    return tmp_path


def _spec(**resources: float) -> SweepSpec:
    return SweepSpec.model_validate({"name": "n", "models": ["lstm"], "resources": resources})


def test_capacity_refuses_what_no_node_has(no_autoscaler: Path) -> None:
    with pytest.raises(UserError) as info:
        check_resources(_spec(cpu=64), nodes=[{"CPU": 2.0}, {"CPU": 1.0}])
    text = info.value.render()
    assert "resources" in text and "64 CPU" in text and "largest has 2 CPU" in text
    assert "resources.cpu to at most 2" in text
    with pytest.raises(UserError, match="set resources.gpu: 0"):
        check_resources(_spec(cpu=1, gpu=1), nodes=[{"CPU": 2.0}])


def test_capacity_accepts_what_one_node_or_an_autoscaler_node_type_has(no_autoscaler: Path) -> None:
    check_resources(_spec(cpu=2, gpu=0.25), nodes=[{"CPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}])
    (no_autoscaler / "ray_bootstrap_config.yaml").write_text(
        "available_node_types:\n  head: {resources: {CPU: 2}, max_workers: 0}\n"
        "  gpu: {resources: {CPU: 8, GPU: 1}, max_workers: 4}\n")
    check_resources(_spec(cpu=8, gpu=1), nodes=[{"CPU": 2.0}])
    with pytest.raises(UserError, match="1 autoscaler node type"):
        check_resources(_spec(cpu=16), nodes=[{"CPU": 2.0}])


# ---- help and listing


COMMANDS = ["run", "resume", "export", "ui", "list", "show", "train", "validate", "compare", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_placeholders_in_words(command: str, monkeypatch, capsys) -> None:
    code, output = run_cli_in_process([command, "-h"], monkeypatch, capsys)
    assert code == 0, output
    assert "Usage: sweep " + command in output
    for python_type in ("<bool>", "<str>", "<int>", "<path>", "<list", "{"):
        assert python_type not in output, f"{python_type} in `sweep {command} -h`:\n{output}"


def test_help_text_wraps_at_the_terminal_not_at_the_docstrings_line_breaks(monkeypatch, capsys) -> None:
    """`resume`'s docstring breaks after "finished trials": the help showed that break at any width."""
    code, output = run_cli_in_process(["resume", "--help"], monkeypatch, capsys)  # 200 columns
    assert code == 0 and "storage): finished trials are kept, unfinished ones go on" in output, output
    code, output = run_cli_in_process(["--help"], monkeypatch, capsys)
    assert code == 0 and "finished trials are kept" in output, output


@pytest.mark.parametrize(("command", "choices"), [
    ("export", "yaml|json"), ("train", "fw_lstm|fw_rnn|ln_lstm|lstm"), ("train", "art|mart"),
    ("train", "auto|cpu|cuda")])
def test_help_lists_the_choices(command: str, choices: str, monkeypatch, capsys) -> None:
    code, output = run_cli_in_process([command, "--help"], monkeypatch, capsys)
    assert code == 0 and choices in output, output


def test_list_shows_a_corrupt_sweep_and_the_others(tmp_path: Path, monkeypatch, capsys) -> None:
    sweeps = tmp_path / "sweeps"
    for name, text in {"good": spec_text(name="good"), "broken": "name: broken\nmodels: [lstm\n"}.items():
        (sweeps / name).mkdir(parents=True)
        (sweeps / name / "sweep_spec.yaml").write_text(text)
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, output = run_cli_in_process(["list"], monkeypatch, capsys)
    assert code == 0, output
    rows = {line.split()[0]: line for line in output.splitlines() if line.strip()}
    assert "corrupt" in rows["broken"] and "not started" in rows["good"], output
    assert "broken/sweep_spec.yaml" in output and "rm -r" in output  # how to recover

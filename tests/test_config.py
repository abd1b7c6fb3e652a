"""Bad trial configs and flags through the real CLI entry point (`sweep.cli.main`): one clear message that
names the field, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sweep.cli import main

FW_LSTM = "task: {name: art, pairs: 2, train_size: 64, val_size: 16, test_size: 16}\nmodel: {name: fw_lstm}\n"


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["sweep", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else int(code)), out.out + out.err


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# (case id, argv, files to create, text the message must contain)
CASES = [
    ("negative-lr", ["train", "--lr", "-1"], {}, ["train.lr", "greater than 0"]),
    ("zero-epochs", ["train", "--epochs", "0"], {}, ["train.epochs", "greater than or equal to 1"]),
    ("pairs-over-keys", ["train", "--pairs", "30"], {}, ["task", "pairs=30", "num_keys"]),
    ("unknown-model", ["train", "--model", "gru"], {}, ["model", "unknown model 'gru'", "fw_lstm"]),
    ("unknown-task", ["train", "--task", "copy"], {}, ["task.name", "unknown task 'copy'", "mart"]),
    ("bad-device", ["train", "--device", "tpu"], {}, ["train.device", "'cuda'"]),
    ("set-typo", ["train", "--set", "train.lrr=0.1"], {}, ["train.lrr", "unknown field"]),
    ("set-field-of-other-model", ["train", "--model", "lstm", "--set", "model.fast_lr=0.3"], {},
     ["model.fast_lr", "unknown field"]),
    ("set-without-equals", ["train", "--set", "train.lr"], {}, ["--set train.lr", "section.field=value"]),
    ("set-bad-type", ["train", "--set", "train.batch_size=lots"], {}, ["train.batch_size", "integer"]),
    ("flag-bad-type", ["train", "--pairs", "four"], {}, ["--pairs", "integer"]),
    ("unknown-flag", ["train", "--hidden", "20"], {}, ["--hidden"]),
    ("config-unknown-section", ["validate", "c.yaml"], {"c.yaml": FW_LSTM + "modle: {}\n"},
     ["modle", "unknown field"]),
    ("config-two-problems-at-once", ["validate", "c.yaml"],
     {"c.yaml": FW_LSTM.replace("{name: fw_lstm}", "{name: fw_lstm, decay: 1.5}")
      + "train: {batch_size: 0, grad_clip: -1}\n"},
     ["3 problem(s)", "model.decay", "train.batch_size", "train.grad_clip"]),
    ("config-for-train", ["train", "c.yaml"], {"c.yaml": "task: {pairs: 0}\n"}, ["task.pairs"]),
    ("config-is-a-spec", ["train", "--config", "s.yaml"], {"s.yaml": "name: x\nmodels: [lstm]\n"},
     ["models", "sweep spec", "sweep run"]),
    ("spec-unknown-model", ["validate", "s.yaml"], {"s.yaml": "name: x\nmodels: [gru]\n"}, ["models", "gru"]),
    ("two-files-both-bad", ["validate", "a.yaml", "b.yaml"],
     {"a.yaml": "train: {lr: 0}\n", "b.yaml": "task: {seed: -1}\n"},
     ["2 of 2 files", "a.yaml", "train.lr", "b.yaml", "task.seed"]),
    ("resume-not-a-run", ["train", "--resume", "nowhere"], {}, ["--resume", "config.yaml"]),
    ("resume-with-config", ["train", "--resume", "r", "--config", "c.yaml"], {"c.yaml": FW_LSTM},
     ["--config", "--resume"]),
    ("out-is-a-file", ["train", "--out", "f.txt"], {"f.txt": "x"}, ["--out", "is a file"]),
    ("out-under-a-file", ["train", "--out", "f.txt/run"], {"f.txt": "x"}, ["--out", "cannot write"]),
    ("out-not-empty", ["train", "--out", "d"], {"d/x": "x"}, ["--out", "already holds files", "--resume"]),
    ("too-few-sequences", ["train", "--out", "new", "--set", "task.num_keys=2", "--set", "task.num_values=2",
                           "--pairs", "1", "--set", "task.train_size=20"], {}, ["task.val_size", "distinct"]),
]


@pytest.mark.parametrize(("args", "files", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message(args, files, expected, tmp_path: Path, monkeypatch, capsys) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path / "home"))
    before = tree(tmp_path)
    code, output = run_cli(args, monkeypatch, capsys)
    assert code == 2, output
    assert "Traceback" not in output
    for text in expected:
        assert text.lower() in output.lower(), f"{text!r} not in:\n{output}"
    assert tree(tmp_path) == before  # nothing written


def test_valid_files_give_a_summary(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "t.yaml").write_text(FW_LSTM)
    (tmp_path / "s.yaml").write_text("name: quick\nmodels: [fw_lstm, lstm]\nbudget: {num_samples: 4}\n")
    files = [str(tmp_path / "t.yaml"), str(tmp_path / "s.yaml")]
    code, output = run_cli(["validate", *files], monkeypatch, capsys)
    assert code == 0, output
    assert "trial config: fw_lstm" in output and "art-K2" in output
    assert "sweep spec 'quick'" in output and "4 trials" in output


def test_the_shipped_trial_configs_are_valid(monkeypatch, capsys) -> None:
    files = sorted(str(p) for p in (Path(__file__).parents[1] / "search_spaces" / "trials").glob("*.yaml"))
    assert files
    code, output = run_cli(["validate", *files], monkeypatch, capsys)
    assert code == 0, output
    assert output.count("ok ") == len(files)


def test_embedded_default_equals_the_shipped_example() -> None:
    import yaml

    from sweep.cli.trial_cmds import DEFAULT_TRIAL

    root = Path(__file__).parents[1]
    assert yaml.safe_load((root / "search_spaces/trials/art_k4_fw_lstm.yaml").read_text()) == DEFAULT_TRIAL


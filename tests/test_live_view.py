"""What a person reads about a sweep: the live view (in a terminal and piped), trial states in users'
words, and `show`/`list` tables at 80 columns. Fast: events and trial records are built here; the end to
end sweep tests (test_sweep_e2e.py) check the same view fed by a real Ray Tune run."""

from __future__ import annotations

import io
from collections import Counter

from rich.console import Console

from sweep import events
from sweep.cli.live import SweepView
from sweep.cli.sweep_tables import SweepOverview, sweeps_table, trials_table
from sweep.config import SweepSpec
from sweep.export import TrialRecord
from sweep.space import trial_config

SPEC = SweepSpec.model_validate({
    "name": "view-test",
    "task": {"pairs": 2, "train_size": 100, "val_size": 20, "test_size": 20},
    "train": {"epochs": 6},
    "models": ["fw_lstm", "fw_rnn", "lstm"],
    "space": {"common": {"lr": {"loguniform": [1e-4, 1e-2]}, "hidden_size": 50},
              "fw_lstm": {"fast_lr": {"uniform": [0.2, 1.0]}, "decay": {"uniform": [0.8, 0.97]}},
              "fw_rnn": {"decay": {"uniform": [0.8, 0.97]}}},
    "budget": {"num_samples": 4, "max_epochs": 6, "max_concurrent": 2},
})
FW_PARAMS = {"model": "fw_lstm", "lr": 0.0043217, "hidden_size": 50, "fw_lstm.fast_lr": 0.52,
             "fw_lstm.decay": 0.9123}


def _events() -> list[events.Event]:
    params = events.searched_params(FW_PARAMS, events.searched_keys(SPEC))
    return [
        events.Phase("sweep view-test: starting Ray and the local MLflow server..."),
        events.SweepStarted("view-test", "val_accuracy", "max", 4, 6, 2),
        events.TrialStarted("aaaa0001", "fw_lstm", params),
        events.TrialStarted("bbbb0002", "lstm", {"lr": 0.001}),
        events.Counts(done=0, running=2, pending=2, total=4),
        events.TrialReport("aaaa0001", 1, 0.41),
        events.TrialReport("bbbb0002", 1, 0.22),
        events.TrialEnded("bbbb0002", "lstm", events.STOPPED_EARLY, 1, 0.22, {"lr": 0.001}, "by ASHA"),
        events.Counts(done=1, running=1, pending=2, total=4),
        events.TrialEnded("aaaa0001", "fw_lstm", events.DONE, 6, 0.97, params),
        events.TrialEnded("cccc0003", "fw_rnn", events.FAILED, 2, None, {"decay": 0.9},
                          "RuntimeError: CUDA out of memory"),
        events.SweepEnded("view-test"),
    ]


def _console(terminal: bool, width: int = 80) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, force_terminal=terminal, color_system=None, highlight=False), out


def test_piped_view_prints_one_plain_line_per_event():
    console, out = _console(terminal=False)
    with SweepView(console) as view:
        for event in _events():
            view(event)
    lines = out.getvalue().splitlines()
    assert not view.live_mode
    assert lines[0] == "sweep view-test: starting Ray and the local MLflow server..."
    assert lines[1].startswith("view-test started: 4 trials (2 at a time, <= 6 epochs each)")
    started = [ln for ln in lines if ln.startswith("started")]
    assert len(started) == 2 and "lr=0.004322 fast_lr=0.52 decay=0.9123" in started[0]
    ended = [ln for ln in lines if ln.split("  ")[0].strip() in ("done", "stopped early", "failed")]
    assert len(ended) == 3 and len(lines) == 2 + 2 + 3  # nothing per epoch, no count lines
    stop, done, failed = ended
    assert "lstm bbbb0002  val_accuracy 0.2200  epoch 1/6  by ASHA  lr=0.001  new best  [1/4]" in stop
    assert "epoch 6/6" in done and "new best" in done and "[2/4]" in done
    assert "no result" in failed and "CUDA out of memory" in failed and "new best" not in failed
    assert "\x1b" not in out.getvalue()  # no cursor movement or colour when piped


def test_terminal_view_updates_one_display_in_place_at_80_columns():
    console, out = _console(terminal=True)
    with SweepView(console) as view:
        assert view.live_mode
        for event in _events()[:-3]:
            view(event)
        panel, _ = _console(terminal=False)
        panel.print(view.render())
        live = panel.file.getvalue().splitlines()
        for event in _events()[-3:]:
            view(event)
    assert "view-test  1/4 finished · 1 running · 2 pending" in live[0]
    assert live[1].startswith("best val_accuracy 0.2200: lstm bbbb0002")
    assert live[2].strip().startswith("running  fw_lstm aaaa0001  epoch 1/6  val_accuracy 0.4100")
    assert all(len(line) <= 80 for line in live)
    text = out.getvalue()
    assert "started  " not in text  # running trials are in the display, not in the scrollback
    assert text.count("stopped early") == 1 and "lr=0.001" in text and "new best" in text
    assert view._live is None  # SweepEnded closed the display


def test_trial_end_lines_in_a_narrow_terminal_break_between_fields_not_inside_them():
    """At 56 columns `done  fw_lstm ID  val_accuracy 0.9700  epoch 6/6` does not fit: it broke at the last
    space that did, `epoch` at the end of one line and `6/6` alone on the next (`new` / `best` alike)."""
    console, _ = _console(terminal=True, width=56)
    printed, out = _console(terminal=False, width=56)  # what the view prints above its display, as laid out
    with SweepView(console) as view:
        view._line = lambda markup: printed.print(markup, highlight=False)  # noqa: SLF001
        for event in _events():
            view(event)
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    assert all(len(line) <= 56 for line in lines), lines
    for field in ("stopped early", "lstm bbbb0002", "val_accuracy 0.2200", "epoch 1/6", "by ASHA",
                  "epoch 6/6", "lr=0.004322", "decay=0.9123", "new best", "RuntimeError: CUDA out of memory"):
        assert any(field in line for line in lines), (field, lines)
    done = next(i for i, line in enumerate(lines) if line.startswith("done"))
    under = " " * 15  # under the model, as the parameters' line
    assert lines[done + 1:done + 4] == [f"{under}epoch 6/6", f"{under}lr=0.004322 fast_lr=0.52 decay=0.9123",
                                        f"{under}new best"], lines


def test_trial_states_in_users_words():
    max_epochs = 6
    assert events.trial_state("TERMINATED", {"epoch": 6, "test_accuracy": 0.9}, max_epochs) == "done"
    assert events.trial_state("TERMINATED", {"epoch": 2, "test_accuracy": 0.99, "target_reached": 1},
                              max_epochs) == "done"  # reached its target: not stopped by the scheduler
    assert events.trial_state("TERMINATED", {"epoch": 2}, max_epochs) == "stopped early"
    assert events.trial_state("TERMINATED", {"epoch": 3, "diverged": 1}, max_epochs) == "diverged"
    assert events.trial_state("ERROR", {"epoch": 3}, max_epochs) == "failed"
    assert events.trial_state("RUNNING", {}, max_epochs) == "running"
    assert events.trial_state("PENDING", {"trial_id": "x"}, max_epochs) == "pending"
    assert events.trial_state("PENDING", {"epoch": 2, "training_iteration": 2}, max_epochs) == "interrupted"


def _record(tid: str, params: dict, status: str, metrics: dict) -> TrialRecord:
    return TrialRecord(trial_id=tid, model=params["model"], config=trial_config(SPEC, params), status=status,
                       params=params, metrics=metrics)


def test_show_and_list_tables_fit_80_columns_with_every_searched_parameter():
    records = [
        _record("aaaa0001", FW_PARAMS, "TERMINATED",
                {"val_accuracy": 0.97, "epoch": 6, "test_accuracy": 0.9}),
        _record("bbbb0002", {"model": "lstm", "lr": 0.001, "hidden_size": 50}, "TERMINATED",
                {"val_accuracy": 0.22, "epoch": 1}),
        _record("cccc0003", {"model": "fw_rnn", "lr": 0.002, "hidden_size": 50, "fw_rnn.decay": 0.9}, "ERROR",
                {"epoch": 2}),
        _record("dddd0004", {"model": "lstm", "lr": 0.005, "hidden_size": 50}, "PENDING", {}),
    ]
    states = Counter(r.state(SPEC.max_epochs) for r in records)
    view = SweepOverview("view-test", SPEC, records, "interrupted", states, records[0])
    assert view.trials == "3/4" and view.states_text() == "1 done, 1 stopped early, 1 failed, 1 pending"
    assert events.searched_keys(SPEC) == {"lr", "fw_lstm.fast_lr", "fw_lstm.decay", "fw_rnn.decay"}

    console, out = _console(terminal=False)
    console.print(trials_table(view, top=10))
    console.print(sweeps_table([view], {"view-test": "KILLED"}))
    text = out.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text and "TERMINATED" not in text and "ERROR" not in text
    for word in ("done", "stopped early", "failed", "pending", "lr=0.004322", "fast_lr=0.52", "decay=0.9123",
                 "decay=0.9", "6/6", "1/6", "3/4", "0.9700", "killed", "1 failed"):
        assert word in text, (word, text)
    assert "hidden_size" not in text  # a constant, not a searched parameter
    rows = [ln.split()[0] for ln in text.splitlines() if ln[:4] in ("aaaa", "bbbb", "cccc", "dddd")]
    assert rows == ["aaaa0001", "bbbb0002", "cccc0003", "dddd0004"]  # best first, then failed/pending


def test_a_trial_that_tune_saved_as_pending_is_running_while_its_sweep_runs():
    """Tune saves a RUNNING trial as PENDING; `sweep show` of a live sweep called it "interrupted", or
    "pending" before its first epoch ended. One that Tune has not started (no result log) is pending."""
    started = _record("cccc0003", {"model": "lstm", "lr": 0.002, "hidden_size": 50}, "PENDING", {})
    started.started = True
    records = [_record("aaaa0001", FW_PARAMS, "PENDING", {"val_accuracy": 0.5, "epoch": 3}),
               _record("bbbb0002", {"model": "lstm", "lr": 0.001, "hidden_size": 50}, "PENDING", {}), started]
    for status, expected in (("running", "2 running, 1 pending"),
                             ("interrupted", "1 interrupted, 2 pending")):
        view = SweepOverview("view-test", SPEC, records, status, Counter(), None)
        view.states = Counter(view.state_of(r) for r in records)
        assert view.states_text() == expected
        console, out = _console(terminal=False)
        console.print(trials_table(view, top=10))
        assert expected.split(", ")[0].split(" ", 1)[1] in out.getvalue()


def test_ctrl_c_while_starting_says_what_to_type_next(tmp_path, monkeypatch):
    """Before Tune handles Ctrl-C itself there is no summary: one line says what is left to do."""
    from sweep.cli import sweep_cmds
    from sweep.cli.output import console

    monkeypatch.setenv("FWSWEEP_HOME", str(tmp_path))
    monkeypatch.delenv("FWSWEEP_STORAGE", raising=False)
    with console.capture() as capture:  # leaves the shared console's stream as it was
        sweep_cmds._interrupted_while_starting(SPEC, None)
    assert "interrupted while sweep view-test was starting: run the same command again" in capture.get()

"""The sweep as it runs: one rich display updated in place in a terminal, one plain line per event when
piped. It receives `sweep.events` objects from the runner (passed down as a listener) and prints nothing
of Ray's own."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.text import Text

from sweep import events

STATE_STYLE = {events.DONE: "green", events.STOPPED_EARLY: "yellow", events.DIVERGED: "red",
               events.FAILED: "bold red"}


def fmt_value(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt_params(params: dict[str, Any]) -> str:
    """`lr=0.0043 hidden_size=50 decay=0.91`: a trial's sampled parameters, model choice left out."""
    return " ".join(f"{k}={fmt_value(v)}" for k, v in params.items() if k != "model")


def fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


ENDED_INDENT = 15  # a trial-end line's parameters, under its model (after `stopped early  `)


def _packed(fields: list[tuple[str, str]], width: int, indent: int, lead: int = 0) -> str:
    """(separator before it, markup) fields on lines of at most `width` cells: the first line indented by
    `lead`, the others by `indent`. A line breaks between two fields, never inside one (`epoch` / `6/6`)."""
    out, used = f"{'':{lead}}", lead
    for i, (sep, item) in enumerate(fields):
        cells = Text.from_markup(item).cell_len
        if i and used + len(sep) + cells > width:
            out, used = f"{out}\n{'':{indent}}{item}", indent + cells
        else:
            sep = sep if i else ""
            out, used = f"{out}{sep}{item}", used + len(sep) + cells
    return out


@dataclass
class _Running:
    model: str
    epoch: int = 0
    value: float | None = None


@dataclass
class _State:
    """What the view knows of the current sweep."""

    sweep: events.SweepStarted | None = None
    phase: str = ""
    counts: events.Counts | None = None
    running: dict[str, _Running] = field(default_factory=dict)
    best: events.TrialEnded | None = None
    started: float = field(default_factory=time.monotonic)

    def better(self, ended: events.TrialEnded) -> bool:
        if ended.value is None or ended.state in (events.FAILED, events.DIVERGED):
            return False
        if self.best is None or self.best.value is None:
            return True
        up = self.sweep is None or self.sweep.mode == "max"
        return ended.value > self.best.value if up else ended.value < self.best.value


class SweepView:
    """A listener for `sweep.runner.run_sweep(on_event=...)`; use as a context manager around the run."""

    def __init__(self, console: Console, live: bool | None = None) -> None:
        self.console = console
        self.live_mode = console.is_terminal if live is None else live
        self.state = _State()
        self._live: Live | None = None
        self._spinner = Spinner("dots")

    def __enter__(self) -> SweepView:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_live()

    # ------------------------------------------------------------------ events

    def __call__(self, event: events.Event) -> None:
        s = self.state
        if isinstance(event, events.Phase):
            s.phase = event.text
            if not self.live_mode:  # live, the spinner line says it
                self._line(f"[dim]{escape(event.text)}[/]")
            self._start_live()
        elif isinstance(event, events.SweepStarted):
            self.state = _State(sweep=event, phase="waiting for the first trial", started=s.started)
            how = "resumed" if event.resumed else "started"
            goal = "maximising" if event.mode == "max" else "minimising"
            trials = f"{event.total} trial" + ("s" if event.total != 1 else "")
            at_once = min(event.max_concurrent, event.total)
            self._line(f"[bold]{escape(event.name)}[/] {how}: {trials} ({at_once} at a time, "
                       f"<= {event.max_epochs} epochs each), {goal} {event.metric}")
            self._start_live()
        elif isinstance(event, events.SweepEnded):
            self._stop_live()
        elif isinstance(event, events.Counts):
            s.counts = event
        elif isinstance(event, events.TrialStarted):
            s.running[event.trial_id] = _Running(event.model)
            if not self.live_mode:  # in the live view the running trials are listed in place
                how = "resumed" if event.resumed else "started"
                self._line(f"{how:<13}  {event.model} {event.trial_id}  {escape(fmt_params(event.params))}")
        elif isinstance(event, events.TrialReport):
            run = s.running.get(event.trial_id)
            if run is not None:
                run.epoch, run.value = event.epoch, event.value
        elif isinstance(event, events.TrialEnded):
            if s.running.pop(event.trial_id, None) is not None and s.counts is not None:
                c = s.counts  # Tune's next count comes after this event: count it here
                s.counts = events.Counts(c.done + 1, max(0, c.running - 1), c.pending, c.total)
            new_best = s.better(event)
            if new_best:
                s.best = event
            self._line(self._ended_line(event, new_best))
        self._refresh()

    # ------------------------------------------------------------------ rendering

    def _ended_line(self, e: events.TrialEnded, new_best: bool) -> str:
        """`stopped early  fw_rnn 6ffef00c  val_accuracy 0.2890  epoch 1/6  by ASHA` then the parameters
        (on a second line in a terminal, on the same line with `[finished/total]` when piped)."""
        sweep = self.state.sweep
        metric, max_epochs = (sweep.metric, sweep.max_epochs) if sweep else ("metric", e.epochs)
        style = STATE_STYLE.get(e.state, "")
        head = f"[{style}]{e.state:<13}[/]" if style else f"{e.state:<13}"
        value = f"{metric} {fmt_metric(e.value)}" if e.value is not None else "no result"
        first = [head, f"{e.model} {e.trial_id}", value, f"epoch {e.epochs}/{max_epochs}"]
        first += [escape(e.reason)] if e.reason else []
        best = ["[bold green]new best[/]"] if new_best else []
        if self.live_mode:  # no field split across two lines, however narrow the terminal
            params = [(" ", escape(f"{k}={fmt_value(v)}")) for k, v in e.params.items() if k != "model"]
            width = self.console.width
            return (f"{_packed([('  ', f) for f in first], width, ENDED_INDENT)}\n"
                    f"{_packed(params + [('  ', b) for b in best], width, ENDED_INDENT, lead=ENDED_INDENT)}")
        c = self.state.counts
        tally = [f"[dim][{c.done}/{c.total}][/]"] if c else []
        return "  ".join([*first, escape(fmt_params(e.params)), *best, *tally])

    def _summary_line(self) -> str:
        s = self.state
        name = s.sweep.name if s.sweep else ""
        elapsed = time.monotonic() - s.started
        if s.counts is None:
            return f"{escape(s.phase)}  {elapsed:.0f} s"
        c = s.counts
        return (f"[bold]{escape(name)}[/]  {c.done}/{c.total} finished · {c.running} running · "
                f"{c.pending} pending · {elapsed:.0f} s")

    def render(self) -> Group:
        s = self.state
        metric = s.sweep.metric if s.sweep else "metric"
        max_epochs = s.sweep.max_epochs if s.sweep else 0
        lines: list[Any] = [Text.from_markup(self._summary_line())]
        if s.best is not None:
            lines.append(Text.from_markup(
                f"best {metric} [bold green]{fmt_metric(s.best.value)}[/]: {s.best.model} {s.best.trial_id}, "
                f"{escape(fmt_params(s.best.params))}", overflow="fold"))
        for trial_id, run in sorted(s.running.items()):
            lines.append(Text(f"  running  {run.model} {trial_id}  epoch {run.epoch}/{max_epochs}  "
                              f"{metric} {fmt_metric(run.value)}", overflow="ellipsis", no_wrap=True))
        self._spinner.text = lines[0]
        return Group(self._spinner, *lines[1:])

    # ------------------------------------------------------------------ output

    def _line(self, markup: str) -> None:
        self.console.print(markup, soft_wrap=not self.live_mode, highlight=False)

    def _start_live(self) -> None:
        if self.live_mode and self._live is None:
            self._live = Live(self.render(), console=self.console, refresh_per_second=4, transient=True,
                              get_renderable=self.render)
            self._live.start()

    def _stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

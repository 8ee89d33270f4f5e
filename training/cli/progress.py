"""How the command line shows the engine's `Progress` events, and how Ctrl-C / SIGTERM stop a run.

`TqdmProgress` draws one tqdm bar per stage on a terminal; when stderr is a file or a pipe it writes
plain lines instead (every 10% of a stage or 30 s, never carriage returns). It prints the "plan"
event as a header block and "resume" as one line before the first step. After `stop_on_signals()`,
a SIGINT or SIGTERM makes the next event raise `Cancelled`: the training loop then keeps a
checkpoint of the current step and re-raises, and `main` prints where it stopped.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator

from ..progress import Cancelled, Progress

PLAIN_EVERY = 0.1  # of a stage's total, in plain-line mode
PLAIN_SECONDS = 30.0  # at the latest, in plain-line mode
SHOWN_INFO = ("loss", "lr", "note")
NO_RATE = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # tqdm's bar until a rate means something
# stages that are messages, not work with a bar (the demo prefixes them: "[3/8] train lora: plan")
MESSAGES = ("warning", "plan", "resume")


class _Stop:
    """The signal that asked to stop, set by the handler and read by every renderer."""

    signum: int | None = None


def stop_requested() -> int | None:
    """The signal number of a pending Ctrl-C / SIGTERM, or None."""
    return _Stop.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: the first SIGINT/SIGTERM asks the work to stop at its next progress event (a run keeps a
    checkpoint of its current step); a second one stops at once, as Ctrl-C does without this."""
    def ask(signum, _frame):
        if _Stop.signum is not None:
            raise KeyboardInterrupt
        _Stop.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        below_bar = "\n" if sys.stderr.isatty() else ""  # a terminal's bar holds the cursor's line
        print(f"{below_bar}{name}: stopping at the next step (press Ctrl-C again to quit at once, without a "
              "checkpoint)", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield
        return
    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _Stop.signum = None


class TqdmProgress:
    """Renders `Progress` events on stderr: tqdm bars on a terminal, plain lines in a log."""

    open_renderers: list["TqdmProgress"] = []  # closed by `main` before it prints an error

    def __init__(self, plain: bool | None = None) -> None:
        self.plain = not _terminal_columns() if plain is None else plain
        self._bar = None
        self._stage: str | None = None
        self._started = 0.0
        self._first_step = 0
        self._shown_step = -1
        self._shown_at = 0.0
        TqdmProgress.open_renderers.append(self)

    def __call__(self, event: Progress) -> None:
        if _Stop.signum is not None:
            raise Cancelled()  # `main` says where it stopped
        kind = event.stage.rsplit(": ", 1)[-1]
        if kind in MESSAGES:
            self.close()
            if kind == "warning":
                _say(f"warning: {event.info.get('note', '')}")
            elif kind == "plan":
                _say(plan_text(event.info))
            else:
                _say(f"resuming from step {event.step} (checkpoint {event.info.get('checkpoint', '?')})")
            return
        if event.stage != self._stage:
            self.close()
            self._stage, self._started, self._first_step = event.stage, time.monotonic(), event.step
            self._shown_step, self._shown_at = -1, self._started
        if self.plain:
            self._line(event)
        else:
            self._draw(event)
        if event.total and event.step >= event.total:
            self.close()

    def _draw(self, event: Progress) -> None:
        from tqdm import tqdm

        if self._bar is None:  # starts at the event's step, so the rate counts only the work it sees
            self._bar = tqdm(total=event.total, initial=event.step, desc=stage_label(event.stage), unit="step",
                             file=sys.stderr, dynamic_ncols=True)
        self._bar.n = event.step
        self._bar.bar_format = None if self._rate_means_something(event) else NO_RATE
        shown = _shown(event.info)
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        self._bar.refresh()

    def _rate_means_something(self, event: Progress) -> bool:
        """Not from one step, nor from a few milliseconds ("29330.80step/s")."""
        return event.step - self._first_step >= 2 and time.monotonic() - self._started >= 1.0

    def _line(self, event: Progress) -> None:
        now = time.monotonic()
        total = max(event.total, 1)
        every = max(1, int(total * PLAIN_EVERY))
        due = (event.step >= event.total or self._shown_step < 0 or event.step // every > self._shown_step // every
               or now - self._shown_at >= PLAIN_SECONDS)
        if not due:
            return
        self._shown_step, self._shown_at = event.step, now
        parts = [f"{stage_label(event.stage)}: {event.step}/{event.total}"]
        if event.total:
            parts[0] += f" ({100 * event.step // event.total}%)"
        parts += [f"{k} {v}" for k, v in _shown(event.info).items()]
        done, elapsed = event.step - self._first_step, now - self._started
        if self._rate_means_something(event):
            per_step = elapsed / done
            rate = f"{per_step:.2f} s/step" if per_step >= 1 else f"{1 / per_step:.1f} steps/s"
            parts.append(rate + (f", {_clock(per_step * (event.total - event.step))} left"
                                 if event.step < event.total else f", {_clock(elapsed)} in all"))
        _say(", ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = None


def close_all() -> None:
    """An open bar would be drawn again after the error line; close them so the error is the last line."""
    for renderer in TqdmProgress.open_renderers:
        renderer.close()


def plan_text(plan: dict[str, Any]) -> str:
    """The header block a run prints before its first step, from the engine's "plan" event."""
    method = plan.get("method", "?")
    if method == "lora":
        method += f", rank {plan.get('rank')}, alpha {_g(plan.get('alpha'))}, targets {plan.get('targets')}"
    if plan.get("train_text_encoder"):
        method += ", text encoder trained too"
    batch = f"batch {plan.get('batch_size')}"
    if plan.get("grad_accum", 1) != 1:
        batch += f" x {plan['grad_accum']} accumulated"
    lr = f"{_g(plan.get('lr'))}, {plan.get('lr_scheduler')} schedule"
    if plan.get("lr_warmup_steps"):
        lr += f" ({plan['lr_warmup_steps']} warm-up steps)"
    lr += f", {plan.get('optimizer')}, precision {plan.get('mixed_precision')}"
    if plan.get("prior_preservation"):
        prior = (f"on: {plan.get('num_class_images')} class images, "
                 f"{plan.get('class_images_to_generate', 0)} to generate now")
    else:
        prior = "off"
    rows = [("base", f"{plan.get('base')} ({plan.get('family')}, {plan.get('dtype')})"), ("method", method),
            ("resolution", plan.get("resolution")), ("steps", f"{plan.get('steps')}, {batch}"), ("lr", lr),
            ("prior preservation", prior), ("output", plan.get("output")), ("run folder", plan.get("run_dir"))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in rows)


def stage_label(stage: str) -> str:
    """'[2/8] prepare photos: prepare' -> '[2/8] prepare photos': an inner stage's words already in the
    outer label are not repeated ('[7/8] evaluate: evaluate faces' -> '[7/8] evaluate: faces')."""
    outer, sep, inner = stage.rpartition(": ")
    if not sep:
        return stage
    said = set(outer.split())
    rest = [w for w in inner.split() if w not in said]
    return f"{outer}: {' '.join(rest)}" if rest else outer


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _shown(info: dict[str, Any]) -> dict[str, str]:
    return {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in info.items()
            if k in SHOWN_INFO and isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _terminal_columns() -> int:
    """The width of the terminal stderr is on; 0 when it is a file or a pipe, or a terminal of no size
    (under `script`, where tqdm would draw blank lines)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError, AttributeError):
        return 0

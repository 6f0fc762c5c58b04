"""Progress of the demo's stages: done/total, elapsed time and ETA, readable in a terminal and in a log file.

A first run of `sapo demo` on a slow machine spends minutes in one stage; without a moving line it looks hung.
In a terminal one line is rewritten in place (at most once a second); when stdout is a file or a pipe a new
line is written at every `every_percent` of the stage (at most one per `log_interval` seconds, and always the last),
so a log holds a few lines, not carriage-return spam, and a six-second stage one line, not ten.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from transformers import TrainerCallback

BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour on (an ETA is read at a glance, not to the millisecond)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StageProgress:
    """Reports `done` of `total` `unit`s of one stage, with elapsed time and the ETA at the rate so far."""

    def __init__(self, label: str, total: int, unit: str, *, stream: TextIO | None = None,
                 every_percent: int = 10, min_interval: float = 1.0, log_interval: float = 5.0) -> None:
        if total < 1:
            raise ValueError(f"progress of {label!r}: total must be >= 1, got {total}")
        if not 0 < every_percent <= 100:
            raise ValueError(f"progress of {label!r}: every_percent must be in (0, 100], got {every_percent}")
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stdout
        self.every_percent, self.min_interval, self.log_interval = every_percent, min_interval, log_interval
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.done = 0
        self._last_bucket = 0  # last every_percent bucket written (log mode)
        # when a line was last written: a terminal shows the first update at once, a log waits a full interval
        self._last_draw = float("-inf") if self.interactive else self.started
        self._closed = False
        self._drawn = False  # terminal mode: a line is on screen, to be ended by close()
        self._width = 0  # terminal mode: length of the line on screen

    def line(self, now: float | None = None) -> str:
        """`label [####......] done/total unit  elapsed m:ss  ETA m:ss` (ETA unknown before the first unit)."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        filled = BAR_WIDTH * self.done // self.total
        eta = format_duration(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        return (f"      {self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total} {self.unit}"
                f"  elapsed {format_duration(elapsed)}  ETA {eta}")

    def update(self, done: int) -> None:
        """Record that `done` units are complete (clipped to the total) and write a line if one is due."""
        self.done = min(max(done, 0), self.total)
        now = time.perf_counter()
        if self.interactive:
            if now - self._last_draw >= self.min_interval or self.done == self.total:
                self._last_draw, self._drawn = now, True
                line = self.line(now)
                self.stream.write("\r" + line.ljust(self._width))  # pad over a longer previous line (ETA 10:00)
                self._width = len(line)
                self.stream.flush()
            return
        bucket = self.done * 100 // self.total // self.every_percent
        if bucket > self._last_bucket and (now - self._last_draw >= self.log_interval or self.done == self.total):
            self._last_bucket, self._last_draw = bucket, now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the stage's line (terminal mode); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


class TrainerProgress(TrainerCallback):
    """Feeds a `StageProgress` from the Trainer's optimizer steps (the demo turns the Trainer's tqdm bar off: its
    `\\r` redraws fill a log file)."""

    def __init__(self, label: str, total_steps: int, *, stream: TextIO | None = None) -> None:
        self.progress = StageProgress(label, total_steps, "steps", stream=stream)

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.progress.close()

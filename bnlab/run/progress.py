"""Training progress: a rich bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """``update`` at log steps, ``evaluated`` after each evaluation; ``mode`` is
    rich | plain | off (``auto`` picks by the terminal)."""

    def __init__(self, total: int, start: int, mode: str = "auto", label: str = "train",
                 lines: int = 10) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.total, self.label = mode, total, label
        self.last_line = start
        self.line_every = max(1, total // lines)
        self.t0 = time.perf_counter()
        self.train_text = self.eval_text = ""  # the bar shows the last of each
        self.bar = None
        if mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task(label, total=total, completed=start, metrics="")
            self.bar.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self.mode == "rich":
            self.train_text = text
            self.bar.update(self.task, completed=step, metrics=f"{text}{self.eval_text}")
        elif self.mode == "plain" and (step - self.last_line >= self.line_every or step == self.total):
            self.last_line = step
            print(f"[{self.label}] step {step}/{self.total}  {text}  ({self._elapsed()})", flush=True)

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        """Show an evaluation's results when it happens: in the bar, or as a line of its own."""
        text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self.mode == "rich":
            self.eval_text = f"  | {text} @{step}"
            self.bar.update(self.task, metrics=f"{self.train_text}{self.eval_text}")
        elif self.mode == "plain":
            print(f"[{self.label}] step {step}/{self.total}  {text}  ({self._elapsed()})", flush=True)

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.t0:.1f}s"

    def message(self, text: str) -> None:
        if self.mode == "rich":
            self.bar.console.print(text)
        elif self.mode == "plain":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

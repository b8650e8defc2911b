"""Training progress: a rich bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """``update`` at log steps; ``mode`` is rich | plain | off (``auto`` picks by the terminal)."""

    def __init__(self, total: int, start: int, mode: str = "auto", label: str = "train",
                 lines: int = 10) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.total, self.label = mode, total, label
        self.last_line = start
        self.line_every = max(1, total // lines)
        self.t0 = time.perf_counter()
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
            self.bar.update(self.task, completed=step, metrics=text)
        elif self.mode == "plain" and (step - self.last_line >= self.line_every or step == self.total):
            self.last_line = step
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.label}] step {step}/{self.total}  {text}  ({elapsed:.1f}s)", flush=True)

    def message(self, text: str) -> None:
        if self.mode == "rich":
            self.bar.console.print(text)
        elif self.mode == "plain":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

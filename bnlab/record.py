"""One call writes a step's scalars to TensorBoard and to ``scalars.csv``; ``summary.json``.

``scalars.csv`` (``step,tag,value``) is appended and flushed as scalars happen, so a run killed
at any moment leaves every logged step readable; reports read it, never the event files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bnlab.rundir import SCALARS_CSV


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON via a temporary file and a rename: readers see the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_scalars(path: Path, after_step: int) -> None:
    """Drop rows logged after ``after_step`` (and a half-written last line) before a resume."""
    if not path.is_file():
        return
    keep = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            head = line.split(",", 1)[0]
            if head == "step" or (head.isdigit() and int(head) <= after_step):
                keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


class Recorder:
    """Writes scalars (TensorBoard + CSV) and histograms (TensorBoard) of one run."""

    def __init__(self, run_dir: Path, purge_step: int | None = None, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        self.csv = None
        if not enabled:  # ranks other than 0 under torch.distributed
            return
        from torch.utils.tensorboard import SummaryWriter

        csv_path = self.run_dir / SCALARS_CSV
        if purge_step is not None:
            truncate_scalars(csv_path, purge_step)
        new = not csv_path.is_file() or csv_path.stat().st_size == 0
        self.csv = open(csv_path, "a", buffering=1 << 16)
        if new:
            self.csv.write("step,tag,value\n")
        # purge_step makes TensorBoard hide events at and after it from an earlier, killed attempt.
        self.writer = SummaryWriter(str(self.run_dir), purge_step=purge_step, flush_secs=30)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``{tag: value}`` at ``step`` in both sinks; the CSV is flushed at once."""
        if not self.enabled or not values:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        floats = {tag: float(value) for tag, value in values.items()}
        # One event holding every value of the step: add_scalar per tag costs ~55 us each.
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in floats.items()])
        self.writer.file_writer.add_summary(summary, step)
        self.csv.write("".join(f"{step},{tag},{value!r}\n" if math.isfinite(value)
                               else f"{step},{tag},{value}\n" for tag, value in floats.items()))
        self.csv.flush()

    def histogram(self, tag: str, values, step: int) -> None:
        if self.enabled:
            self.writer.add_histogram(tag, values, step)

    def layout(self, layout: dict) -> None:
        """A TensorBoard custom-scalars layout (charts grouping tags)."""
        if self.enabled:
            self.writer.add_custom_scalars(layout)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """TensorBoard HParams of this run: its config and the metrics to compare runs by.

        Written into the run's own event file (``SummaryWriter.add_hparams`` would start a new
        sub-run), so the HParams dashboard lists each run of a sweep under its own name. The
        dashboard shows, for each metric tag, the last scalar the run logged under that tag:
        name tags the run logs (``test/acc``, ``train/loss``). Numbers stay numbers; booleans
        and lists are written as text ("True", "[100, 100]"); ``None`` values are left out.
        """
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        def plain(value: Any) -> int | float | str:
            if hasattr(value, "item"):  # numpy and torch scalars
                value = value.item()
            # torch would store a bool as the number 0 or 1: text reads better in the dashboard.
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            return value if is_number or isinstance(value, str) else str(value)

        summaries = hparams_summaries(
            {k: plain(v) for k, v in hparams.items() if v is not None},
            {k: float(v) for k, v in metrics.items()})
        for summary in summaries:  # experiment, session start info, session end info
            self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        if self.enabled:
            self.csv.flush()
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.csv.close()
            self.writer.close()
            self.enabled = False

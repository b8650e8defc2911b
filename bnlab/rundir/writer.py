"""One call writes a step's scalars to TensorBoard and to ``scalars.csv``; atomic file writes.

``scalars.csv`` (``step,tag,value``) is appended and flushed as scalars happen, so a run killed
at any moment leaves every logged step readable; reports read it, never the event files.
A write that fails (no space left, no permission) raises :class:`bnlab.errors.WriteError`
naming the file; atomic writes leave no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bnlab.errors import WriteError
from bnlab.rundir.names import HYDRA_DIR, LOCK, SCALARS_CSV, TRAIN_LOG


def atomic_write(path: Path, content: str | bytes | memoryview) -> None:
    """Write ``content`` via a temporary file, fsync and a rename: readers see the old file or
    the new one, whole. On failure the temporary file is removed and :class:`WriteError` names
    ``path``; the previous file is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w" if isinstance(content, str) else "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise WriteError(path, err) from err
        raise


def _json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, _json(data))


def overwrite_json(path: Path, data: Mapping[str, Any]) -> None:
    """Rewrite ``path`` in place: the last resort on a full disk, where the old file's blocks
    are the only space left. Not atomic (a kill mid-write leaves a torn file, which readers
    report as damaged), so only for saying that a run has failed."""
    try:
        with open(path, "r+") as f:
            f.write(_json(data))
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise WriteError(path, err) from err


def truncate_scalars(path: Path, from_step: int) -> None:
    """Drop rows logged at or after ``from_step`` (and a half-written last line) before a
    resume: the rows TensorBoard's ``purge_step=from_step`` hides from the event file."""
    if not path.is_file():
        return
    keep = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            head = line.split(",", 1)[0]
            if head == "step" or (head.isdigit() and int(head) < from_step):
                keep.append(line)
    atomic_write(path, "".join(keep))


def cut_to_whole_records(path: Path) -> None:
    """Cut a TensorBoard event file back to its last whole record.

    A record is ``length`` (8 bytes, little-endian), its CRC (4 bytes), ``length`` bytes of data
    and their CRC (4 bytes). A write cut short (a full disk) leaves half a record at the end,
    which TensorBoard reports as a corrupt file; cutting a file back needs no space.
    """
    try:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            whole = 0
            while whole + 12 <= size:
                f.seek(whole)
                end = whole + 12 + int.from_bytes(f.read(8), "little") + 4
                if end > size:
                    break
                whole = end
            if whole < size:
                f.truncate(whole)
    except OSError:
        pass  # nothing more can be done about this file


# ---------------------------------------------------------------- a run directory that holds nothing
# Hydra's files and the lock: what a run directory holds before training starts.
FRESH = (HYDRA_DIR, TRAIN_LOG, LOCK)
# The nearest directory that existed before this command started (set by `bnlab train`):
# discard_fresh removes the folders made for the run (``outputs/<date>/``) up to it, never
# one that was there before. None: only the run directory itself is removed.
existed_before: Path | None = None


def looks_fresh(run_dir: Path) -> bool:
    """Only Hydra's own files and the lock: nothing a user would miss if the directory went away."""
    return all(p.name in FRESH for p in Path(run_dir).iterdir())


def discard_fresh(run_dir: Path) -> bool:
    """Remove ``run_dir`` if it holds nothing of a run (:func:`looks_fresh`), and the empty
    folders above it up to :data:`existed_before`; True if it was removed."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir() or not looks_fresh(run_dir):
        return False
    return _remove(run_dir)


def discard_fresh_sweep(sweep_dir: Path) -> bool:
    """Remove a sweep directory that holds no run yet (Hydra's ``multirun.yaml`` and empty
    folders only), and the empty folders above it up to :data:`existed_before`."""
    sweep_dir = Path(sweep_dir).absolute()
    if not sweep_dir.is_dir():
        return False
    if any(p != sweep_dir / "multirun.yaml" for p in sweep_dir.rglob("*") if not p.is_dir()):
        return False
    return _remove(sweep_dir)


def _remove(folder: Path) -> bool:
    shutil.rmtree(folder, ignore_errors=True)
    stop = existed_before.absolute() if existed_before is not None else None
    parent = folder.parent
    while stop is not None and stop in parent.parents:
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent
    return not folder.exists()


def _quiet_tensorboard_thread(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread keeps its write error and raises it again at the next
    write, where the Recorder turns it into one line: its own traceback is noise."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
        return
    _default_excepthook(args)


_default_excepthook = threading.excepthook


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Name ``path`` in the error when a write inside fails."""
    try:
        yield
    except OSError as err:
        raise WriteError(path, err) from err


class Recorder:
    """Writes scalars (TensorBoard + CSV) and histograms (TensorBoard) of one run."""

    def __init__(self, run_dir: Path, purge_step: int | None = None, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        self.csv_fd = None
        if not enabled:  # ranks other than 0 under torch.distributed
            return
        from torch.utils.tensorboard import SummaryWriter

        threading.excepthook = _quiet_tensorboard_thread
        self.csv_path = self.run_dir / SCALARS_CSV
        if purge_step is not None:
            truncate_scalars(self.csv_path, purge_step)
        with _writing(self.csv_path):
            # Unbuffered appends: each call is one write, undone whole if it fails (no half rows).
            self.csv_fd = os.open(self.csv_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.csv_size = os.fstat(self.csv_fd).st_size
        if self.csv_size == 0:
            self._append("step,tag,value\n")
        # purge_step makes TensorBoard hide events at and after it from an earlier, killed attempt.
        with _writing(self.run_dir / "events.out.tfevents.*"):
            self.writer = SummaryWriter(str(self.run_dir), purge_step=purge_step, flush_secs=30)
        self.events_path = Path(getattr(self.writer.file_writer.event_writer, "_file_name",
                                        self.run_dir / "events.out.tfevents.*"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``{tag: value}`` at ``step`` in both sinks; the CSV is flushed at once."""
        if not self.enabled or not values:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        floats = {tag: float(value) for tag, value in values.items()}
        # One event holding every value of the step: add_scalar per tag costs ~55 us each.
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in floats.items()])
        with _writing(self.events_path):
            self.writer.file_writer.add_summary(summary, step)
        self._append("".join(f"{step},{tag},{value!r}\n" if math.isfinite(value)
                             else f"{step},{tag},{value}\n" for tag, value in floats.items()))

    def _append(self, text: str) -> None:
        """Append ``text`` to scalars.csv; on failure the file is cut back to its whole rows."""
        data = text.encode()
        try:
            _write_all(self.csv_fd, data)
        except OSError as err:
            with contextlib.suppress(OSError):  # cutting a file back needs no space
                os.ftruncate(self.csv_fd, self.csv_size)
            raise WriteError(self.csv_path, err) from err
        self.csv_size += len(data)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.enabled:
            with _writing(self.events_path):
                self.writer.add_histogram(tag, values, step)

    def layout(self, layout: dict) -> None:
        """A TensorBoard custom-scalars layout (charts grouping tags)."""
        if self.enabled:
            with _writing(self.events_path):
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
        with _writing(self.events_path):
            for summary in summaries:  # experiment, session start info, session end info
                self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        if self.enabled:  # scalars.csv has no buffer
            with _writing(self.events_path):
                self.writer.flush()

    def close(self) -> None:
        """Flush and close both sinks; a write that fails here raises :class:`WriteError`."""
        if not self.enabled:
            return
        self.enabled = False
        os.close(self.csv_fd)
        try:
            self.writer.close()
        except OSError as err:
            cut_to_whole_records(self.events_path)
            raise WriteError(self.events_path, err) from err

    def abandon(self) -> None:
        """Close after a failure: whatever the sinks still hold is dropped, and nothing raises."""
        if not self.enabled:
            return
        self.enabled = False
        os.close(self.csv_fd)
        with contextlib.suppress(Exception):
            self.writer.close()
        cut_to_whole_records(self.events_path)  # a write the failure cut short

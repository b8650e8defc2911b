"""Reads run directories back (their files are described in docs/run-directory.md).

A run directory holds ``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` (Hydra's own),
``scalars.csv`` (``step,tag,value``, appended as training goes) and ``summary.json``. Any of the
last two may be missing, half-written or corrupt (a run killed at any moment, a full disk): a
:class:`Run` then says what is wrong in ``problems`` instead of raising, so one bad run never
stops a report.

Only numpy and yaml are imported here: ``bnlab report --help`` stays fast.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bnlab.errors import UserError
from bnlab.rundir.lock import process_status
from bnlab.rundir.names import CONFIG, HYDRA_DIR, OVERRIDES, SCALARS_CSV, SUMMARY_JSON, holds_run

HEADER = b"step,tag,value"
# Folders that never hold runs: a report's output, Hydra's and the trainer's own.
SKIP_DIRS = {"report", ".hydra", "checkpoints", "__pycache__"}

# Status of a run whose files cannot be trusted, and of one that never wrote summary.json.
DAMAGED = "damaged"
NO_SUMMARY = "no summary"
HALF_LINE = "last line of scalars.csv incomplete"


class Series(NamedTuple):
    """One tag's values in step order."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64


@dataclass
class Run:
    """One run directory: flattened config, overrides, summary and (read on demand) scalars."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)  # "optim.lr" -> 0.1; lists as tuples
    overrides: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    claims: list[Any] = field(default_factory=list)  # the preset's top-level claims: (not config)
    problems: list[str] = field(default_factory=list)  # what is wrong with the files, if anything
    _scalars: dict[str, Series] | None = None
    _damaged: bool = False

    @property
    def status(self) -> str:
        """completed | diverged | failed | interrupted | running (summary.json); ``killed`` when
        it says running but its process is gone; ``no summary``; or ``damaged`` when a file the
        run should have written cannot be read."""
        if self._damaged:
            return DAMAGED
        return process_status(self.path, str(self.summary.get("status", NO_SUMMARY)))

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def scalars(self) -> dict[str, Series]:
        """``{tag: Series}`` from ``scalars.csv``: read on first use (all tags), or the tags
        :func:`load_scalars` was asked for."""
        if self._scalars is None:
            self.set_scalars(*read_scalars(self.path / SCALARS_CSV))
        return self._scalars

    def set_scalars(self, scalars: dict[str, Series], problems: list[str]) -> None:
        """Install scalars read elsewhere (a filtered or parallel read) with their problems."""
        self._scalars = scalars
        self.problems.extend(problems)
        # A half-written last line is what a killed run leaves; in a finished run it is damage.
        finished = self.status in ("completed", "diverged")
        if any(not p.startswith(HALF_LINE) or finished for p in problems):
            self._damaged = True

    def name(self, root: Path | None = None) -> str:
        """The path relative to ``root`` (the sweep directory), or the directory's name."""
        if root is not None:
            try:
                rel = self.path.relative_to(root)
                return str(rel) if str(rel) != "." else self.path.name
            except ValueError:
                pass
        return self.path.name


# ---------------------------------------------------------------- finding runs
def is_run_dir(path: Path) -> bool:
    """A directory holding any of a run's files (a run whose config was lost is still a run:
    the report lists it as damaged rather than leaving it out)."""
    return holds_run(path) or (path / HYDRA_DIR).is_dir()


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """Every run under ``paths``: a run directory, a multirun sweep, or a whole ``outputs/`` tree.

    A run directory is a directory holding ``.hydra/`` or any of a run's files
    (:func:`bnlab.rundir.names.holds_run`); ``report/`` folders are skipped. Raises
    :class:`UserError` for a path that does not exist.
    """
    found: dict[Path, None] = {}
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.exists():
            raise UserError(f"{raw}: no such file or directory")
        if not root.is_dir():
            raise UserError(f"{raw}: not a directory (give a run or sweep directory)")
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            if is_run_dir(here):
                found[here.resolve()] = None
                dirnames[:] = []  # a run holds no runs
                continue
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in SKIP_DIRS and not d.startswith("."))
    return [load_run(path) for path in found]


def load_run(path: Path) -> Run:
    """Read a run's config, overrides and summary (not its scalars: they are read on demand)."""
    run = Run(path=Path(path))
    try:
        raw = _load_yaml(path / CONFIG) or {}
        # A preset's claims describe the experiment; they are never a key that splits groups.
        claims = raw.pop("claims", None) if isinstance(raw, dict) else None
        run.claims = list(claims) if isinstance(claims, list) else []
        run.config = flatten(raw)
    except FileNotFoundError:
        run.problems.append(f"{CONFIG} missing: its config is unknown")
        run._damaged = True
    except (OSError, ValueError) as err:
        run.problems.append(f"{CONFIG} unreadable: {_first_line(err)}")
        run._damaged = True
    if (path / OVERRIDES).is_file():
        try:
            run.overrides = [str(o) for o in _load_yaml(path / OVERRIDES) or []]
        except (OSError, ValueError, TypeError) as err:
            run.problems.append(f".hydra/overrides.yaml unreadable: {_first_line(err)}")
    summary_path = path / SUMMARY_JSON
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
            run.summary = summary
        except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
            run.problems.append(f"summary.json unreadable: {_first_line(err)}")
            run._damaged = True
    return run


def _load_yaml(path: Path) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path) as f:
            return yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``; lists become tuples (hashable)."""
    if not isinstance(tree, dict):
        return {prefix: _hashable(tree)} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = _hashable(value)
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


# ---------------------------------------------------------------- reading scalars.csv
def read_scalars(path: Path, tags: Sequence[str] | None = None,
                 ) -> tuple[dict[str, Series], list[str]]:
    """``({tag: Series}, problems)`` from a ``scalars.csv``, keeping ``tags`` (glob patterns).

    A half-written last line (no newline) is skipped, never parsed. Lines that are not
    ``int,tag,number`` are skipped and counted in ``problems``. When a step appears twice for a
    tag (a resume that did not truncate), the later row wins.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {}, []
    except OSError as err:
        return {}, [f"scalars.csv unreadable: {_first_line(err)}"]
    problems = []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        problems.append(f"{HALF_LINE} ({len(data) - end} bytes, skipped)")
    header_end = data.find(b"\n")
    if header_end < 0:
        return {}, problems
    if data[:header_end].rstrip(b"\r") != HEADER:
        problems.append("scalars.csv does not start with the header step,tag,value")
        header_end = -1  # its first line may be data
    body = data[header_end + 1:end]
    if not body:
        return {}, problems
    rows = _parse_fast(body, tags)
    if rows is None:  # something unusual: the careful line-by-line reader says what
        rows, bad = _parse_careful(body, tags)
        if bad:
            problems.append(f"scalars.csv has {bad} unreadable line(s) (skipped)")
    return rows, problems


def _keep(names: Iterable[str], tags: Sequence[str] | None) -> list[bool]:
    if tags is None:
        return [True for _ in names]
    return [any(fnmatch.fnmatchcase(name, pattern) for pattern in tags) for name in names]


# Little-endian masks keeping the first v bytes of an 8-byte word, v = 0..8.
_BYTE_MASKS = np.array([(1 << (8 * v)) - 1 for v in range(9)], dtype="<u8")


def _parse_fast(body: bytes, tags: Sequence[str] | None) -> dict[str, Series] | None:
    """Vectorized reader for well-formed files; ``None`` when any line is not ``int,tag,float``.

    Python's per-row cost (~1 us on these CPUs) would make a 100-run sweep logged every step
    take minutes; numpy finds the three fields of every line by byte position instead. Tags are
    told apart by a hash of their bytes, then checked byte for byte, so a hash collision can
    only send the file to the careful reader, never mix two tags.
    """
    buf = np.frombuffer(body, np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    commas = np.flatnonzero(buf == ord(","))
    n = len(ends)
    # Exactly two commas on every line: the k-th line end follows the 2k-th comma.
    if len(commas) != 2 * n or not np.array_equal(np.searchsorted(commas, ends),
                                                  2 * np.arange(1, n + 1)):
        return None
    starts = np.concatenate(([0], ends[:-1] + 1))
    c1, c2 = commas[0::2], commas[1::2]
    step_len, tag_len, value_len = c1 - starts, c2 - c1 - 1, ends - c2 - 1
    if (step_len.min() < 1 or step_len.max() > 16 or tag_len.min() < 1
            or value_len.min() < 1 or value_len.max() > 32):
        return None
    tag_width = -(-int(tag_len.max()) // 8) * 8
    fields = _FieldReader(buf, tail=max(32, tag_width))

    tag_words = fields.read(c1 + 1, tag_len, tag_width)
    key = np.zeros(n, np.uint64)
    for k in range(tag_words.shape[1]):  # FNV-style mixing of the 8-byte words
        key = (key * np.uint64(0x100000001B3)) ^ tag_words[:, k]
    _, first, code = np.unique(key, return_index=True, return_inverse=True)
    code = code.ravel()
    if not np.array_equal(tag_words, tag_words[first[code]]):
        return None
    names = [tag_words[i].tobytes().rstrip(b"\0").decode("utf-8", "replace") for i in first]
    keep = np.array(_keep(names, tags), bool)
    rows = np.flatnonzero(keep[code])
    if len(rows) == 0:
        return {}
    # numpy converts fixed-width byte strings the way int() and float() do, or raises.
    try:
        steps = fields.read(starts[rows], step_len[rows], 16).view("S16").ravel().astype(np.int64)
        values = fields.read(c2[rows] + 1, value_len[rows], 32).view("S32").ravel()
        values = values.astype(np.float64)
    except ValueError:
        return None
    return _group(names, code[rows], steps, values, keep)


class _FieldReader:
    """Fields of a byte buffer as rows of little-endian 8-byte words, zeroed past their length."""

    def __init__(self, buf: np.ndarray, tail: int) -> None:
        self.padded = np.concatenate((buf, np.zeros(tail + 8, np.uint8)))
        # One (unaligned) uint64 starting at every byte: a field of w bytes is w/8 gathers.
        self.words = np.ndarray((len(self.padded) - 7,), dtype="<u8", buffer=self.padded,
                                strides=(1,))

    def read(self, offsets: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
        out = np.empty((len(offsets), width // 8), dtype="<u8")
        for j in range(width // 8):
            out[:, j] = self.words[offsets + 8 * j] & _BYTE_MASKS[np.clip(lengths - 8 * j, 0, 8)]
        return out


def _group(names: list[str], code: np.ndarray, steps: np.ndarray, values: np.ndarray,
           keep: np.ndarray) -> dict[str, Series]:
    order = np.argsort(code, kind="stable")
    bounds = np.searchsorted(code[order], np.arange(len(names) + 1))
    series = {}
    for i, name in enumerate(names):
        if keep[i] and bounds[i + 1] > bounds[i]:
            take = order[bounds[i]:bounds[i + 1]]
            series[name] = _in_step_order(steps[take], values[take])
    return series


def _in_step_order(steps: np.ndarray, values: np.ndarray) -> Series:
    if len(steps) > 1 and np.any(np.diff(steps) <= 0):
        # The last row of each step wins; np.unique on the reversed rows finds it.
        unique, last = np.unique(steps[::-1], return_index=True)
        return Series(unique, values[::-1][last])
    return Series(steps, values)


def _parse_careful(body: bytes, tags: Sequence[str] | None) -> tuple[dict[str, Series], int]:
    """Line by line, skipping (and counting) lines that are not ``int,tag,number``."""
    by_tag: dict[str, tuple[list[int], list[float]]] = {}
    bad = 0
    for line in body.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            continue
        parts = line.split(b",")
        try:
            if len(parts) != 3 or not parts[1]:
                raise ValueError
            step, tag, value = int(parts[0]), parts[1].decode("utf-8"), float(parts[2])
        except (ValueError, UnicodeDecodeError):
            bad += 1
            continue
        lists = by_tag.setdefault(tag, ([], []))
        lists[0].append(step)
        lists[1].append(value)
    names = list(by_tag)
    keep = _keep(names, tags)
    series = {name: _in_step_order(np.array(by_tag[name][0], np.int64),
                                   np.array(by_tag[name][1], np.float64))
              for name, wanted in zip(names, keep, strict=True) if wanted}
    return series, bad


def load_scalars(runs: Sequence[Run], tags: Sequence[str] | None = None,
                 workers: int | None = None) -> None:
    """Read the scalars of ``runs`` (only ``tags``, glob patterns), in parallel when they are big.

    Parsing floats is the cost (~0.3 us each on these CPUs); processes share it out once the
    files together pass a few tens of MB, where a pool's start-up is worth paying.
    """
    paths = [run.path / SCALARS_CSV for run in runs]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    workers = workers or min(len(runs), _cores())
    if workers > 1 and total > 32 * 2**20:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(read_scalars, paths, [tags] * len(paths), chunksize=4))
    else:
        results = [read_scalars(p, tags) for p in paths]
    for run, (scalars, problems) in zip(runs, results, strict=True):
        run.set_scalars(scalars, problems)


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

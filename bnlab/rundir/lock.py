"""One writer per run directory: an advisory ``flock`` on ``<run>/.lock``.

The process that writes a run holds the lock for as long as it writes; a second writer (a
second ``resume=`` of the same run, or ``hydra.run.dir`` pointing at a live run) is refused
with the holder's pid, which the holder writes into the file with its host name. The kernel
releases a flock when its process ends, however it ends: a lock left by a killed process
never blocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from bnlab.errors import UserError, WriteError
from bnlab.rundir.names import LOCK


class RunLocked(UserError):
    """Another live process writes this run directory; nothing of it may be touched."""


def holder(run_dir: Path) -> int | None:
    """The pid of the live process holding ``run_dir``'s lock (0 if it has not written its
    pid yet), or None when no process holds it."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody ever wrote, or the run is gone
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(fd)
    finally:
        os.close(fd)  # also releases the shared lock taken just now
    return None


def _pid_in(fd: int) -> int:
    text = os.pread(fd, 300, 0).decode(errors="replace").split()
    return int(text[0]) if text and text[0].isdigit() else 0


KILLED = "killed"


def process_status(run_dir: Path, status: str) -> str:
    """``status`` as summary.json says, except ``killed`` for a ``running`` run that no process
    holds: its process ended without a word (SIGKILL, out of memory, a lost node).

    Only a lock taken on this machine can tell: flock is not seen across the machines of a
    cluster file system, so a run written elsewhere (its host is in the lock file) stays
    ``running``.
    """
    if status != "running":
        return status
    try:
        words = (Path(run_dir) / LOCK).read_text(errors="replace").split()
    except OSError:
        return status  # no lock file: written before locks, or elsewhere
    if len(words) < 2 or words[1] != socket.gethostname():
        return status
    return KILLED if holder(run_dir) is None else status


def refusal(run_dir: Path, pid: int) -> str:
    """The one line refusing a second writer."""
    who = f"process {pid}" if pid else "another process"
    return (f"{run_dir} is being written by {who} (it holds {LOCK}): wait for it to end, "
            "or stop it first")


@contextlib.contextmanager
def hold(run_dir: Path, wait_s: float = 1.0) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body; raise :class:`RunLocked` if another process has it.

    Waits up to ``wait_s`` for the lock: :func:`holder` takes it for an instant when it looks.
    """
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise WriteError(path, err) from err
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunLocked(refusal(Path(run_dir), _pid_in(fd))) from None
                time.sleep(0.05)
        with contextlib.suppress(OSError):  # the pid is for messages only: a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)

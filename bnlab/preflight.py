"""Checks on `bnlab train`'s command line before Hydra creates anything."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bnlab.errors import UserError


def check_output_dir(argv: list[str]) -> None:
    """Fail with one line when the run (or sweep) directory could not be created.

    Hydra would otherwise die with a traceback from ``mkdir``. A throw-away temporary folder in
    the nearest existing ancestor is the only test that also holds for root and odd filesystems.
    """
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith(key + "=")]
    target = Path(given[-1]).expanduser() if given and "${" not in given[-1] else Path("outputs")
    ancestor = target.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{key}={target}: {ancestor} is not a directory")
    try:
        with tempfile.TemporaryDirectory(dir=ancestor, prefix=".bnlab-write-test-"):
            pass
    except OSError as err:
        raise UserError(f"{key}={target}: cannot write under {ancestor} ({err.strerror})") from err

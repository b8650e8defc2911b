"""`resume=<run dir>`: rebuild the run's own command line so Hydra composes the same config.

The run continues in its own directory (``hydra.run.dir=<run>``) without a new ``.hydra/``
(``hydra.output_subdir=null``). Overrides that would change the experiment are refused.
"""

from __future__ import annotations

from pathlib import Path

from bnlab.errors import UserError
from bnlab.rundir.names import CHECKPOINT, CONFIG, OVERRIDES

# Keys a resumed run may change: where it runs, how it reports, and how far it goes.
RESUMABLE_KEYS = ("device", "train.progress", "train.threads", "train.steps", "train.epochs")


def run_files(run: Path) -> tuple[Path, Path, Path]:
    return run / CONFIG, run / OVERRIDES, run / CHECKPOINT


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_argv(argv: list[str]) -> list[str]:
    """Return Hydra overrides for resuming, or ``argv`` unchanged when it has no ``resume=``."""
    values = [a.split("=", 1)[1] for a in argv if _key(a) == "resume"]
    if not values or values[-1] in ("", "null"):
        return argv
    run = Path(values[-1]).expanduser().resolve()
    config, overrides, checkpoint = run_files(run)
    if not run.is_dir():
        raise UserError(f"resume={values[-1]}: no such directory")
    if not config.is_file() or not overrides.is_file():
        raise UserError(f"resume={values[-1]}: not a bnlab run directory (no {CONFIG})")
    if not checkpoint.is_file():
        raise UserError(f"resume={values[-1]}: the run has no checkpoint yet "
                        f"({CHECKPOINT}); start it again instead")
    if any(a in ("-m", "--multirun") for a in argv):
        raise UserError("resume= continues one run; it cannot be combined with -m")

    new = [a for a in argv if _key(a) != "resume"]
    refused = [a for a in new if not a.startswith("-") and _key(a) not in RESUMABLE_KEYS]
    if refused:
        raise UserError(f"resume=: cannot change the experiment of a run ({' '.join(refused)}); "
                        f"only {', '.join(RESUMABLE_KEYS)} may be given")

    from omegaconf import OmegaConf

    saved = [str(o) for o in OmegaConf.load(overrides)]
    changed = {_key(a) for a in new if not a.startswith("-")}
    kept = [o for o in saved if _key(o) not in changed and _key(o) != "resume"]
    quoted = str(run).replace("'", "\\'")
    return [*kept, *new, f"resume='{quoted}'", f"hydra.run.dir='{quoted}'", "hydra.output_subdir=null"]

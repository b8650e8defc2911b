"""The names of a run directory's files, declared once for the writers and the readers.

Paths are relative to the run directory (see docs/run-directory.md). Only ``pathlib`` is
imported: ``bnlab report`` reads these names without loading torch.
"""

from __future__ import annotations

from pathlib import Path

HYDRA_DIR = ".hydra"  # Hydra's own copy of the config (hydra.output_subdir)
CONFIG = Path(HYDRA_DIR) / "config.yaml"
OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"
SCALARS_CSV = "scalars.csv"  # step,tag,value
SUMMARY_JSON = "summary.json"
CHECKPOINT = Path("checkpoints") / "last.pt"
# Hydra's job log is named after hydra.job.name (configs/train.yaml sets it to "train").
TRAIN_LOG = "train.log"
LOCK = ".lock"  # flock-ed by the one process writing the run
EVENTS_GLOB = "events.out.tfevents.*"  # TensorBoard's event files


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a run: a saved config, a summary, scalars, a
    checkpoint or TensorBoard events. Such a directory is written only by ``resume=`` of that run."""
    run_dir = Path(run_dir)
    if any((run_dir / name).exists() for name in (CONFIG, SUMMARY_JSON, SCALARS_CSV, CHECKPOINT)):
        return True
    return run_dir.is_dir() and any(run_dir.glob(EVENTS_GLOB))

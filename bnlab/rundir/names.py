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

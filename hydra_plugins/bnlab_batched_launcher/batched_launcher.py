"""The Launcher class Hydra instantiates for ``hydra/launcher=batched``.

Hydra imports every module of its plugin packages at start-up: this one stays light, and the
work (which imports torch) is in :mod:`bnlab.batched.launch`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class BatchedLauncher(Launcher):
    def __init__(self, vary: Sequence[str] = ("seed",), max_group: int = 64) -> None:
        self.vary: list[str] = list(vary)
        self.max_group = int(max_group)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bnlab.batched.launch import launch

        return launch(self, job_overrides, initial_job_idx)

"""The schema of ``hydra/launcher=batched`` (every key can be set as ``hydra.launcher.<key>=...``).

No ``from __future__ import annotations`` here: Hydra's plugin scanner runs this module before it
is in ``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.bnlab_batched_launcher.batched_launcher.BatchedLauncher"
    # The keys in which the runs of one program may differ: a subset of these four.
    vary: list[str] = field(
        default_factory=lambda: ["seed", "optim.lr", "optim.momentum", "optim.weight_decay"])
    # At most this many runs in one program (memory); larger groups are split. 0: no limit.
    max_group: int = 64


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf,
                             provider="bnlab")

"""The options of each norm: the ``norm.*`` keys, with their defaults and bounds.

One dataclass per ``norm=<name>``: its ``name`` field's default is that name, its other fields
are the norm's keys (``choice``, ``positive``, ``unit_interval``, ... from :mod:`bnlab.config.bounds`),
and ``sync`` (cross-replica statistics under torchrun) is a key of the norms that have them.
:data:`NORM_SCHEMAS` lists them all: the one list of norm names. The layers
(:mod:`bnlab.norms`) take their constructors' defaults from these classes and register against
them. Nothing here imports torch, so Hydra composes a config, and ``bnlab train --help``
answers, without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import MISSING, DictConfig

from bnlab.config.bounds import (
    at_least,
    bounded,
    choice,
    invalid,
    non_negative,
    optional_at_least,
    positive,
    unit_interval,
)


@dataclass
class NormOptions:
    """Options of every norm: ``norm.name`` and ``norm.position``."""

    name: str = MISSING
    # before_act: linear/conv -> norm -> activation (the layer's bias dropped); after_act: -> act -> norm
    position: str = choice("before_act", "before_act", "after_act")

    @classmethod
    def check(cls, norm: DictConfig, widths: list[int], batch_size: int) -> None:
        """Checks relating this norm's keys to each other, to the model's hidden ``widths`` or to
        ``batch_size``, the examples one process normalizes per training step (``train.batch_size``
        / processes).

        Run by ``bnlab.config.schema.validate`` after the bounds of the fields; raise
        :func:`bnlab.config.bounds.invalid` for a bad value.
        """


def ghost_batch() -> int | None:
    """``ghost_batch``: the normalization batch, K consecutive examples of the training batch
    (Hoffer et al. 2017's ghost batch, Ioffe 2017's micro-batch); null = the whole batch."""
    return optional_at_least(None, 2, "the whole batch")


def check_ghost_batch(norm: DictConfig, batch_size: int) -> None:
    """A normalization batch must cut the training batch into whole groups."""
    k = norm.get("ghost_batch")
    if k is not None and batch_size % k:
        raise invalid("norm.ghost_batch", k, f"null or a divisor of the training batch ({batch_size} "
                      "examples per process: train.batch_size / processes)")


@dataclass
class NoneOptions(NormOptions):
    """``norm=none``: no normalization."""

    name: str = "none"
    # No statistics, so no normalization batch: accepted and without effect, so that one sweep
    # can vary norm.ghost_batch across norms (brn_small_batch's none control).
    ghost_batch: int | None = ghost_batch()


@dataclass
class TorchKernelOptions(NormOptions):
    """The norms that torch has a kernel for: ``impl=torch`` (the default, the fast path on every
    device) or ``scratch`` (the paper's equations in Python, the reference)."""

    impl: str = choice("torch", "torch", "scratch")


@dataclass
class GhostBatchOptions(NormOptions):
    """``norm.ghost_batch`` of the layers that normalize with batch statistics (bn, noisy_bn, brn)."""

    ghost_batch: int | None = ghost_batch()

    @classmethod
    def check(cls, norm: DictConfig, widths: list[int], batch_size: int) -> None:
        check_ghost_batch(norm, batch_size)


@dataclass
class BatchStatisticsOptions(TorchKernelOptions, GhostBatchOptions):
    """The keys of the layers built on BN's batch statistics (``bn``, ``noisy_bn``)."""

    momentum: float = unit_interval(0.1)
    eps: float = positive(1e-5)
    inference: str = choice("moving", "moving", "population")


@dataclass
class BNOptions(BatchStatisticsOptions):
    """``norm=bn``."""

    name: str = "bn"
    sync: bool = False

    @classmethod
    def check(cls, norm: DictConfig, widths: list[int], batch_size: int) -> None:
        if norm.sync and norm.ghost_batch is not None:
            raise invalid("norm.ghost_batch", norm.ghost_batch,
                          "null with norm.sync=true (statistics over all replicas' batches)")
        super().check(norm, widths, batch_size)


@dataclass
class NoiseOptions(NormOptions):
    """The noise of Santurkar et al. 2018 (Sec. 2.1, App. A.2.1, Alg. 1), per unit and step."""

    mean_range: float = non_negative(0.5)
    std_low: float = positive(1.0)
    std_high: float = 1.25  # >= std_low (checked below)
    mean_jitter: float = non_negative(0.1)
    std_jitter: float = non_negative(0.1)

    @classmethod
    def check(cls, norm: DictConfig, widths: list[int], batch_size: int) -> None:
        if norm.std_high < norm.std_low:
            raise invalid("norm.std_high", norm.std_high, f"a number >= norm.std_low ({norm.std_low})")


@dataclass
class NoisyBNOptions(NoiseOptions, BatchStatisticsOptions):
    """``norm=noisy_bn``: BN's options and the noise's (Santurkar et al. 2018, Sec. 2.1)."""

    name: str = "noisy_bn"

    @classmethod
    def check(cls, norm: DictConfig, widths: list[int], batch_size: int) -> None:
        NoiseOptions.check(norm, widths, batch_size)
        GhostBatchOptions.check(norm, widths, batch_size)


@dataclass
class NoisyNoneOptions(NoiseOptions):
    """``norm=noisy_none``: the noise of ``noisy_bn`` without the normalization (the control of
    Santurkar et al. 2018, Sec. 2.1)."""

    name: str = "noisy_none"


@dataclass
class BRNOptions(TorchKernelOptions, GhostBatchOptions):
    """``norm=brn``: the defaults are the paper's Sec. 4 schedule."""

    name: str = "brn"
    momentum: float = unit_interval(0.01)
    eps: float = positive(1e-5)
    r_max: float = at_least(3.0, 1, "a number")
    d_max: float = non_negative(5.0)
    warmup_steps: int = at_least(5000, 0)
    ramp_steps: int = at_least(35000, 0)  # r_max reaches its value at warmup + ramp (paper: 40k steps)
    d_ramp_steps: int = at_least(20000, 0)  # d_max reaches its value at warmup + d_ramp (paper: 25k)


@dataclass
class LNOptions(TorchKernelOptions):
    """``norm=ln``."""

    name: str = "ln"
    eps: float = positive(1e-5)
    # Per-sample statistics: no normalization batch, accepted without effect (see NoneOptions).
    ghost_batch: int | None = ghost_batch()


@dataclass
class GNOptions(TorchKernelOptions):
    """``norm=gn``."""

    name: str = "gn"
    groups: int = at_least(2, 1)  # divides every default width (LeNet's 6 channels included)
    eps: float = positive(1e-5)
    ghost_batch: int | None = ghost_batch()  # no effect, as for ln

    @classmethod
    def check(cls, norm: DictConfig, widths: list[int], batch_size: int) -> None:
        if any(w % norm.groups for w in widths):
            raise invalid("norm.groups", norm.groups,
                          f"a divisor of every hidden width ({', '.join(map(str, widths))})")


LP_NORMS = (1.0, 2.0, math.inf)


@dataclass
class LpNormOptions(NormOptions):
    """The keys of the l_p normalizations (Santurkar et al. 2018, Sec. 3.3)."""

    momentum: float = unit_interval(0.1)
    eps: float = positive(1e-5)


@dataclass
class LpOptions(LpNormOptions):
    """``norm=lp``: any of the three, by ``p``."""

    name: str = "lp"
    p: float = bounded(2.0, lambda v: v in LP_NORMS, "1, 2 or inf")


# One option of its own per p, as zca/pca/iternorm are whiten's methods, so that
# `-m norm=none,bn,l1,l2,linf` is one sweep (norm.p exists for lp only).
@dataclass
class L1Options(LpNormOptions):
    """``norm=l1``: ``lp`` with p = 1."""

    name: str = "l1"


@dataclass
class L2Options(LpNormOptions):
    """``norm=l2``: ``lp`` with p = 2."""

    name: str = "l2"


@dataclass
class LinfOptions(LpNormOptions):
    """``norm=linf``: ``lp`` with p = inf."""

    name: str = "linf"


WHITENING_METHODS = ("zca", "pca", "iter")


@dataclass
class WhiteningOptions(NormOptions):
    """The keys of the whitening norms (``zca``, ``pca``; the others extend it)."""

    group_size: int | None = optional_at_least(16, 1, "the whole layer")
    momentum: float = unit_interval(0.1)
    eps: float = positive(1e-5)


@dataclass
class ZCAOptions(WhiteningOptions):
    """``norm=zca``."""

    name: str = "zca"


@dataclass
class PCAOptions(WhiteningOptions):
    """``norm=pca``."""

    name: str = "pca"
    # false: eigenvectors as the eigendecomposition returns them, so their signs may flip from
    # batch to batch, part of the stochastic axis swapping of Huang et al. 2018, Sec. 3.1.
    fix_signs: bool = False


@dataclass
class IterNormOptions(WhiteningOptions):
    """``norm=iternorm``."""

    name: str = "iternorm"
    iters: int = at_least(5, 1)


@dataclass
class WhitenOptions(IterNormOptions):
    """``norm=whiten``: any of the three, by ``method``."""

    name: str = "whiten"
    method: str = choice("zca", *WHITENING_METHODS)
    fix_signs: bool = False  # method=pca only (PCAOptions)


# Every norm, by the name ``norm=<name>`` selects (configs/norm/<name>.yaml).
NORM_SCHEMAS: dict[str, type[NormOptions]] = {
    options.name: options
    for options in (NoneOptions, BNOptions, NoisyBNOptions, NoisyNoneOptions, BRNOptions, LNOptions,
                    GNOptions, LpOptions, L1Options, L2Options, LinfOptions, ZCAOptions, PCAOptions,
                    IterNormOptions, WhitenOptions)
}

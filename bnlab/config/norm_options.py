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

from dataclasses import dataclass

from omegaconf import MISSING, DictConfig

from bnlab.config.bounds import (
    at_least,
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
    def check(cls, norm: DictConfig, widths: list[int]) -> None:
        """Checks relating this norm's keys to each other or to the model's hidden ``widths``.

        Run by ``bnlab.config.schema.validate`` after the bounds of the fields; raise
        :func:`bnlab.config.bounds.invalid` for a bad value.
        """


@dataclass
class NoneOptions(NormOptions):
    """``norm=none``: no normalization."""

    name: str = "none"


@dataclass
class TorchKernelOptions(NormOptions):
    """The norms that torch has a kernel for: ``impl=torch`` (the default, the fast path on every
    device) or ``scratch`` (the paper's equations in Python, the reference)."""

    impl: str = choice("torch", "torch", "scratch")


@dataclass
class BatchStatisticsOptions(TorchKernelOptions):
    """The keys of the layers built on BN's batch statistics (``bn``, ``noisy_bn``)."""

    momentum: float = unit_interval(0.1)
    eps: float = positive(1e-5)
    inference: str = choice("moving", "moving", "population")


@dataclass
class BNOptions(BatchStatisticsOptions):
    """``norm=bn``."""

    name: str = "bn"
    sync: bool = False


@dataclass
class NoisyBNOptions(BatchStatisticsOptions):
    """``norm=noisy_bn``: BN's options and the noise's (Santurkar et al. 2018, Sec. 2)."""

    name: str = "noisy_bn"
    mean_range: float = non_negative(0.5)
    std_low: float = positive(1.0)
    std_high: float = 1.25  # >= std_low (checked below)
    mean_jitter: float = non_negative(0.1)
    std_jitter: float = non_negative(0.1)

    @classmethod
    def check(cls, norm: DictConfig, widths: list[int]) -> None:
        if norm.std_high < norm.std_low:
            raise invalid("norm.std_high", norm.std_high, f"a number >= norm.std_low ({norm.std_low})")


@dataclass
class BRNOptions(TorchKernelOptions):
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


@dataclass
class GNOptions(TorchKernelOptions):
    """``norm=gn``."""

    name: str = "gn"
    groups: int = at_least(2, 1)  # divides every default width (LeNet's 6 channels included)
    eps: float = positive(1e-5)

    @classmethod
    def check(cls, norm: DictConfig, widths: list[int]) -> None:
        if any(w % norm.groups for w in widths):
            raise invalid("norm.groups", norm.groups,
                          f"a divisor of every hidden width ({', '.join(map(str, widths))})")


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


# Every norm, by the name ``norm=<name>`` selects (configs/norm/<name>.yaml).
NORM_SCHEMAS: dict[str, type[NormOptions]] = {
    options.name: options
    for options in (NoneOptions, BNOptions, NoisyBNOptions, BRNOptions, LNOptions, GNOptions,
                    ZCAOptions, PCAOptions, IterNormOptions, WhitenOptions)
}

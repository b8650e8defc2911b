"""The norm registry: ``norm=<name>`` stands for a layer class and the schema of its options.

A norm is one module of this package (every module in it is imported with the package) and
one config file, ``configs/norm/<name>.yaml``. The module declares its options as a dataclass
extending :class:`NormOptions`, whose fields carry the defaults and bounds of the config's
``norm.*`` keys (the one place they are declared: the layer's constructor takes its defaults
from it), and registers its layer class with it::

    @dataclass
    class CenterOptions(NormOptions):
        momentum: float = unit_interval(0.1)

    @register_norm("center", CenterOptions)
    class Center(Norm):
        def __init__(self, num_features, dims=2, momentum=CenterOptions.momentum): ...

The schema stored for the config is the options dataclass plus ``name`` and, for a layer that
``supports_sync``, ``sync`` (cross-replica statistics under torchrun, default false).
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

from omegaconf import MISSING, DictConfig

from bnlab.bounds import choice
from bnlab.norms.base import Norm

NORMS: dict[str, type[Norm]] = {}
NORM_SCHEMAS: dict[str, type] = {}


@dataclass
class NormOptions:
    """Options of every norm: ``norm.name`` and ``norm.position``."""

    name: str = MISSING
    # before_act: linear/conv -> norm -> activation (the layer's bias dropped); after_act: -> act -> norm
    position: str = choice("before_act", "before_act", "after_act")

    @classmethod
    def check(cls, norm: DictConfig, widths: list[int]) -> None:
        """Checks relating this norm's keys to each other or to the model's hidden ``widths``.

        Run by ``bnlab.config.validate`` after the bounds of the fields; raise
        :func:`bnlab.bounds.invalid` for a bad value.
        """


def register_norm(name: str, options: type = NormOptions):
    """Class decorator: ``norm=<name>`` builds this :class:`Norm` with the keys of ``options``."""
    def add(cls: type[Norm]) -> type[Norm]:
        if name in NORMS:
            raise ValueError(f"norm {name!r} is registered twice ({NORMS[name].__name__}, {cls.__name__})")
        extra = [("name", str, field(default=name))]
        if cls.supports_sync:
            extra.append(("sync", bool, field(default=False)))
        NORMS[name] = cls
        schema = make_dataclass(f"{cls.__name__}Config", extra, bases=(options,))
        schema.__module__ = cls.__module__
        NORM_SCHEMAS[name] = schema
        return cls
    return add


def norm_class(name: str) -> type[Norm]:
    """The layer class registered as ``name``."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose from {', '.join(sorted(NORMS))}")
    return NORMS[name]


def build_norm(name: str, num_features: int, dims: int = 2, **options) -> Norm:
    """Normalization layer ``name`` for ``num_features`` features of a rank-``dims`` input.

    ``dims`` is 2 for (N, C) inputs and 4 for (N, C, H, W); ``options`` are the norm's keys
    (``norm.<option>`` in the config), each defaulting to the config's default.
    """
    cls = norm_class(name)
    if dims not in (2, 4):
        raise ValueError(f"dims must be 2 (N, C) or 4 (N, C, H, W), got {dims}")
    return cls.build(num_features, dims, **options)

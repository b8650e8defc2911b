"""The norm registry: ``norm=<name>`` stands for a layer class and the schema of its options.

A norm is its options class in :mod:`bnlab.config.norm_options` (the ``norm.*`` keys, their defaults and
bounds, and its name), one module of this package holding its layer (every module in it is
imported with the package), and one config file, ``configs/norm/<name>.yaml``. The layer
registers with its options class and takes its constructor's defaults from it::

    @register_norm(MeanBNOptions)
    class MeanBatchNorm(Norm):
        def __init__(self, num_features, dims=2, momentum=MeanBNOptions.momentum): ...

docs/norms.md ("Adding a norm") has that example whole; tests/test_own_norm.py trains it. The
layer may be written as torch writes its own (buffers updated in place in training mode):
measurement passes save and restore every buffer, and vmap is opt-in.

A layer ``supports_sync`` (cross-replica statistics under torchrun) exactly when its options
have the key ``sync``.
"""

from __future__ import annotations

from dataclasses import fields

from bnlab.config.norm_options import NORM_SCHEMAS, NormOptions
from bnlab.norms.base import Norm

NORMS: dict[str, type[Norm]] = {}


def register_norm(options: type[NormOptions]):
    """Class decorator: ``norm=<options.name>`` builds this :class:`Norm` with the keys of ``options``."""
    name = options.name
    if NORM_SCHEMAS.get(name) is not options:
        raise ValueError(f"{options.__name__} is not in bnlab.config.norm_options.NORM_SCHEMAS")

    def add(cls: type[Norm]) -> type[Norm]:
        if name in NORMS:
            raise ValueError(f"norm {name!r} is registered twice ({NORMS[name].__name__}, {cls.__name__})")
        cls.supports_sync = any(f.name == "sync" for f in fields(options))
        NORMS[name] = cls
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

"""A config value's bounds, declared as metadata on its schema field; :func:`check_fields` walks them.

Torch-free, and importing nothing of bnlab's but its errors, so that both the config schemas
(:mod:`bnlab.config.schema`) and the norms' option schemas (:mod:`bnlab.config.norm_options`) can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import field, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bnlab.errors import UserError

Check = Callable[[Any], bool]


def choice(default: Any, *options: str) -> Any:
    """A field whose value must be one of ``options`` (the default is one of them)."""
    return field(default=default, metadata={"check": lambda v: v in options,
                                            "accepted": "one of " + ", ".join(options)})


def bounded(default: Any, check: Check, accepted: str, factory: bool = False) -> Any:
    """A field whose value must satisfy ``check``; ``accepted`` says so in an error message."""
    meta = {"check": check, "accepted": accepted}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def at_least(default: Any, low: float, what: str = "an integer") -> Any:
    return bounded(default, lambda v: v >= low, f"{what} >= {low:g}")


def optional_at_least(default: Any, low: int, none_means: str) -> Any:
    return bounded(default, lambda v: v is None or v >= low, f"null ({none_means}) or an integer >= {low}")


def unit_interval(default: float) -> Any:
    return bounded(default, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def positive(default: float) -> Any:
    return bounded(default, lambda v: math.isfinite(v) and v > 0, "a number > 0")


def non_negative(default: float) -> Any:
    return bounded(default, lambda v: v >= 0, "a number >= 0")


def every_or_never(default: int) -> Any:
    return bounded(default, lambda v: v >= 0, "0 (never) or an integer >= 1")


def invalid(key: str, value: Any, accepted: str) -> UserError:
    """The one-line error for a value out of bounds: ``key=value is not valid: expected ...``."""
    return UserError(f"{key}={value!r} is not valid: expected {accepted}")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def check_fields(node: DictConfig, schema: type, prefix: str) -> None:
    """Raise :func:`invalid` for the first field of ``schema`` whose value in ``node`` breaks its bound."""
    for f in fields(schema):
        if "check" not in f.metadata or f.name not in node:
            continue
        value = _plain(node[f.name])
        if not f.metadata["check"](value):
            raise invalid(prefix + f.name, value, f.metadata["accepted"])

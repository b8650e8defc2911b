"""Config schemas (registered in Hydra's ConfigStore) and range checks.

Types are checked by OmegaConf when Hydra composes the config (``optim.lr=abc`` fails there,
naming the key). Ranges are checked by :func:`validate` before any data is loaded, so a bad
value costs nothing and leaves nothing behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from bnlab.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The Hydra config tree: ``bnlab/conf`` in a wheel, the top-level ``configs/`` in a checkout."""
    shipped = PACKAGE_DIR / "conf"
    return shipped if shipped.is_dir() else PACKAGE_DIR.parent / "configs"


# ---------------------------------------------------------------- norm (one schema per variant)
@dataclass
class NormConfig:
    name: str = MISSING
    position: str = "before_act"  # before_act | after_act
    sync: bool = False  # cross-replica statistics under torch.distributed


@dataclass
class NoNormConfig(NormConfig):
    name: str = "none"


@dataclass
class BNConfig(NormConfig):
    name: str = "bn"
    momentum: float = 0.1
    eps: float = 1e-5
    impl: str = "scratch"  # scratch | torch
    inference: str = "moving"  # moving | population


@dataclass
class BRNConfig(NormConfig):
    name: str = "brn"
    momentum: float = 0.01
    eps: float = 1e-5
    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 5000
    ramp_steps: int = 35000  # r_max reaches its value at warmup + ramp (paper: 40k steps)
    d_ramp_steps: int = 20000  # d_max reaches its value at warmup + d_ramp (paper: 25k steps)


@dataclass
class LNConfig(NormConfig):
    name: str = "ln"
    eps: float = 1e-5


@dataclass
class WhitenConfig(NormConfig):
    name: str = "whiten"
    method: str = "zca"  # zca | pca | iter
    group_size: int | None = 16
    iters: int = 5
    momentum: float = 0.1
    eps: float = 1e-5


@dataclass
class GNConfig(NormConfig):
    name: str = "gn"
    groups: int = 2  # divides every default width (LeNet's 6 channels included)
    eps: float = 1e-5


@dataclass
class NoisyBNConfig(BNConfig):
    name: str = "noisy_bn"
    mean_range: float = 0.5
    std_low: float = 1.0
    std_high: float = 1.25
    mean_jitter: float = 0.1
    std_jitter: float = 0.1


# ---------------------------------------------------------------- other groups
@dataclass
class ActivationConfig:
    name: str = "sigmoid"  # sigmoid | tanh | relu | leaky_relu | gelu | identity


@dataclass
class MLPConfig:
    name: str = "mlp"
    widths: list[int] = field(default_factory=lambda: [100, 100, 100])
    init: str = "default"  # default (torch's layer init) | glorot (Xavier uniform, zero biases)


@dataclass
class CNNConfig:
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [6, 16])
    kernel_size: int = 5
    paddings: list[int] = field(default_factory=lambda: [2, 2])
    pool: str = "max"  # max | avg
    widths: list[int] = field(default_factory=lambda: [120, 84])
    init: str = "default"  # default (torch's layer init) | glorot (Xavier uniform, zero biases)


@dataclass
class VGGConfig:
    name: str = "vgg"
    # channels per conv layer, "M" for a 2x2 max-pool (VGG-11 by default)
    layers: list[Any] = field(
        default_factory=lambda: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    )
    widths: list[int] = field(default_factory=list)
    init: str = "default"  # default (torch's layer init) | glorot (Xavier uniform, zero biases)


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    normalize: bool = True
    download: bool = True
    augment: bool = False  # random crop + flip on the batch (CIFAR-10)


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "constant"  # constant | cosine


@dataclass
class ProbeConfig:
    name: str = "default"
    enabled: bool = True
    every: int = 100
    batch_size: int = 1000
    unit: int = 0
    hist_every: int = 0  # 0 = never
    ics_every: int = 0  # 0 = never


@dataclass
class TrainLoopConfig:
    steps: int = 8000
    epochs: int | None = None  # when set, overrides steps
    batch_size: int = 60
    eval_every: int = 1000
    eval_batch_size: int = 10000
    log_every: int = 50
    checkpoint_every: int = 1000
    stop_on_divergence: bool = True
    threads: int = 0  # torch intra-op threads; 0 = one per free core (cores / parallel jobs)
    progress: str = "auto"  # auto | rich | plain | off
    compile: bool = False
    amp: bool = False  # CUDA autocast (bfloat16)


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    resume: str | None = None
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    norm: Any = MISSING
    activation: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    probe: Any = MISSING


NORM_SCHEMAS: dict[str, type] = {
    "none": NoNormConfig, "bn": BNConfig, "brn": BRNConfig, "ln": LNConfig,
    "whiten": WhitenConfig, "gn": GNConfig, "noisy_bn": NoisyBNConfig,
}
MODEL_SCHEMAS: dict[str, type] = {"mlp": MLPConfig, "cnn": CNNConfig, "vgg": VGGConfig}


def register_configs() -> None:
    """Store the schemas; each option file of a group extends its schema via its defaults list."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=Config)
    for name, schema in NORM_SCHEMAS.items():
        cs.store(group="schema/norm", name=name, node=schema)
    for name, schema in MODEL_SCHEMAS.items():
        cs.store(group="schema/model", name=name, node=schema)
    cs.store(group="schema", name="activation", node=ActivationConfig)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="optim", node=OptimConfig)
    cs.store(group="schema", name="probe", node=ProbeConfig)


# ---------------------------------------------------------------- range checks
CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "norm.position": ("before_act", "after_act"),
    "norm.impl": ("scratch", "torch"),
    "norm.inference": ("moving", "population"),
    "norm.method": ("zca", "pca", "iter"),
    "activation.name": ("sigmoid", "tanh", "relu", "leaky_relu", "gelu", "identity"),
    "model.pool": ("max", "avg"),
    "model.init": ("default", "glorot"),
    "optim.name": ("sgd", "adam"),
    "optim.schedule": ("constant", "cosine"),
    "train.progress": ("auto", "rich", "plain", "off"),
}

Check = tuple[str, Callable[[Any], bool], str]
RANGES: list[Check] = [
    ("train.steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.epochs", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.eval_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.eval_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.log_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.checkpoint_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.threads", lambda v: v >= 0, "0 (automatic) or an integer >= 1"),
    ("optim.lr", lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    ("optim.momentum", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("optim.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("norm.momentum", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("norm.eps", lambda v: v > 0, "a number > 0"),
    ("norm.r_max", lambda v: v >= 1, "a number >= 1"),
    ("norm.d_max", lambda v: v >= 0, "a number >= 0"),
    ("norm.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("norm.ramp_steps", lambda v: v >= 0, "an integer >= 0"),
    ("norm.d_ramp_steps", lambda v: v >= 0, "an integer >= 0"),
    ("norm.mean_range", lambda v: v >= 0, "a number >= 0"),
    ("norm.mean_jitter", lambda v: v >= 0, "a number >= 0"),
    ("norm.std_jitter", lambda v: v >= 0, "a number >= 0"),
    ("norm.std_low", lambda v: v > 0, "a number > 0"),
    ("norm.group_size", lambda v: v is None or v >= 1, "null (whole layer) or an integer >= 1"),
    ("norm.groups", lambda v: v >= 1, "an integer >= 1"),
    ("norm.iters", lambda v: v >= 1, "an integer >= 1"),
    ("model.widths", lambda v: all(w >= 1 for w in v), "a list of integers >= 1"),
    ("model.channels", lambda v: len(v) >= 1 and all(c >= 1 for c in v), "integers >= 1"),
    ("model.kernel_size", lambda v: v >= 1, "an integer >= 1"),
    ("probe.every", lambda v: v >= 1, "an integer >= 1"),
    ("probe.batch_size", lambda v: v >= 2, "an integer >= 2"),
    ("probe.unit", lambda v: v >= 0, "an integer >= 0"),
    ("probe.hist_every", lambda v: v >= 0, "0 (never) or an integer >= 1"),
    ("probe.ics_every", lambda v: v >= 0, "0 (never) or an integer >= 1"),
]


def _get(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    return True, node


def _fail(key: str, value: Any, accepted: str) -> UserError:
    return UserError(f"{key}={value!r} is not valid: expected {accepted}")


def hidden_widths(cfg: DictConfig) -> list[int]:
    """Widths (units or channels) of every probed hidden layer, in order."""
    model = cfg.model
    if model.name == "cnn":
        return list(model.channels) + list(model.widths)
    if model.name == "vgg":
        return [c for c in model.layers if c != "M"] + list(model.widths)
    return list(model.widths)


def validate(cfg: DictConfig) -> None:
    """Raise UserError naming the first key whose value is out of range."""
    for key, accepted in CHOICES.items():
        present, value = _get(cfg, key)
        if present and value not in accepted:
            raise _fail(key, value, "one of " + ", ".join(accepted))
    for key, ok, accepted in RANGES:
        present, value = _get(cfg, key)
        if present and not ok(value):
            raise _fail(key, value, accepted)
    if cfg.model.name == "cnn" and len(cfg.model.paddings) != len(cfg.model.channels):
        raise _fail("model.paddings", list(cfg.model.paddings),
                    f"one padding per conv layer ({len(cfg.model.channels)})")
    widths = hidden_widths(cfg)
    if cfg.norm.name == "noisy_bn" and cfg.norm.std_high < cfg.norm.std_low:
        raise _fail("norm.std_high", cfg.norm.std_high, f"a number >= norm.std_low ({cfg.norm.std_low})")
    if cfg.norm.name == "gn" and any(w % cfg.norm.groups for w in widths):
        raise _fail("norm.groups", cfg.norm.groups,
                    f"a divisor of every hidden width ({', '.join(map(str, widths))})")
    if widths and cfg.probe.unit >= min(widths):
        raise _fail("probe.unit", cfg.probe.unit,
                    f"an integer below the narrowest hidden width ({min(widths)})")


def compose(*overrides: str) -> DictConfig:
    """The config `bnlab train <overrides>` would run, without running it (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))

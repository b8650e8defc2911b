"""Config schemas (registered in Hydra's ConfigStore) and range checks.

Types are checked by OmegaConf when Hydra composes the config (``optim.lr=abc`` fails there,
naming the key). Ranges are checked by :func:`validate` before any data is loaded, so a bad
value costs nothing and leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from bnlab.config.bounds import (
    at_least,
    bounded,
    check_fields,
    choice,
    every_or_never,
    non_negative,
    optional_at_least,
    positive,
    unit_interval,
)
from bnlab.config.bounds import invalid as _fail
from bnlab.config.norm_options import NORM_SCHEMAS
from bnlab.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # bnlab/


def config_dir() -> Path:
    """The Hydra config tree: ``bnlab/conf`` in a wheel, the top-level ``configs/`` in a checkout."""
    shipped = PACKAGE_DIR / "conf"
    return shipped if shipped.is_dir() else PACKAGE_DIR.parent / "configs"


# ---------------------------------------------------------------- groups
# The norms' options are in bnlab.config.norm_options, one dataclass per norm.
@dataclass
class ActivationConfig:
    name: str = "sigmoid"  # one of bnlab.models.ACTIVATIONS (checked by bnlab.run.preflight)


INITS = ("default", "glorot")  # torch's layer init | Xavier uniform, zero biases


@dataclass
class MLPConfig:
    name: str = "mlp"
    widths: list[int] = bounded(lambda: [100, 100, 100], lambda v: all(w >= 1 for w in v),
                                "a list of integers >= 1", factory=True)
    init: str = choice("default", *INITS)


@dataclass
class CNNConfig:
    name: str = "cnn"
    channels: list[int] = bounded(lambda: [6, 16], lambda v: len(v) >= 1 and all(c >= 1 for c in v),
                                  "integers >= 1", factory=True)
    kernel_size: int = at_least(5, 1)
    paddings: list[int] = field(default_factory=lambda: [2, 2])
    pool: str = choice("max", "max", "avg")
    widths: list[int] = bounded(lambda: [120, 84], lambda v: all(w >= 1 for w in v),
                                "a list of integers >= 1", factory=True)
    init: str = choice("default", *INITS)


@dataclass
class VGGConfig:
    name: str = "vgg"
    # channels per conv layer, "M" for a 2x2 max-pool (VGG-11 by default)
    layers: list[Any] = bounded(
        lambda: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
        lambda v: all(c == "M" or (isinstance(c, int) and c >= 1) for c in v),
        'integers >= 1 (channels) and "M" (a 2x2 max-pool)', factory=True)
    widths: list[int] = bounded(list, lambda v: all(w >= 1 for w in v), "a list of integers >= 1",
                                factory=True)
    init: str = choice("default", *INITS)


@dataclass
class DataConfig:
    name: str = MISSING
    # $BNLAB_DATA, else the per-user cache of the XDG spec (the kernel cache's base too); `~` is
    # expanded when the data set is loaded
    root: str = "${oc.env:BNLAB_DATA,${oc.env:XDG_CACHE_HOME,'~/.cache'}/bnlab/data}"
    normalize: bool = True
    download: bool = True
    augment: bool = False  # random crop + flip on the batch (CIFAR-10)
    binarize: bool = False  # pixels > half of the maximum become 1, the rest 0 (before normalize)
    sampler: str = choice("iid", "iid", "grouped")  # grouped: Ioffe 2017, Sec. 4.3 (non-i.i.d.)
    labels_per_batch: int | None = optional_at_least(None, 1, "sampler=iid")


@dataclass
class OptimConfig:
    name: str = choice(MISSING, "sgd", "adam")
    lr: float = positive(0.1)
    momentum: float = unit_interval(0.0)
    weight_decay: float = non_negative(0.0)
    nesterov: bool = False
    betas: list[float] = bounded(lambda: [0.9, 0.999], lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                                 "two numbers in [0, 1)", factory=True)
    schedule: str = choice("constant", "constant", "cosine")


@dataclass
class ProbeConfig:
    name: str = "default"
    enabled: bool = True
    every: int = at_least(200, 1)
    batch_size: int = at_least(1000, 2)
    unit: int = at_least(0, 0)  # and below the narrowest hidden width (checked in validate)
    hist_every: int = every_or_never(0)
    ics_every: int = every_or_never(0)
    mode: str = choice("train", "train", "eval", "both")  # which network the probes measure
    landscape_every: int = every_or_never(0)  # Santurkar et al. 2018, Sec. 3 (loss landscape)
    # The Hessian's top eigenvalue (Lanczos) and g'Hg/g'g on the probe batch (bnlab.probes.curvature)
    curvature_every: int = every_or_never(0)
    curvature_iters: int = at_least(20, 1)  # Lanczos steps (Hessian-vector products) per measurement
    # Stochastic normalization disturbance (Huang et al. 2019, IterNorm; bnlab.probes.snd)
    snd_every: int = every_or_never(0)
    snd_samples: int = at_least(4, 1)  # samples x whose disturbance is averaged
    snd_draws: int = at_least(8, 2)  # batches drawn around each sample


EVAL_AUTO = "auto"


@dataclass
class TrainLoopConfig:
    steps: int = at_least(8000, 1)
    epochs: int | None = optional_at_least(None, 1, "use train.steps")  # when set, replaces steps
    batch_size: int = at_least(60, 1)
    # An integer, or "auto": a fixed number of evaluations per run (bnlab.run.evaluation.eval_interval).
    eval_every: Any = bounded(EVAL_AUTO, lambda v: v == EVAL_AUTO or (isinstance(v, int) and v >= 1),
                              f"an integer >= 1 or {EVAL_AUTO}")
    # Rows per eval-mode pass: on 2 CPU cores the CNN evaluated 10,000 test images in 0.60 s in
    # passes of 1,000 and 1.05 s in one pass (caches); the MLP took the same either way.
    eval_batch_size: int = at_least(1000, 1)
    log_every: int = at_least(50, 1)
    checkpoint_every: int = at_least(1000, 1)
    stop_on_divergence: bool = True
    threads: int = bounded(0, lambda v: v >= 0, "0 (automatic) or an integer >= 1")
    progress: str = choice("auto", "auto", "rich", "plain", "off")
    compile: bool = False
    amp: bool = False  # CUDA autocast (bfloat16)
    # Capturing the step as a CUDA graph is declared but not built: it needs a GPU to build and
    # test, and none has been available. Refused rather than silently ignored.
    cuda_graph: bool = bounded(False, lambda v: v is False,
                               "false: CUDA-graph capture of the training step is not built yet")


@dataclass
class Config:
    seed: int = 0
    device: str = choice("auto", "auto", "cpu", "cuda")
    resume: str | None = None
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    norm: Any = MISSING
    activation: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    probe: Any = MISSING
    # A preset's claims about its paper (docs/report.md): read by `bnlab report`, not by training.
    claims: list[Any] = field(default_factory=list)


MODEL_SCHEMAS: dict[str, type] = {"mlp": MLPConfig, "cnn": CNNConfig, "vgg": VGGConfig}
GROUP_SCHEMAS: dict[str, type] = {"activation": ActivationConfig, "data": DataConfig,
                                  "optim": OptimConfig, "probe": ProbeConfig}


def register_configs() -> None:
    """Store the schemas; each option file of a group extends its schema via its defaults list."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=Config)
    for name, schema in NORM_SCHEMAS.items():
        cs.store(group="schema/norm", name=name, node=schema)
    for name, schema in MODEL_SCHEMAS.items():
        cs.store(group="schema/model", name=name, node=schema)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group="schema", name=group, node=schema)


# ---------------------------------------------------------------- validation
def schemas_of(cfg: DictConfig) -> list[tuple[str, type]]:
    """(key prefix, schema) of every node of ``cfg``: the top level, the loop, each group's option."""
    found: list[tuple[str, type]] = [("", Config), ("train.", TrainLoopConfig)]
    norm = NORM_SCHEMAS.get(str(cfg.norm.name)) if "norm" in cfg else None
    model = MODEL_SCHEMAS.get(str(cfg.model.name)) if "model" in cfg else None
    for prefix, schema in (("norm.", norm), ("model.", model)):
        if schema is not None:
            found.append((prefix, schema))
    found += [(f"{group}.", schema) for group, schema in GROUP_SCHEMAS.items() if group in cfg]
    return found


def _node(cfg: DictConfig, prefix: str) -> DictConfig:
    return cfg if not prefix else cfg[prefix[:-1]]


def hidden_widths(cfg: DictConfig) -> list[int]:
    """Widths (units or channels) of every probed hidden layer, in order."""
    model = cfg.model
    if model.name == "cnn":
        return list(model.channels) + list(model.widths)
    if model.name == "vgg":
        return [c for c in model.layers if c != "M"] + list(model.widths)
    return list(model.widths)


def typed(cfg: Any) -> Config:
    """The composed config as the schema's dataclasses (``Config``, each group its option's
    class), once, at the boundary: inside, values are plain attributes (an OmegaConf read costs
    ~30 us, a tenth of a small CPU step) and every key exists. A dataclass passes through."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_object(cfg)
    return cfg


def as_dict(node: Any) -> dict[str, Any]:
    """A config node (a dataclass of :func:`typed`, or a DictConfig) as a plain dict."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dataclasses.asdict(node)


def world_size() -> int:
    """Processes of this run: torchrun's WORLD_SIZE, else 1 (readable before any process group)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(cfg: DictConfig) -> None:
    """Raise UserError naming the first key whose value is out of range.

    Bounds declared on the schema fields come first; then the checks that relate two keys.
    Checks that need the data set's shape are in :mod:`bnlab.run.preflight`.
    """
    for prefix, schema in schemas_of(cfg):
        check_fields(_node(cfg, prefix), schema, prefix)
    if cfg.model.name == "cnn" and len(cfg.model.paddings) != len(cfg.model.channels):
        raise _fail("model.paddings", list(cfg.model.paddings),
                    f"one padding per conv layer ({len(cfg.model.channels)})")
    widths = hidden_widths(cfg)
    options = NORM_SCHEMAS[cfg.norm.name]
    # relations between its own keys, and to the widths and the batch one process normalizes
    options.check(cfg.norm, widths, cfg.train.batch_size // world_size())
    if cfg.norm.get("sync", False) and "sync" not in {f.name for f in fields(options)}:
        raise UserError(f"norm.sync=true is not valid with norm={cfg.norm.name}: it has no "
                        "cross-replica statistics")
    if widths and cfg.probe.unit >= min(widths):
        raise _fail("probe.unit", cfg.probe.unit,
                    f"an integer below the narrowest hidden width ({min(widths)})")
    replicas = world_size()
    probe = cfg.probe
    if probe.enabled and probe.get("snd_every", 0):  # its batches come from the probe batch
        if probe.snd_samples > probe.batch_size:
            raise _fail("probe.snd_samples", probe.snd_samples,
                        f"at most probe.batch_size ({probe.batch_size}) with probe.snd_every > 0")
        share = cfg.train.batch_size // (1 if cfg.norm.get("sync", False) else replicas)
        if share > probe.batch_size:
            raise _fail("probe.snd_every", probe.snd_every,
                        f"0 when one layer's training batch ({share}) exceeds probe.batch_size "
                        f"({probe.batch_size}): the disturbance's batches are drawn from the probe batch")
    if cfg.train.batch_size % replicas:
        raise _fail("train.batch_size", cfg.train.batch_size,
                    f"a multiple of {replicas} with {replicas} processes "
                    "(each process takes an equal share of the global batch)")
    # The grouped sampler's labels are checked with the data set's classes (bnlab.run.preflight):
    # more labels than classes is the first thing to say, before "a divisor of the batch".


def compose(*overrides: str) -> DictConfig:
    """The config `bnlab train <overrides>` would run, without running it (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))

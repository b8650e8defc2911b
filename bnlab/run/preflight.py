"""Checks that make `bnlab train` fail with one line before it works in vain.

- :func:`check_output_dir`, on the command line before Hydra creates anything: the run (or
  sweep) directory can be created, and no live process writes it.
- :func:`check_against_data`, once the data set is loaded and before the model exists: the
  config can train on this data set's shape (image size through the conv plan, batch
  statistics with one value per feature, batch sizes, the grouped sampler's labels).

Only the standard library is imported at module level: ``bnlab train --help`` stays fast.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bnlab.errors import UserError


def check_output_dir(argv: list[str]) -> None:
    """Fail with one line when the run (or sweep) directory could not be created, or when a
    live process writes it (a second writer would mix its files into the run's).

    Hydra would otherwise die with a traceback from ``mkdir``, or overwrite a live run's
    ``.hydra/``. A throw-away temporary folder in the nearest existing ancestor is the only
    writability test that also holds for root and odd filesystems.
    """
    from bnlab.rundir.lock import RunLocked, holder, refusal

    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith(key + "=")]
    target = Path(given[-1]).expanduser() if given and "${" not in given[-1] else Path("outputs")
    ancestor = target.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{key}={target}: {ancestor} is not a directory")
    try:
        with tempfile.TemporaryDirectory(dir=ancestor, prefix=".bnlab-write-test-"):
            pass
    except OSError as err:
        raise UserError(f"{key}={target}: cannot write under {ancestor} ({err.strerror})") from err
    if not given or not target.is_dir():
        return
    runs = [p for p in target.iterdir() if p.is_dir()] if multirun else [target]
    for run in runs:
        pid = holder(run)
        if pid is not None:
            raise RunLocked(refusal(run, pid))


# ---------------------------------------------------------------- the config on its own
def check_config(cfg) -> None:
    """Raise UserError for the first bad value of ``cfg``, before any data is loaded: the schema's
    bounds and relations (:func:`bnlab.config.schema.validate`), then the names that only the
    model side knows (the activation)."""
    from bnlab.config.schema import _fail, validate
    from bnlab.models import ACTIVATIONS

    validate(cfg)
    if cfg.activation.name not in ACTIVATIONS:
        raise _fail("activation.name", cfg.activation.name, "one of " + ", ".join(ACTIVATIONS))


# ---------------------------------------------------------------- the config against the data set
def check_against_data(cfg, shape: tuple[int, int, int], train_size: int, num_classes: int,
                       world_size: int = 1) -> None:
    """Raise UserError when ``cfg`` cannot train on images of ``shape`` (C, H, W).

    ``train_size`` is the number of training examples, ``num_classes`` 0 for a regression.
    """
    data = cfg.data.name
    for key, value, used in (("train.batch_size", cfg.train.batch_size, True),
                             ("probe.batch_size", cfg.probe.batch_size, cfg.probe.enabled)):
        if used and value > train_size:
            raise UserError(f"{key}={value} is not valid: the {data} training split has only "
                            f"{train_size} examples")
    sizes = feature_map_sizes(cfg.model, shape, data)
    _check_batch_statistics(cfg, sizes, world_size)
    if cfg.data.sampler == "grouped":
        if num_classes == 0:
            raise UserError(f"data.sampler=grouped is not valid with data={data}: a regression "
                            "has no labels")
        if cfg.data.labels_per_batch > num_classes:
            raise UserError(f"data.labels_per_batch={cfg.data.labels_per_batch} is not valid: "
                            f"data={data} has {num_classes} classes")


def feature_map_sizes(model, shape: tuple[int, int, int], data: str) -> list[tuple[int, int]]:
    """(H, W) of each conv block's output for ``shape`` inputs, through the model's conv plan
    (stride-1 convs: H + 2 padding - kernel + 1; 2x2 pools: H // 2). Raises UserError when a
    layer would get an empty or too small input, naming the smallest image that fits."""
    from bnlab.models import conv_plan

    plan = conv_plan(model)
    _, h, w = shape
    sizes = _walk(plan, h, w)
    if isinstance(sizes, str):
        smallest = next((s for s in range(1, 4097) if not isinstance(_walk(plan, s, s), str)), None)
        fits = f"it needs images of at least {smallest}x{smallest}" if smallest else "no image size fits"
        layers = "model.layers" if model.name == "vgg" else "model.channels"
        raise UserError(f"model={model.name} does not fit data={data}'s {h}x{w} images: {sizes}; "
                        f"{fits} (or fewer layers in {layers})")
    return sizes


def _walk(plan: list, h: int, w: int) -> list[tuple[int, int]] | str:
    """The conv blocks' output sizes, or what goes wrong first."""
    sizes: list[tuple[int, int]] = []
    pools = convs = 0
    for item in plan:
        if item == "M":
            pools += 1
            if h < 2 or w < 2:
                return f"pool {pools} gets a {h}x{w} input"
            h, w = h // 2, w // 2
        else:
            convs += 1
            _, kernel, padding = item
            if h + 2 * padding < kernel or w + 2 * padding < kernel:
                return f"conv {convs} ({kernel}x{kernel}, padding {padding}) gets a {h}x{w} input"
            h, w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
            sizes.append((h, w))
    return sizes


def uses_batch_statistics(cfg_norm) -> bool:
    """Whether the configured norm's layer class normalizes a training batch by its own
    statistics (asked before any layer exists)."""
    from bnlab.norms import norm_class

    return norm_class(str(cfg_norm.name)).uses_batch_statistics


def _check_batch_statistics(cfg, conv_sizes: list[tuple[int, int]], world_size: int) -> None:
    """Batch statistics need two values per feature: a batch of one example into a fully
    connected layer (or a 1x1 feature map) has variance 0 and nothing to normalize."""
    if not uses_batch_statistics(cfg.norm):
        return
    per_replica = cfg.train.batch_size // world_size
    where = [f"conv {i}'s 1x1 output" for i, (h, w) in enumerate(conv_sizes, 1) if per_replica * h * w == 1]
    if cfg.model.widths and per_replica == 1:
        where.append("each fully connected layer")
    if not where:
        return
    share = f" ({world_size} processes: 1 example each)" if world_size > 1 else ""
    raise UserError(f"train.batch_size={cfg.train.batch_size}{share} is not valid with "
                    f"norm={cfg.norm.name}: it gives {where[0]} one value per feature, whose batch "
                    "variance is 0; use train.batch_size >= 2, or a per-example norm (norm=ln, norm=gn)")

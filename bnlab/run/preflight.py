"""Checks that make `bnlab train` fail with one line before it works in vain.

- :func:`check_output_dir`, on the command line before Hydra creates anything: the run (or
  sweep) directory can be created and written, no live process writes it, and a single run
  does not go into a directory that holds a run already.
- :func:`check_override_keys`, on the command line: every key the overrides name is one the
  schema knows (``train.stpes=10`` is refused with a "did you mean", ``+`` or not).
- :func:`check_config`, once the config is composed: its values (the schema's bounds) and its
  keys (a key set by a file or a ``+`` override that the schema does not know).
- :func:`check_against_data`, once the data set is loaded and before the model exists: the
  config can train on this data set's shape (image size through the conv plan, batch
  statistics with one value per feature, batch sizes, the grouped sampler's labels).

Only the standard library is imported at module level: ``bnlab train --help`` stays fast.
"""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path

from bnlab.errors import UserError


def check_output_dir(argv: list[str], resuming: bool = False) -> Path:
    """Fail with one line when the run (or sweep) directory could not be created or written,
    when a live process writes it (a second writer would mix its files into the run's), or,
    for one run, when it holds a run already (only ``resume=`` writes into a run). Returns the
    nearest directory that exists already: what the run creates lies below it.

    Hydra would otherwise die with a traceback from ``mkdir`` or from writing ``.hydra/`` on a
    full disk, or overwrite a run's ``.hydra/``. A throw-away temporary folder holding a small
    file, in the nearest existing ancestor, is the only test that also holds for root, odd
    file systems and a full disk (where folders can still be made).
    """
    from bnlab.rundir.lock import RunLocked, holder, refusal
    from bnlab.rundir.names import holds_run
    from bnlab.rundir.outcome import read_summary, shown_path

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
        with tempfile.TemporaryDirectory(dir=ancestor, prefix=".bnlab-write-test-") as scratch:
            (Path(scratch) / "test").write_bytes(bytes(4096))
    except OSError as err:
        hint = "; choose another directory with hydra.run.dir=<dir>" if not multirun else \
            "; choose another directory with hydra.sweep.dir=<dir>"
        raise UserError(f"{key}={target}: cannot write under {ancestor} ({err.strerror}){hint}") from err
    if not given or not target.is_dir():
        return ancestor
    runs = [p for p in target.iterdir() if p.is_dir()] if multirun else [target]
    for run in runs:
        pid = holder(run)
        if pid is not None:
            raise RunLocked(refusal(run, pid))
    if not multirun and not resuming and holds_run(target):
        status = (read_summary(target) or {}).get("status")
        what = f"a {status} run" if status else "a run's files"
        raise UserError(f"{key}={given[-1]}: {shown_path(target)} holds {what}; a run directory is "
                        f"written only by its own resume (bnlab train resume={shown_path(target)}): "
                        "choose another directory")
    return ancestor


# ---------------------------------------------------------------- keys the schema does not know
def _unknown(key: str, where: str, candidates: list[str]) -> UserError:
    """One line for an unknown key, with the closest known key under the same node (a close
    name under another group, optim.momentum for norm.momentm, would mislead)."""
    node, _, leaf = key.rpartition(".")
    leaves = [c.rpartition(".")[2] for c in candidates if c.rpartition(".")[0] == node]
    close = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
    hint = f"; did you mean {node + '.' if node else ''}{close[0]}?" if close else \
        " (bnlab train --cfg job shows every key)"
    return UserError(f"unknown key {key}{where}{hint}")


def _group_fields(group: str, options: list[str] | None) -> set[str] | None:
    """Keys under ``group`` for the given options (None: any option), or None when the group
    has no schema of its own (``experiment``)."""
    from dataclasses import fields

    from bnlab.config.norm_options import NORM_SCHEMAS
    from bnlab.config.schema import GROUP_SCHEMAS, MODEL_SCHEMAS

    if group in GROUP_SCHEMAS:
        return {f.name for f in fields(GROUP_SCHEMAS[group])}
    by_option = {"norm": NORM_SCHEMAS, "model": MODEL_SCHEMAS}.get(group)
    if by_option is None:
        return None
    chosen = [by_option[o] for o in options or [] if o in by_option]
    schemas = chosen if chosen and len(chosen) == len(options) else list(by_option.values())
    return {f.name for schema in schemas for f in fields(schema)}


def check_override_keys(argv: list[str]) -> None:
    """Refuse an override of a key the schema does not know, ``+`` or not, with one line and
    the closest known key. Keys under a group take the options the command line picks
    (``norm=gn norm.groups=4``), any of its options when it picks none (a preset may); the
    composed config is checked again exactly (:func:`check_known_keys`). Hydra's own keys and
    what Hydra cannot parse are left to Hydra."""
    from dataclasses import fields

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from bnlab.config.schema import Config, TrainLoopConfig, config_dir

    parser = OverridesParser.create()
    overrides = []
    for text in (a for a in argv if "=" in a and not a.startswith("-")):
        try:
            overrides.append(parser.parse_override(text))
        except HydraException:
            return  # Hydra says what is wrong with it
    groups = {p.name for p in config_dir().iterdir() if p.is_dir()} - {"hydra"}
    own_groups = any(o.key_or_group == "hydra.searchpath" for o in overrides)
    options: dict[str, list[str]] = {}
    for o in overrides:
        if o.key_or_group in groups and not o.is_delete():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [str(o.value())]
            options.setdefault(o.key_or_group, []).extend(values)
    top = {f.name for f in fields(Config)}
    loop = {f.name for f in fields(TrainLoopConfig)}
    known = {*top, *groups, *(f"train.{k}" for k in loop)}
    for group in top:
        known.update(f"{group}.{k}" for k in _group_fields(group, options.get(group)) or ())
    for o in overrides:
        key = o.key_or_group
        if o.is_hydra_override() or o.package is not None:
            continue
        parts = key.split(".")
        if key in known or parts[0] == "claims" or ".".join(parts[:2]) in known:
            continue  # (below a known key: a list's item, model.widths.1)
        if "." not in key and own_groups:
            continue  # a config group of the user's own (hydra.searchpath)
        raise _unknown(key, f" (in {o.input_line})", sorted(known))


def check_known_keys(cfg) -> None:
    """Raise UserError for a key of the composed ``cfg`` that its schema does not declare: one
    added by a ``+`` override or by a config file of the user's own."""
    from dataclasses import fields

    from bnlab.config.schema import schemas_of

    for prefix, schema in schemas_of(cfg):
        node = cfg if not prefix else cfg[prefix[:-1]]
        names = {f.name for f in fields(schema)}
        for key in node:
            if key not in names:
                where = f" (norm={cfg.norm.name} has no such option)" if prefix == "norm." else \
                    f" (model={cfg.model.name} has no such key)" if prefix == "model." else ""
                raise _unknown(prefix + str(key), where, sorted(prefix + n for n in names))


# ---------------------------------------------------------------- the config on its own
def check_config(cfg) -> None:
    """Raise UserError for the first bad value of ``cfg``, before any data is loaded: the schema's
    bounds and relations (:func:`bnlab.config.schema.validate`), then the names that only the
    model side knows (the activation)."""
    from bnlab.config.schema import _fail, validate
    from bnlab.models import ACTIVATIONS

    validate(cfg)
    check_known_keys(cfg)
    if cfg.activation.name not in ACTIVATIONS:
        raise _fail("activation.name", cfg.activation.name, "one of " + ", ".join(ACTIVATIONS))
    data = cfg.data
    if data.get("labels_per_batch") is not None and data.sampler != "grouped" and not _sweep_job():
        raise UserError(f"data.labels_per_batch={data.labels_per_batch} is not valid without "
                        "data.sampler=grouped (the iid sampler draws any labels): drop it, or "
                        "add data.sampler=grouped")


def _sweep_job() -> bool:
    """Whether this is a job of a sweep, whose jobs were checked together (a sweep over
    data.sampler=iid,grouped gives labels_per_batch to its iid jobs too)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra context: a run started in Python
        return False


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
        k, batch = cfg.data.labels_per_batch, cfg.train.batch_size
        if k is not None and k > num_classes:
            raise UserError(f"data.labels_per_batch={k} is not valid: data={data} has {num_classes} "
                            f"classes, so a grouped batch holds at most {num_classes} labels")
        if k is None or batch % k:
            raise UserError(f"data.labels_per_batch={k} is not valid: expected a divisor of "
                            f"train.batch_size ({batch}) with data.sampler=grouped (each label "
                            "gets train.batch_size / data.labels_per_batch examples)")


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

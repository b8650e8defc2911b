"""`resume=<run dir>`: continue a run from what it saved, in its own directory.

The run's ``.hydra/config.yaml`` is its truth: resuming composes nothing from today's config
tree (a default changed since, or a config group of the user's own that is gone, changes
nothing). The saved config is checked before it is used (YAML, the schema's keys and types);
the overrides given with ``resume=`` are checked against it:

- ``device``, ``train.threads``, ``train.progress`` and ``data.root`` say how and where the run
  goes on, and may differ;
- ``train.steps`` (or ``train.epochs``) above the run's length extends it: the saved config
  (and overrides.yaml) then say the new length; a value below the current step is refused;
- any other override must agree with the saved config (``norm=bn`` with a ``bn`` run, a value
  equal to the saved one); one that disagrees is refused with one line.

Only the standard library, omegaconf and Hydra's override parser are imported: the checks run
before torch is loaded.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab.errors import UserError
from bnlab.rundir.names import CHECKPOINT, CONFIG, OVERRIDES

# Keys a resumed run may change: where and how it runs, where its data lives, how far it goes.
RESUMABLE_KEYS = ("device", "train.progress", "train.threads", "data.root", "train.steps", "train.epochs")
LENGTH_KEYS = ("train.steps", "train.epochs")
# The groups every saved config holds (a config without one of them is not whole).
GROUPS = ("norm", "activation", "model", "data", "optim", "probe")


@dataclass(frozen=True)
class Resumption:
    """A run to continue: its directory and the config it continues with."""

    run: Path
    config: Any  # DictConfig: the saved config with the allowed overrides and ``resume`` set
    flags: tuple[str, ...]  # what else the command line held (--cfg job)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _shown(path: Path) -> str:
    from bnlab.rundir.outcome import shown_path

    return shown_path(path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def requested(argv: list[str]) -> str | None:
    """The run directory named by the last ``resume=`` of ``argv``, or None."""
    values = [a.split("=", 1)[1] for a in argv if "=" in a and _key(a) == "resume"]
    if not values or values[-1] in ("", "null"):
        return None
    return values[-1].strip("'\"")


def resume_from(argv: list[str]) -> Resumption | None:
    """The run that ``argv`` resumes with its checked config, or None without ``resume=``.

    Raises :class:`UserError` (one line) for a directory that is not a whole run, a damaged
    saved config, a run that has nothing to continue, or an override that disagrees.
    """
    given = requested(argv)
    if given is None:
        return None
    run = Path(given).expanduser().resolve()
    if any(a in ("-m", "--multirun") for a in argv):
        raise UserError("resume= continues one run; it cannot be combined with -m")
    if not run.is_dir():
        raise UserError(f"resume={given}: no such directory")
    if not (run / CONFIG).is_file():
        raise UserError(f"resume={given}: not a bnlab run directory (no {CONFIG})")
    if not (run / OVERRIDES).is_file():
        raise UserError(f"resume={given}: {_shown(run / OVERRIDES)} is missing: the run directory "
                        "is not whole (Hydra writes it with config.yaml)")
    if not (run / CHECKPOINT).is_file():
        raise UserError(f"resume={given}: the run has no checkpoint yet ({CHECKPOINT}); "
                        "start it again instead")
    raw = saved_config(run, given)
    overrides, flags = _split(argv)
    changes = _check_overrides(run, given, raw, overrides)
    _check_not_finished(run, given, raw, changes)
    return Resumption(run, _config_with(run, given, raw, changes), tuple(flags))


# ---------------------------------------------------------------- the saved config
def saved_config(run: Path, given: str):
    """``<run>/.hydra/config.yaml`` as saved (interpolations kept), checked against the schema;
    a file that cannot be the config of a run is refused with one line naming it."""
    from omegaconf import DictConfig, OmegaConf

    path = run / CONFIG
    try:
        raw = OmegaConf.load(path)
        if not isinstance(raw, DictConfig):
            raise ValueError("not a mapping of keys")
        missing = [g for g in GROUPS if not isinstance(raw.get(g), DictConfig) or "name" not in raw[g]]
        if missing:
            raise ValueError(f"no {missing[0]} group")
        _typed(raw)
    except Exception as err:  # yaml's, omegaconf's and our own: the file is not a run's config
        raise UserError(f"resume={given}: {_shown(path)} is damaged ({_first_line(err)}); "
                        "the run cannot be resumed") from err
    return raw


def _typed(raw):
    """``raw`` merged into the schemas: keys checked, types enforced, keys added to the schema
    since the run was saved filled with their defaults."""
    from omegaconf import OmegaConf, open_dict

    from bnlab.config.schema import Config, schemas_of

    cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    with open_dict(cfg):
        for prefix, schema in schemas_of(cfg):
            if prefix and prefix != "train.":
                group = prefix[:-1]
                cfg[group] = OmegaConf.merge(OmegaConf.structured(schema), raw[group])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    return cfg


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, everything else) of ``argv``, ``resume=`` left out."""
    overrides, flags = [], []
    for a in argv:
        if "=" in a and not a.startswith("-"):
            if _key(a) != "resume":
                overrides.append(a)
        else:
            flags.append(a)
    return overrides, flags


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=False)
    return value


def _check_overrides(run: Path, given: str, raw, overrides: list[str]) -> dict[str, Any]:
    """The resumable ``{key: value}`` of ``overrides``; raise UserError for one that would change
    the experiment, or a key the run's config does not have."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf

    parser = OverridesParser.create()
    saved_overrides = {str(o) for o in OmegaConf.load(run / OVERRIDES) or []}
    changes: dict[str, Any] = {}
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as err:
            raise UserError(f"resume={given}: {text}: {_first_line(err)}") from err
        key = override.key_or_group
        if key.startswith("hydra.") or key == "hydra":
            raise UserError(f"resume={given}: {text}: a resumed run keeps its own directory and "
                            "Hydra's settings")
        if override.is_sweep_override():
            raise UserError(f"resume={given}: {text}: a resumed run takes one value per key")
        value = _plain(override.value())
        if key in RESUMABLE_KEYS and not override.is_delete():
            changes[key] = value
            continue
        if text in saved_overrides:  # the run was started with this very override
            continue
        node = OmegaConf.select(raw, key, default=None, throw_on_missing=False)
        if isinstance(node, DictConfig) and "name" in node and "." not in key:
            saved = node.name  # a group: the option the run used
        elif key in _config_groups():  # a group merged into the whole config (experiment=)
            raise UserError(f"resume={given}: {text} would change the run's experiment (its "
                            f"{OVERRIDES} has no {text})")
        elif node is None and key not in _keys(raw):
            close = difflib.get_close_matches(key, [*RESUMABLE_KEYS, *_keys(raw)], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"resume={given}: unknown key {key} (in {text}){hint}")
        else:
            saved = _plain(node)
        if override.is_delete() or saved != value:
            raise UserError(f"resume={given}: {text} would change the run's experiment (its "
                            f"{CONFIG} says {key}={_yaml_value(saved)}); only "
                            f"{', '.join(RESUMABLE_KEYS)} may be given")
    return changes


def _keys(raw) -> list[str]:
    """Every dotted key of ``raw``, nodes and leaves (``train``, ``train.steps``, ...)."""
    from omegaconf import OmegaConf

    def walk(tree: Any, prefix: str) -> list[str]:
        if not isinstance(tree, dict):
            return []
        return [k for key, value in tree.items()
                for k in (prefix + str(key), *walk(value, f"{prefix}{key}."))]

    return walk(OmegaConf.to_container(raw, resolve=False), "")


def _config_groups() -> set[str]:
    from bnlab.config.schema import config_dir

    return {p.name for p in config_dir().iterdir() if p.is_dir()}


def _yaml_value(value: Any) -> str:
    import json

    if value is None:
        return "null"
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------- how far the run goes
def _check_not_finished(run: Path, given: str, raw, changes: dict[str, Any]) -> None:
    """A run that completed or diverged has nothing to continue, unless a longer length is given."""
    from bnlab.rundir.outcome import read_summary

    summary = read_summary(run) or {}
    status, steps = summary.get("status"), summary.get("steps")
    if status == "diverged":
        raise UserError(f"resume={given}: the run diverged at step {summary.get('diverged_step', steps)}; "
                        "there is nothing to continue (start a new run)")
    if status != "completed" or "train.epochs" in changes:
        return
    if "train.steps" not in changes or changes["train.steps"] == steps:
        raise UserError(f"resume={given}: the run has completed its {steps} steps; give train.steps "
                        f"above {steps} to train it further")
    if isinstance(steps, int) and changes["train.steps"] < steps:
        raise _shorter("train.steps", changes["train.steps"], steps)


def _shorter(key: str, value: Any, step: int) -> UserError:
    return UserError(f"{key}={value} is below the run's current step ({step}); a run cannot be "
                     "shortened: give a length above it, or start a new run")


def check_length(step: int, total_steps: int, cfg) -> None:
    """Refuse to resume at ``step`` a run now ``total_steps`` long: a run is never shortened."""
    if step <= total_steps:
        return
    if cfg.train.epochs:
        raise _shorter("train.epochs", cfg.train.epochs, step)
    raise _shorter("train.steps", cfg.train.steps, step)


def record_length(run: Path, cfg) -> bool:
    """Write a resumed run's length (``train.steps``, ``train.epochs``) into its saved config and
    overrides.yaml when it differs from theirs; True if it did. Both files are replaced atomically."""
    from omegaconf import OmegaConf

    from bnlab.rundir.writer import atomic_write

    if not (run / CONFIG).is_file() or not (run / OVERRIDES).is_file():
        return False  # a run trained from Python, without Hydra's files
    raw = OmegaConf.load(run / CONFIG)
    changed = [k for k in LENGTH_KEYS if OmegaConf.select(raw, k) != OmegaConf.select(cfg, k)]
    if not changed:
        return False
    for key in changed:
        OmegaConf.update(raw, key, OmegaConf.select(cfg, key), merge=False)
    overrides = [str(o) for o in OmegaConf.load(run / OVERRIDES) or [] if _key(str(o)) not in changed]
    overrides += [f"{k}={_yaml_value(OmegaConf.select(cfg, k))}" for k in changed]
    atomic_write(run / CONFIG, OmegaConf.to_yaml(raw))
    atomic_write(run / OVERRIDES, OmegaConf.to_yaml(OmegaConf.create(overrides)))
    return True


# ---------------------------------------------------------------- the config it continues with
def _config_with(run: Path, given: str, raw, changes: dict[str, Any]):
    """The saved config, typed by the schema, with ``changes`` and ``resume=<run>`` set."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = _typed(raw)
    for key, value in changes.items():
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise UserError(f"{key}={_yaml_value(value)} is not valid: {_first_line(err)}") from err
    cfg.resume = str(run)
    return cfg

"""`bnlab <command>`: thin dispatch. Heavy imports (torch, hydra) happen only inside a command."""

from __future__ import annotations

import os
import secrets
import sys

USAGE = """usage: bnlab <command> [args]

commands:
  train    train one model, or a sweep with -m (Hydra overrides: bnlab train norm=bn seed=1)
  report   compare runs: tables, report.md and PNG figures (bnlab report outputs/multirun/...)
  bench    measure bnlab's speed against baselines (writes bench.json)

Run `bnlab <command> --help` for a command's options.
"""


def _train(argv: list[str]) -> int:
    # One tag per invocation, inherited by parallel workers, keeps run and sweep directories unique.
    os.environ.setdefault("BNLAB_RUN_ID", secrets.token_hex(3))
    from bnlab.errors import UserError
    from bnlab.run.preflight import check_output_dir
    from bnlab.run.resume import resume_argv

    try:
        argv = resume_argv(argv)
        shows = [a for a in argv if a in ("--cfg", "-c", "--info", "-i")]
        if shows and any(a in ("-m", "--multirun") for a in argv):
            raise UserError(f"{shows[0]} shows the config of one run and cannot be combined with -m; "
                            "drop -m and give one value per key (a sweep's first job)")
        if not any(a in ("--help", "-h", "--cfg", "-c", "--info", "-i", "--hydra-help") for a in argv):
            check_output_dir(argv)
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return 2

    import hydra

    from bnlab.config.schema import config_dir, register_configs

    if any(a in ("-m", "--multirun") for a in argv):
        argv = _name_runs_by_swept_keys(argv, config_dir() / "train.yaml")
    if "LOCAL_RANK" in os.environ:  # started by torchrun: all ranks must share one run directory
        from bnlab.run.distributed import agree_on_run_dir, launched_by_torchrun

        try:
            if launched_by_torchrun():
                pattern = _configured(config_dir() / "train.yaml", "hydra.run.dir")
                argv = agree_on_run_dir(argv, pattern)
        except UserError as err:
            print(f"bnlab: error: {err}", file=sys.stderr)
            return 2

    register_configs()
    sys.argv = ["bnlab train", *argv]

    def task(cfg) -> None:
        from bnlab.run.trainer import main as train_main

        train_main(cfg)

    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(task)()
    finally:
        if "torch" in sys.modules:  # only a run that trained can have joined a process group
            from bnlab.run.distributed import shutdown

            shutdown()
    return 0


def _configured(train_yaml, key: str):
    """``key`` of train.yaml as written (interpolations unresolved), or None."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(train_yaml), resolve=False)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _name_runs_by_swept_keys(argv: list[str], train_yaml) -> list[str]:
    """Name a sweep's run directories after what varies: ``norm=bn,seed=0``.

    Hydra names them after all overrides (``data=digits,norm=bn,seed=0,train.steps=50``); the
    keys every run shares are in the sweep's ``multirun.yaml`` and each run's ``.hydra/``, so
    they are added to ``hydra.job.config.override_dirname.exclude_keys`` (unless the user sets
    that list). Sweeps from a preset's ``hydra.sweeper.params`` still name their runs.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    exclude_key = "hydra.job.config.override_dirname.exclude_keys"
    candidates = [a for a in argv if "=" in a and not a.startswith("-")]
    if any(a.split("=", 1)[0].lstrip("+~") == exclude_key for a in candidates):
        return argv
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return argv  # Hydra reports the bad override itself
    fixed = [o.key_or_group for o in overrides
             if not o.is_hydra_override() and not o.is_sweep_override()]
    if not fixed:
        return argv
    excluded = list(_configured(train_yaml, exclude_key) or []) + fixed
    return [*argv, f"{exclude_key}=[{','.join(dict.fromkeys(excluded))}]"]


def _report(argv: list[str]) -> int:
    from bnlab.report.command import main as report_main

    return report_main(argv)


def _bench(argv: list[str]) -> int:
    from bnlab.bench import main as bench_main

    return bench_main(argv)


COMMANDS = {"train": _train, "report": _report, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"bnlab: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return COMMANDS[command](rest)


def entry() -> None:
    sys.exit(main())

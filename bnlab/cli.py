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
    from bnlab.preflight import check_output_dir
    from bnlab.resume import resume_argv

    try:
        argv = resume_argv(argv)
        if not any(a in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help") for a in argv):
            check_output_dir(argv)
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return 2

    import hydra

    from bnlab.config import config_dir, register_configs

    register_configs()
    sys.argv = ["bnlab train", *argv]

    def task(cfg) -> None:
        from bnlab.train import main as train_main

        train_main(cfg)

    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(task)()
    return 0


def _report(argv: list[str]) -> int:
    from bnlab.report import main as report_main

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

"""docs/presets.md's results table, written from the reports themselves.

    python scripts/presets_table.py --collect /path/to/sweep ...   # keep a sweep's claims.csv
    python scripts/presets_table.py                                 # rewrite the table

``scripts/reproduce.sh`` leaves ``report/claims.csv`` (the report's verdicts, one row per
comparison) and ``report/reproduce.json`` (preset, seeds, overrides, wall and CPU seconds) in
each sweep. ``--collect`` copies both into ``docs/results/<preset>/``, where they are kept with
the docs; the table between the markers of docs/presets.md is then rendered from every
``docs/results/*/``: no verdict or number in it is typed by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
PAGE = REPO / "docs" / "presets.md"
START, END = "<!-- presets-table:start -->", "<!-- presets-table:end -->"


def collect(sweep: Path) -> str:
    """Copy a sweep's claims.csv and reproduce.json into docs/results/<preset>/."""
    report = sweep / "report"
    meta = json.loads((report / "reproduce.json").read_text())
    target = RESULTS / meta["preset"]
    target.mkdir(parents=True, exist_ok=True)
    for name in ("claims.csv", "reproduce.json"):
        shutil.copyfile(report / name, target / name)
    return meta["preset"]


def number(text: str) -> str:
    value = float(text)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def side(row: dict, which: str) -> str:
    """A side's mean ± std over its finite values, and how many runs diverged or never reached a
    target (censored); "no finite value" when none has one."""
    extra = [f"{row[f'{which}_{k}']} {k}" for k in ("diverged", "censored")
             if row[f"{which}_{k}"] not in ("", "0")]
    if not row[f"{which}_mean"]:
        return "no finite value" + (f" ({', '.join(extra)})" if extra else "")
    mean, std = number(row[f"{which}_mean"]), number(row[f"{which}_std"] or "0")
    return f"{mean} ± {std}" + (f" ({', '.join(extra)})" if extra else "")


def claim_text(rows: list[dict]) -> str:
    """One claim: its verdict, then per comparison the two sides' numbers, and its p."""
    first = rows[0]
    if first["verdict"] == "not judged":
        return f"`{first['claim']}` not judged ({first['reason']})"
    parts = []
    for row in rows:
        where = f"{row['comparison']}: " if row["comparison"] else ""
        if row["kind"] == "paired":
            parts.append(f"{where}{row['metric']} - {row['than_metric']}: {side(row, 'better')}")
        else:
            parts.append(f"{where}{row['better']} {side(row, 'better')} vs {row['than']} {side(row, 'than')}")
    p = f"p = {float(first['claim_p']):.2g}" if first["claim_p"] else ""
    return f"`{first['claim']}` **{first['verdict']}** ({'; '.join(parts)}{'; ' + p if p else ''})"


def row_of(folder: Path) -> str:
    meta = json.loads((folder / "reproduce.json").read_text())
    with open(folder / "claims.csv", newline="") as f:
        by_claim: dict[str, list[dict]] = defaultdict(list)
        for row in csv.DictReader(f):
            by_claim[row["claim"]].append(row)
    command = " ".join(["scripts/reproduce.sh", meta["preset"], *meta["overrides"]])
    seeds = meta["seeds"].replace(",", ", ")
    time = f"{meta['wall_s'] / 60:.1f} min ({meta['cpu_s'] / 60:.1f} min of CPU, {meta['n_jobs']} jobs)"
    verdicts = "; ".join(claim_text(rows) for rows in by_claim.values())
    return f"| `{meta['preset']}` | `{command}` | {seeds} | {time} | {verdicts} |"


def render() -> str:
    rows = [row_of(folder) for folder in sorted(RESULTS.iterdir())
            if (folder / "claims.csv").is_file() and (folder / "reproduce.json").is_file()]
    header = ["| preset | laptop tier, as run | seeds | wall time (CPU time) | verdicts and numbers |",
              "|---|---|---|---|---|"]
    return "\n".join([START, *header, *rows, END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", nargs="*", default=[], metavar="SWEEP",
                        help="sweep directories made by scripts/reproduce.sh to keep first")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page's table is stale")
    args = parser.parse_args(argv)
    for sweep in args.collect:
        print(f"kept {collect(Path(sweep))}")
    page = PAGE.read_text()
    if START not in page or END not in page:
        print(f"{PAGE}: no {START} ... {END} markers", file=sys.stderr)
        return 2
    before, rest = page.split(START, 1)
    after = rest.split(END, 1)[1]
    table = render()
    rows = table.count("\n") - 3  # the markers and the two header lines
    updated = before + table + after
    if args.check:
        return 0 if updated == page else 1
    PAGE.write_text(updated)
    print(f"wrote {PAGE.relative_to(REPO)} ({rows} presets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Time `bnlab report` on a synthetic sweep: `python scripts/bench_report.py --help`."""

from bnlab.report.synthetic import main

main()

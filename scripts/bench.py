#!/usr/bin/env python
"""Benchmark bnlab against its baselines: `python scripts/bench.py --help` (same as `bnlab bench`)."""

import sys

from bnlab.bench import main

sys.exit(main())

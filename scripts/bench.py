#!/usr/bin/env python
"""Thin wrapper: `python scripts/bench.py [options]` is `mlx-diffgemma bench [options]`.

See mlx_diffgemma/bench.py and BENCHMARKS.md for what is measured and the commands used.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_diffgemma.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

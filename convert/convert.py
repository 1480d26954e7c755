#!/usr/bin/env python3
"""Convert google/diffusiongemma-26B-A4B-it (Hugging Face weights) to an MLX directory for
mlx-diffgemma, mlx-vlm and LM Studio.

    python convert/convert.py --hf-path google/diffusiongemma-26B-A4B-it \
        --mlx-path ~/.lmstudio/models/mlx-community/diffusiongemma-26B-A4B-it-4bit -q

Same as `mlx-diffgemma convert`; the logic is in mlx_diffgemma/convert.py. Default
recipe with -q: mixed-4 (experts and self-conditioning 4-bit, the rest 8-bit, group 64).
Streams tensor by tensor: a 48 GB checkpoint converts on a 24 GB machine.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_diffgemma.convert.commands import add_convert_args, main_convert  # noqa: E402


def main(argv=None) -> int:
    parser = add_convert_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    return main_convert(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

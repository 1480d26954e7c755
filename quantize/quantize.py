#!/usr/bin/env python3
"""Re-quantize an existing MLX DiffusionGemma directory (ours or mlx-vlm's) with another
recipe, streaming (each tensor dequantized and re-quantized by itself).

    python quantize/quantize.py --mlx-path diffusiongemma-mlx-bf16 --out diffusiongemma-4bit --recipe mixed-4
    python quantize/quantize.py --mlx-path diffusiongemma-4bit --out diffusiongemma-8bit --recipe 8bit

Same as `mlx-diffgemma quantize`; the logic is in mlx_diffgemma/quantize.py, the recipes in mlx_diffgemma/recipes.py:
mixed-4 (default), 4bit, 8bit, and bf16/fp16/fp32 (dequantize).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_diffgemma.convert.quantize import add_quantize_args, main_quantize  # noqa: E402


def main(argv=None) -> int:
    parser = add_quantize_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    return main_quantize(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

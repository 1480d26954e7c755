"""`mlx-diffgemma quantize`: re-quantize an existing MLX directory (ours or mlx-vlm's)
with another recipe (recipes.py), streaming as `convert` does."""

from __future__ import annotations

import argparse
from typing import Optional

from ..models.recipes import DEFAULT_RECIPE, RECIPES
from .commands import add_output_args, convert, output_options, run_cli

# -- the `quantize` command ----------------------------------------------------------------


def quantize(
    mlx_path,
    out_path,
    recipe: Optional[str] = DEFAULT_RECIPE,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    dtype: Optional[str] = None,
    force: bool = False,
    **kwargs,
):
    """Re-quantizes an existing MLX directory (ours or mlx-vlm's) into `out_path` with
    `recipe`: each quantized tensor is dequantized and re-quantized by itself, streaming,
    so memory stays bounded as in `convert`. `recipe="bf16"` (etc.) dequantizes.
    Returns the same summary dict as `convert`."""
    kwargs.setdefault("output_flag", "-o/--out")  # messages name the output as this command does
    return convert(
        mlx_path,
        out_path,
        quantize=recipe not in (None, "bf16", "fp16", "fp32"),
        recipe=recipe,
        q_bits=q_bits,
        q_group_size=q_group_size,
        dtype=dtype,
        force=force,
        **kwargs,
    )


def add_quantize_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `mlx-diffgemma quantize` options (also used by the top-level quantize/ script)."""
    p.add_argument("--mlx-path", "--model", dest="mlx_path", required=True,
                   help="the MLX model directory to re-quantize (ours or mlx-vlm's)")
    p.add_argument("-o", "--out", "--out-path", dest="out_path", required=True,
                   help="where to write the re-quantized directory")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=RECIPES,
                   help=f"quantization recipe (default {DEFAULT_RECIPE}); bf16/fp16/fp32 dequantize")
    add_output_args(p)
    return p


def main_quantize(args: argparse.Namespace) -> int:
    return run_cli(
        quantize,
        args.mlx_path,
        args.out_path,
        recipe=args.recipe,
        **output_options(args),
    )

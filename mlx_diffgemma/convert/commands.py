"""Hugging Face DiffusionGemma weights -> an MLX directory that mlx-diffgemma, mlx-vlm
(0.7.10) and LM Studio load, streaming with bounded memory.

Output layout (the mlx-community one, made by mlx-vlm's converter; see
docs/mlx-vlm-layout.md): Hugging Face tensor names, the fused expert tensors with a
`.weight` suffix, `lm_head` and the encoder's tied copies dropped (the encoder's own
`layer_scalar`s kept), the vision tower passed through unquantized, quantized matrices as
`<module>.weight` (packed uint32) + `.scales` + `.biases` (affine; mxfp4/nvfp4/mxfp8:
uint8 `.scales` and no biases), shards of at most 5 GiB named
`model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`, `config.json`
with the generation parameters merged in and the per-module `quantization` record, and
the tokenizer files, `chat_template.jinja` and `generation_config.json` copied.

plan.py decides every output tensor, write.py writes them, publish.py swaps the result
in; this module runs the three and holds the command line.
"""


from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..models.checkpoint import INDEX_FILE, ConversionError, scan_checkpoint
from ..models.loader import check_sidecars
from ..models.recipes import DTYPE_NAMES, RECIPES, RecipeError, make_recipe, quantization_record
from ..models.weights import is_vision_tensor
from . import write
from .plan import MAX_SHARD_SIZE, plan_jobs, plan_shards, read_config, resolve_source
from .publish import check_no_overlap, output_target, publish, recover_swaps, remove_stale_tmp
from .write import ConversionInterrupted, human_bytes

SHARD_FORMAT = "model-{:05d}-of-{:05d}.safetensors"


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    recipe: Optional[str] = None,
    dtype: Optional[str] = None,
    force: bool = False,
    revision: Optional[str] = None,
    max_shard_size: int = MAX_SHARD_SIZE,
    progress: bool = True,
    verbose: bool = True,
    output_flag: str = "--mlx-path",
) -> Dict[str, Any]:
    """Converts a DiffusionGemma checkpoint (HF directory, hub id, or an MLX directory,
    ours or mlx-vlm's: quantized tensors are dequantized and re-quantized) into an MLX
    directory at `mlx_path`.

    `quantize` with no `recipe` uses ``mixed-4``; `recipe` is one of ``mixed-4``,
    ``4bit``, ``8bit``, ``bf16``, ``fp16``, ``fp32``; `dtype` casts the floats (default:
    keep the source's). Refuses an existing `mlx_path` unless `force` (`output_flag`: how
    messages name it). Returns a summary
    dict (path, files, tensors, bytes, bits_per_weight, seconds, ...). Raises
    ConversionError (or ConversionInterrupted on Ctrl-C), leaving nothing behind.
    """
    t0 = time.time()
    from rich.console import Console

    console = Console(stderr=True, quiet=not (verbose or progress))
    say = console.print if verbose else (lambda *a, **k: None)

    try:
        r = make_recipe(recipe, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size, dtype=dtype)
    except RecipeError as e:
        raise ConversionError(str(e)) from e
    out, target, warnings = _output(hf_path, mlx_path, force, output_flag, say)
    shown = len(warnings)
    src = resolve_source(hf_path, revision=revision).absolute()

    # Read and check everything before writing anything.
    config = read_config(src)
    tensors = scan_checkpoint(src)
    check_no_overlap(src, target.dest, sorted({t.file for t in tensors.values()}), output_flag)
    jobs, quantized = plan_jobs(tensors, config, r, warn=warnings.append, config_path=src / "config.json")
    warnings += [f"the output will be incomplete: {p}" for p in check_sidecars(src)]
    for w in warnings[shown:]:
        say(f"[yellow]warning:[/yellow] {w}")
    record = quantization_record(r, quantized)
    new_config = write.build_config(config, src, r, record)
    shards = plan_shards(jobs, max_shard_size)
    total_out = sum(j.out_bytes for j in jobs)
    total_in = sum(j.src_bytes for j in jobs)

    tmp = target.tmp
    with write.partial_output(tmp, out, total_out):
        write.check_disk(tmp.parent, total_out)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        say(f"Converting [bold]{src}[/bold] -> [bold]{out}[/bold]: {r.describe()}")
        names = [SHARD_FORMAT.format(i + 1, len(shards)) for i in range(len(shards))]
        write.write_shards(tmp, names, shards, total_in, progress, console)
        index = {"metadata": {"total_size": total_out}, "weight_map": write.weight_map(names, shards)}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=4))
        copied = write.copy_sidecars(src, tmp)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=4))
        publish(tmp, target)

    summary = _summary(jobs, quantized, r, out, src, names, target.dest, copied, warnings)
    summary["seconds"] = time.time() - t0
    if verbose:
        _print_summary(console, summary)
    return summary


def _output(hf_path, mlx_path, force: bool, output_flag: str, say) -> Tuple[Path, Any, List[str]]:
    """(the output as named, its OutputTarget, warnings said): the output checked against
    a local source, after what killed runs left beside it is cleaned up or undone. That
    comes before "already exists": a swap cut in half gives the previous output back."""
    out = Path(mlx_path).expanduser().absolute()
    dest = Path(os.path.realpath(out))
    local = Path(hf_path).expanduser()
    if local.is_dir():  # before "already exists": say the real problem
        check_no_overlap(local, dest, sorted(local.iterdir()), output_flag)
    warnings = recover_swaps(dest)
    warnings += [f"removed {n}, left by a conversion that was killed" for n in remove_stale_tmp(dest)]
    for w in warnings:
        say(f"[yellow]warning:[/yellow] {w}")
    return out, output_target(out, force), warnings


def _summary(jobs, quantized, r, out, src, names, dest: Path, copied, warnings) -> Dict[str, Any]:
    params = sum(j.params for j in jobs)
    text = [j for j in jobs if not is_vision_tensor(j.name)]
    total_out = sum(j.out_bytes for j in jobs)
    by_bits: Dict[str, int] = {}
    for j in jobs:
        key = (f"{j.quant[0]}-bit" if j.quant[2] == "affine" else j.quant[2]) if j.quant else j.out_dtype.lower()
        by_bits[key] = by_bits.get(key, 0) + j.params
    return {
        "path": str(out),
        "source": str(src),
        "recipe": r.name,
        "files": names,
        "tensors": sum(len(j.outputs) for j in jobs),
        "quantized_modules": len(quantized),
        "bytes": total_out,
        "disk_bytes": sum(p.stat().st_size for p in dest.iterdir() if p.is_file()),
        "params": params,
        "bits_per_weight": 8 * total_out / params,
        "text_bits_per_weight": 8 * sum(j.out_bytes for j in text) / sum(j.params for j in text),
        "params_by_format": by_bits,
        "copied": copied,
        "warnings": warnings,
    }


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(int(n))


def _print_summary(console, s: Dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"{Path(s['path']).name} ({s['recipe']})", show_header=False)
    t.add_row("directory", s["path"])
    t.add_row("size on disk", f"{human_bytes(s['disk_bytes'])} in {len(s['files'])} shard(s)")
    t.add_row("bits per weight", f"{s['bits_per_weight']:.3f} (text model {s['text_bits_per_weight']:.3f})")
    by_format = ", ".join(f"{k}: {_count(v)}" for k, v in s["params_by_format"].items())
    t.add_row("parameters", f"{_count(s['params'])} ({by_format})")
    t.add_row("tensors", f"{s['tensors']} ({s['quantized_modules']} quantized modules)")
    t.add_row("time", f"{s['seconds']:.1f} s")
    for w in s["warnings"]:  # repeated here: the progress bar has scrolled them away
        t.add_row("[yellow]warning[/yellow]", w)
    console.print(t)


# -- command line ---------------------------------------------------------------------------------


# -- command-line value types: one argparse error line for a value out of range -----------


def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    v = _number(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (got {text})")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {text})")
    return v


def fraction(text: str) -> float:
    """A number in [0, 1] (argparse type)."""
    v = _number(text)
    if not 0 <= v <= 1:  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (got {text})")
    return v


def add_output_args(p: argparse.ArgumentParser) -> None:
    """The options `convert` and `quantize` share: widths, dtype, sharding, overwrite."""
    p.add_argument("--q-bits", type=int, default=None,
                   help="low width of the mixed recipe (default 4; the high width stays 8)")
    p.add_argument("--q-group-size", type=int, default=None, help="group size (default 64)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES),
                   help="float dtype of unquantized tensors and of scales/biases (default: the source's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--max-shard-size-gb", type=positive_float, default=5.0,
                   help="largest shard file (default 5 GiB, as mlx-lm/mlx-vlm)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of `convert`/`quantize` that `add_output_args` parsed."""
    return dict(
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        dtype=args.dtype,
        force=args.force,
        # capped at 1 EiB so that a huge finite value cannot overflow to infinity
        max_shard_size=int(min(args.max_shard_size_gb, 2.0**30) * 2**30),
        progress=not args.no_progress,
    )


def run_cli(fn, *args, **kwargs) -> int:
    from rich.console import Console

    err = Console(stderr=True)
    try:
        fn(*args, **kwargs)
        return 0
    except ConversionInterrupted as e:
        err.print(f"[red]interrupted:[/red] {e}")
        return e.exit_code
    except (ConversionError, ValueError) as e:  # bad input (VerifyError is a ValueError)
        err.print(f"[red]error:[/red] {e}")
        return 1


def add_convert_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `mlx-diffgemma convert` options (also used by the top-level convert/ script)."""
    p.add_argument("--hf-path", "--model", dest="hf_path", required=True,
                   help="Hugging Face model directory or hub id (e.g. google/diffusiongemma-26B-A4B-it)")
    p.add_argument("--mlx-path", dest="mlx_path", required=True, help="output directory")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize (recipe mixed-4 unless --recipe says otherwise)")
    p.add_argument("--recipe", default=None, choices=RECIPES,
                   help="mixed-4 (experts + self-conditioning 4-bit, the rest 8-bit; the default "
                   "with -q), 4bit, 8bit, mxfp4-mixed (experts MXFP4), 3bit-mixed, 2bit-mixed (fits a "
                   "16 GB Mac), or bf16/fp16/fp32 (unquantized)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    add_output_args(p)
    return p


def main_convert(args: argparse.Namespace) -> int:
    return run_cli(
        convert,
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        recipe=args.recipe,
        revision=args.revision,
        **output_options(args),
    )


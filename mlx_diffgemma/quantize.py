"""Quantization recipes, the per-module quantization record, size estimates, and the
`quantize` command (re-quantize an existing MLX directory, streaming).

Recipes (affine quantization, group 64 unless told otherwise):

* ``mixed-4`` (the default, and what mlx-vlm's converter / the mlx-community 4-bit
  checkpoints use): the routed experts and the self-conditioning MLP at 4 bits; the
  embedding, attention q/k/v/o, the dense MLP and the router projection at 8 bits.
* ``4bit`` / ``8bit``: every quantizable matrix at that width.
* ``bf16`` / ``fp16`` / ``fp32``: no quantization, weights cast to that dtype.

Never quantized: norms, ``layer_scalar``, the router's ``scale`` and ``per_expert_scale``
vectors, and the vision tower (passed through for the loaders that build it).

The record in ``config.json`` is mlx-lm's / mlx-vlm's: ``quantization`` (and the same dict
as ``quantization_config``) holds the default ``group_size``/``bits``/``mode`` plus one
entry per module path whose settings differ from the default, e.g.
``"model.decoder.layers.0.self_attn.q_proj": {"group_size": 64, "bits": 8}``. Modules at
the default settings are recognised by their ``.scales`` tensor, as both loaders do.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

# -- module kinds ------------------------------------------------------------------------

EMBEDDING = "embedding"
ATTENTION = "attention"
DENSE_MLP = "dense_mlp"
ROUTER = "router"
EXPERTS = "experts"
SELF_CONDITIONING = "self_conditioning"
QUANTIZABLE_KINDS = (EMBEDDING, ATTENTION, DENSE_MLP, ROUTER, EXPERTS, SELF_CONDITIONING)

_PROJ = ("gate_proj", "up_proj", "down_proj")


def module_kind(name: str) -> Optional[str]:
    """The kind of quantizable matrix tensor `name` (a runtime name ending in `.weight`)
    is, or None when it is never quantized (norms, scalars, router scale vectors, the
    vision tower)."""
    if not name.startswith("model.decoder.") or not name.endswith(".weight"):
        return None
    path = name[: -len(".weight")]
    if path == "model.decoder.embed_tokens":
        return EMBEDDING
    if path.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return EXPERTS
    if ".self_attn." in path and path.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
        return ATTENTION
    if ".mlp." in path and path.endswith(_PROJ):
        return DENSE_MLP
    if path.endswith(".router.proj"):
        return ROUTER
    if path.startswith("model.decoder.self_conditioning.") and path.endswith(_PROJ):
        return SELF_CONDITIONING
    return None


# -- recipes -------------------------------------------------------------------------------

RECIPES = ("mixed-4", "4bit", "8bit", "bf16", "fp16", "fp32")
DEFAULT_RECIPE = "mixed-4"
DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "f16": "float16",
    "fp32": "float32",
    "float32": "float32",
    "f32": "float32",
}
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUPS = (32, 64, 128)


class RecipeError(ValueError):
    """An unknown recipe or an invalid bits / group size / dtype combination."""


@dataclass
class Recipe:
    name: str
    # kind -> bits; a kind absent from the dict stays unquantized
    bits: Dict[str, int] = field(default_factory=dict)
    group_size: int = 64
    # The default ("top level") bits recorded in config.json's `quantization`.
    default_bits: Optional[int] = None
    # Output float dtype ("bfloat16" / "float16" / "float32"), None = keep the source's.
    dtype: Optional[str] = None
    mode: str = "affine"

    @property
    def quantized(self) -> bool:
        return bool(self.bits)

    def params_for(self, name: str, shape: Sequence[int]) -> Optional[Tuple[int, int]]:
        """(bits, group_size) for tensor `name` of (unquantized) `shape`, or None when it
        stays unquantized: not a quantizable kind, not in this recipe, or its input
        dimension is not a multiple of the group size (as mlx-vlm's converter does)."""
        kind = module_kind(name)
        if kind is None or kind not in self.bits or len(shape) < 2:
            return None
        if shape[-1] % self.group_size:
            return None
        return self.bits[kind], self.group_size

    def describe(self) -> str:
        if not self.quantized:
            return f"unquantized, {self.dtype}" if self.dtype else "unquantized, source dtype"
        by_bits: Dict[int, list] = {}
        for kind, b in self.bits.items():
            by_bits.setdefault(b, []).append(kind)
        parts = [f"{b}-bit: {', '.join(kinds)}" for b, kinds in sorted(by_bits.items())]
        return f"{self.name} ({'; '.join(parts)}; group {self.group_size}, {self.mode})"


def normalize_dtype(dtype: Optional[str]) -> Optional[str]:
    if dtype is None:
        return None
    try:
        return DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise RecipeError(
            f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32 (or bf16, fp16, fp32)"
        ) from None


def make_recipe(
    recipe: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    dtype: Optional[str] = None,
) -> Recipe:
    """Resolves the user's options to a Recipe.

    `recipe=None` means ``mixed-4`` when `quantize` else unquantized (source dtype, or
    `dtype`). `q_bits` sets the low width of the mixed recipe (default 4; the high width
    stays 8). `q_group_size` (default 64) applies to every quantized module.
    """
    dtype = normalize_dtype(dtype)
    group = 64 if q_group_size is None else int(q_group_size)
    if recipe is not None:
        recipe = str(recipe).lower().replace("_", "-")
        aliases = {"mixed": "mixed-4", "mixed4": "mixed-4", "4": "4bit", "8": "8bit",
                   "q4": "4bit", "q8": "8bit", "bfloat16": "bf16", "float16": "fp16",
                   "float32": "fp32"}
        recipe = aliases.get(recipe, recipe)
        if recipe not in RECIPES:
            raise RecipeError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if recipe is None:
        recipe = DEFAULT_RECIPE if quantize else None

    if recipe in ("bf16", "fp16", "fp32"):
        rdtype = DTYPE_NAMES[recipe]
        if dtype is not None and dtype != rdtype:
            raise RecipeError(f"recipe {recipe} conflicts with --dtype {dtype}")
        return Recipe(name=recipe, dtype=rdtype)
    if recipe is None:
        name = {None: "unquantized", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
        return Recipe(name=name, dtype=dtype)

    if group not in SUPPORTED_GROUPS:
        raise RecipeError(f"group size {group} not supported; use one of {SUPPORTED_GROUPS}")
    if recipe == "mixed-4":
        low = 4 if q_bits is None else int(q_bits)
        if low not in SUPPORTED_BITS:
            raise RecipeError(f"{low} bits not supported; use one of {SUPPORTED_BITS}")
        bits = {EXPERTS: low, SELF_CONDITIONING: low, EMBEDDING: 8, ATTENTION: 8, DENSE_MLP: 8, ROUTER: 8}
        name = "mixed-4" if low == 4 else f"mixed-{low}"
        return Recipe(name=name, bits=bits, group_size=group, default_bits=low, dtype=dtype)
    width = 4 if recipe == "4bit" else 8
    if q_bits is not None and int(q_bits) != width:
        raise RecipeError(f"recipe {recipe} conflicts with --q-bits {q_bits}")
    bits = {k: width for k in QUANTIZABLE_KINDS}
    return Recipe(name=recipe, bits=bits, group_size=group, default_bits=width, dtype=dtype)


def quantization_record(recipe: Recipe, quantized: Mapping[str, Tuple[int, int]]) -> Optional[dict]:
    """config.json's `quantization` dict for the modules actually quantized
    (module path -> (bits, group)), or None when nothing is."""
    if not quantized:
        return None
    record: Dict[str, Any] = {
        "group_size": recipe.group_size,
        "bits": recipe.default_bits,
        "mode": recipe.mode,
    }
    for path in sorted(quantized):
        bits, group = quantized[path]
        if bits != recipe.default_bits or group != recipe.group_size:
            record[path] = {"group_size": group, "bits": bits}
    return record


def _check_params(entry: Mapping[str, Any], where: str) -> None:
    for key, allowed in (("bits", SUPPORTED_BITS), ("group_size", SUPPORTED_GROUPS)):
        if key not in entry:
            continue
        v = entry[key]
        if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
            raise RecipeError(f"{where}.{key} is {v!r}; expected one of {allowed}")


def check_quantization_record(record: Any, where: str = "quantization") -> None:
    """Raises RecipeError naming the field when a config's `quantization` record is not
    one `module_quantization` can read: an object whose `bits`/`group_size` (top level
    and per module) are supported integers and whose module entries are objects or
    false. `where` prefixes the field names in the message (e.g. the file)."""
    if record is None:
        return
    if not isinstance(record, dict):
        raise RecipeError(f"{where} must be an object (found {type(record).__name__})")
    _check_params(record, where)
    mode = record.get("mode", "affine")
    if not isinstance(mode, str):
        raise RecipeError(f"{where}.mode is {mode!r}; expected a string such as 'affine'")
    for key, entry in record.items():
        if key in ("bits", "group_size", "mode") or entry is False:
            continue
        if isinstance(entry, dict):
            _check_params(entry, f"{where}[{key!r}]")


def module_quantization(record: Optional[Mapping[str, Any]], path: str) -> Optional[Tuple[int, int]]:
    """(bits, group) a config `quantization` record gives module `path`: its own entry,
    else the defaults. None when there is no record or the entry says False."""
    if not record:
        return None
    entry = record.get(path)
    if entry is False:
        return None
    if isinstance(entry, dict):
        return int(entry.get("bits", record.get("bits", 4))), int(
            entry.get("group_size", record.get("group_size", 64))
        )
    return int(record.get("bits", 4)), int(record.get("group_size", 64))


# -- size estimates -------------------------------------------------------------------------

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def vision_shapes(config: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """The Gemma-4 vision tower's tensors (as transformers saves them) from `vision_config`,
    plus the multimodal embedder; empty without a vision config."""
    vc = config.get("vision_config") or {}
    if not vc:
        return {}
    H = vc.get("hidden_size", 768)
    I = vc.get("intermediate_size", 3072)
    L = vc.get("num_hidden_layers", 16)
    nh = vc.get("num_attention_heads", 12)
    kv = vc.get("num_key_value_heads", nh)
    hd = vc.get("head_dim", 64)
    patch = vc.get("patch_size", 16)
    pos = vc.get("position_embedding_size", 10 * 1024)
    text_h = (config.get("text_config") or {}).get("hidden_size", 2816)
    p = "model.encoder.vision_tower"
    out: Dict[str, Tuple[int, ...]] = {
        f"{p}.patch_embedder.input_proj.weight": (H, 3 * patch * patch),
        f"{p}.patch_embedder.position_embedding_table": (2, pos, H),
        "model.encoder.embed_vision.embedding_projection.weight": (text_h, H),
    }
    if vc.get("standardize"):
        out[f"{p}.std_bias"] = (H,)
        out[f"{p}.std_scale"] = (H,)
    lin = ".linear.weight"
    for i in range(L):
        q = f"{p}.encoder.layers.{i}"
        out[f"{q}.self_attn.q_proj{lin}"] = (nh * hd, H)
        out[f"{q}.self_attn.k_proj{lin}"] = (kv * hd, H)
        out[f"{q}.self_attn.v_proj{lin}"] = (kv * hd, H)
        out[f"{q}.self_attn.o_proj{lin}"] = (H, nh * hd)
        out[f"{q}.self_attn.q_norm.weight"] = (hd,)
        out[f"{q}.self_attn.k_norm.weight"] = (hd,)
        out[f"{q}.mlp.gate_proj{lin}"] = (I, H)
        out[f"{q}.mlp.up_proj{lin}"] = (I, H)
        out[f"{q}.mlp.down_proj{lin}"] = (H, I)
        for norm in ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            out[f"{q}.{norm}.weight"] = (H,)
    return out


def quantized_nbytes(shape: Sequence[int], bits: int, group: int, scale_itemsize: int) -> int:
    """Bytes of an affine-quantized tensor: packed uint32 weight + scales + biases."""
    n = math.prod(shape)
    return n * bits // 8 + 2 * (n // group) * scale_itemsize


def estimate(
    config: Mapping[str, Any],
    recipe: Optional[str] = DEFAULT_RECIPE,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    dtype: Optional[str] = None,
) -> Dict[str, Any]:
    """On-disk size and bits per weight a conversion with `recipe` would produce for the
    model `config` (an HF config.json dict), computed from the shapes alone.

    Returns bytes (tensor data; headers, tokenizer and config files add a few MB),
    params, `bits_per_weight` over everything written (vision tower included, counted as
    mlx-vlm counts it: stored bits / original parameter count), `text_bits_per_weight`
    over the text model alone, and a per-kind breakdown.
    """
    from .config import ModelArgs
    from .weights import expected_shapes

    r = make_recipe(recipe, quantize=recipe is not None, q_bits=q_bits,
                    q_group_size=q_group_size, dtype=dtype)
    src_dtype = (
        config.get("torch_dtype") or config.get("dtype")
        or (config.get("text_config") or {}).get("dtype") or "bfloat16"
    )
    out_dtype = r.dtype or normalize_dtype(src_dtype) or "bfloat16"
    item = _ITEMSIZE[out_dtype]
    args = ModelArgs.from_dict(dict(config))

    kinds: Dict[str, Dict[str, float]] = {}

    def add(kind, n, nbytes):
        k = kinds.setdefault(kind, {"params": 0, "bytes": 0})
        k["params"] += n
        k["bytes"] += nbytes

    text_params = text_bytes = 0
    for name, shape in expected_shapes(args).items():
        n = math.prod(shape)
        qp = r.params_for(name, shape)
        nbytes = quantized_nbytes(shape, qp[0], qp[1], item) if qp else n * item
        add(module_kind(name) or "norms_and_scalars", n, nbytes)
        text_params += n
        text_bytes += nbytes
    vis_params = vis_bytes = 0
    for name, shape in vision_shapes(config).items():
        n = math.prod(shape)
        vis_params += n
        vis_bytes += n * item
    if vis_params:
        add("vision_tower", vis_params, vis_bytes)
    for k in kinds.values():
        k["bits_per_weight"] = 8 * k["bytes"] / k["params"] if k["params"] else 0.0
    total_bytes = text_bytes + vis_bytes
    total_params = text_params + vis_params
    return {
        "recipe": r.name,
        "description": r.describe(),
        "dtype": out_dtype,
        "params": total_params,
        "text_params": text_params,
        "bytes": total_bytes,
        "gb": total_bytes / 1e9,
        "gib": total_bytes / 2**30,
        "bits_per_weight": 8 * total_bytes / total_params,
        "text_bits_per_weight": 8 * text_bytes / text_params,
        "by_kind": kinds,
    }


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
    from .convert import convert

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
    from .convert import _run_cli

    return _run_cli(
        quantize,
        args.mlx_path,
        args.out_path,
        recipe=args.recipe,
        **output_options(args),
    )

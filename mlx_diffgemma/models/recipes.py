"""Quantization recipes and the per-module quantization record. Imports nothing of
ours: the converter, the size estimates and the loader all read it.

Recipes (affine quantization, group 64 unless told otherwise; MLX's other modes have a
fixed width and group: mxfp4 4/32, nvfp4 4/16, mxfp8 8/32, uint8 scales and no biases):

* ``mixed-4`` (the default, and what mlx-vlm's converter / the mlx-community 4-bit
  checkpoints use): the routed experts and the self-conditioning MLP at 4 bits; the
  embedding, attention q/k/v/o, the dense MLP and the router projection at 8 bits.
* ``4bit`` / ``8bit``: every quantizable matrix at that width.
* ``mxfp4-mixed``: the routed experts and the self-conditioning MLP in MXFP4 (4-bit
  floats, one power-of-two scale per 32 weights, no biases: 4.25 bits a weight); the
  rest 8-bit affine as in ``mixed-4``.
* ``3bit-mixed``: experts and self-conditioning MLP 3-bit affine; the embedding (also
  the LM head) and the router 8-bit; attention and the dense MLP 6-bit.
* ``2bit-mixed`` (the one whose weights, a 4K context and a step fit a 16 GB Mac's ~11 GB
  working set): experts and self-conditioning MLP 2-bit affine; the router 8-bit; the
  embedding, attention and dense MLP 6-bit.
* ``bf16`` / ``fp16`` / ``fp32``: no quantization, weights cast to that dtype.

Never quantized: norms, ``layer_scalar``, the router's ``scale`` and ``per_expert_scale``
vectors, and the vision tower (passed through for the loaders that build it).

The record in ``config.json`` is mlx-lm's / mlx-vlm's: ``quantization`` (and the same dict
as ``quantization_config``) holds the default ``group_size``/``bits``/``mode`` plus one
entry per module path whose settings differ from the default, e.g.
``"model.decoder.layers.0.self_attn.q_proj": {"group_size": 64, "bits": 8}``. Modules at
the default settings are recognised by their ``.scales`` tensor, as both loaders do. A
module entry without ``mode`` is affine (both loaders hand the entry to
``to_quantized``, whose default mode is affine), so a recipe that uses another mode
writes ``mode`` in every entry.
"""

from __future__ import annotations

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

RECIPES = ("mixed-4", "4bit", "8bit", "mxfp4-mixed", "3bit-mixed", "2bit-mixed", "bf16", "fp16", "fp32")
# The quantized recipes, widest first (what the load-time memory check offers instead).
QUANTIZED_RECIPES = ("8bit", "mixed-4", "mxfp4-mixed", "4bit", "3bit-mixed", "2bit-mixed")
# mode -> the (bits, group) it requires; affine takes any of SUPPORTED_BITS/GROUPS.
MODES = {"affine": None, "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
# name -> kind -> bits (an int: affine at the recipe's group size) or a mode name.
_MIXED_SPECS = {
    "mxfp4-mixed": {EXPERTS: "mxfp4", SELF_CONDITIONING: "mxfp4", EMBEDDING: 8, ATTENTION: 8,
                    DENSE_MLP: 8, ROUTER: 8},
    "3bit-mixed": {EXPERTS: 3, SELF_CONDITIONING: 3, EMBEDDING: 8, ROUTER: 8, ATTENTION: 6,
                   DENSE_MLP: 6},
    "2bit-mixed": {EXPERTS: 2, SELF_CONDITIONING: 2, ROUTER: 8, EMBEDDING: 6, ATTENTION: 6,
                   DENSE_MLP: 6},
}
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
Quant = Tuple[int, int, str]  # (bits, group, mode) of one module


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
    mode: str = "affine"  # the default mode recorded at the top level
    # kind -> mode other than affine (its bits and group are the mode's)
    modes: Dict[str, str] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return bool(self.bits)

    @property
    def default_group(self) -> int:
        fixed = MODES.get(self.mode)
        return fixed[1] if fixed else self.group_size

    def quant_for(self, name: str, shape: Sequence[int]) -> Optional[Quant]:
        """(bits, group_size, mode) for tensor `name` of (unquantized) `shape`, or None
        when it stays unquantized: not a quantizable kind, not in this recipe, or its
        input dimension is not a multiple of the group size (as mlx-vlm's converter does)."""
        kind = module_kind(name)
        if kind is None or kind not in self.bits or len(shape) < 2:
            return None
        mode = self.modes.get(kind, "affine")
        bits, group = MODES[mode] or (self.bits[kind], self.group_size)
        if shape[-1] % group:
            return None
        return bits, group, mode

    def params_for(self, name: str, shape: Sequence[int]) -> Optional[Tuple[int, int]]:
        """(bits, group_size) of `quant_for`."""
        q = self.quant_for(name, shape)
        return None if q is None else q[:2]

    def describe(self) -> str:
        if not self.quantized:
            return f"unquantized, {self.dtype}" if self.dtype else "unquantized, source dtype"
        by_bits: Dict[Any, list] = {}
        for kind, b in self.bits.items():
            by_bits.setdefault(self.modes.get(kind) or f"{b}-bit", []).append(kind)
        parts = [f"{b}: {', '.join(kinds)}" for b, kinds in sorted(by_bits.items())]
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
    if recipe in _MIXED_SPECS:
        if q_bits is not None:
            raise RecipeError(f"recipe {recipe} fixes its widths; --q-bits applies to mixed-4 only")
        spec = _MIXED_SPECS[recipe]
        modes = {k: v for k, v in spec.items() if isinstance(v, str)}
        bits = {k: (MODES[v][0] if isinstance(v, str) else v) for k, v in spec.items()}
        mode = modes.get(EXPERTS, "affine")  # the experts are most of the model: the default
        return Recipe(name=recipe, bits=bits, group_size=group, default_bits=bits[EXPERTS],
                      dtype=dtype, mode=mode, modes=modes)
    width = 4 if recipe == "4bit" else 8
    if q_bits is not None and int(q_bits) != width:
        raise RecipeError(f"recipe {recipe} conflicts with --q-bits {q_bits}")
    bits = {k: width for k in QUANTIZABLE_KINDS}
    return Recipe(name=recipe, bits=bits, group_size=group, default_bits=width, dtype=dtype)


def quantization_record(recipe: Recipe, quantized: Mapping[str, Quant]) -> Optional[dict]:
    """config.json's `quantization` dict for the modules actually quantized
    (module path -> (bits, group, mode)), or None when nothing is. Entries name their
    `mode` when any mode but affine is in play (an entry without one is affine)."""
    if not quantized:
        return None
    default = (recipe.default_bits, recipe.default_group, recipe.mode)
    record: Dict[str, Any] = {"group_size": default[1], "bits": default[0], "mode": default[2]}
    explicit = any(q[2] != "affine" for q in quantized.values())
    for path in sorted(quantized):
        q = tuple(quantized[path])
        if q != default:
            record[path] = {"group_size": q[1], "bits": q[0]}
            if explicit:
                record[path]["mode"] = q[2]
    return record


def _check_params(entry: Mapping[str, Any], where: str, mode: str = "affine") -> None:
    if not isinstance(mode, str) or mode not in MODES:
        raise RecipeError(f"{where}.mode is {mode!r}; expected one of {', '.join(MODES)}")
    fixed = MODES[mode]
    for i, (key, allowed) in enumerate((("bits", SUPPORTED_BITS), ("group_size", SUPPORTED_GROUPS))):
        if key not in entry:
            continue
        v = entry[key]
        if fixed:
            allowed = (fixed[i],)
        if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
            raise RecipeError(f"{where}.{key} is {v!r}; expected one of {allowed}"
                              + (f" with mode {mode}" if fixed else ""))


def check_quantization_record(record: Any, where: str = "quantization") -> None:
    """Raises RecipeError naming the field when a config's `quantization` record is not
    one `module_quantization` can read: an object whose `bits`/`group_size` (top level
    and per module) are supported integers and whose module entries are objects or
    false. `where` prefixes the field names in the message (e.g. the file)."""
    if record is None:
        return
    if not isinstance(record, dict):
        raise RecipeError(f"{where} must be an object (found {type(record).__name__})")
    _check_params(record, where, record.get("mode", "affine"))
    for key, entry in record.items():
        if key in ("bits", "group_size", "mode") or entry is False:
            continue
        if isinstance(entry, dict):
            _check_params(entry, f"{where}[{key!r}]", entry.get("mode", "affine"))


def module_quantization(record: Optional[Mapping[str, Any]], path: str) -> Optional[Quant]:
    """(bits, group, mode) a config `quantization` record gives module `path`: its own
    entry (affine unless it names a mode, as the loaders read it), else the defaults.
    None when there is no record or the entry says False."""
    if not record:
        return None
    entry = record.get(path)
    if entry is False:
        return None
    if isinstance(entry, dict):
        mode = entry.get("mode", "affine")
        fixed = MODES.get(mode) or (None, None)
        return (int(entry.get("bits", fixed[0] or record.get("bits", 4))),
                int(entry.get("group_size", fixed[1] or record.get("group_size", 64))), mode)
    return int(record.get("bits", 4)), int(record.get("group_size", 64)), record.get("mode", "affine")

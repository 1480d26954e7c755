"""Planning a conversion: the source checkpoint found and read, and every output tensor's
name, dtype, shape and shard decided before anything is written.

Checked inputs: every safetensors header as the reference library checks it (contiguous,
non-overlapping tensors covering the data exactly), float tensors labelled as floats,
config.json / the index / the quantization record field by field; a broken tokenizer,
chat template or generation config is copied with a warning (`verify` reports it).
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..models.checkpoint import FLOAT_DTYPES, ST_DTYPES, ConversionError, TensorRef
from ..models.config import ConfigError, load_config
from ..models.model import expected_shapes
from ..models.paths import hub_snapshot
from ..models.recipes import MODES, Quant, Recipe, RecipeError, check_quantization_record, module_quantization
from ..models.weights import QUANT_SUFFIXES, hf_to_mlx_name, is_vision_tensor

MAX_SHARD_SIZE = 5 << 30  # bytes, as mlx-lm / mlx-vlm (MAX_FILE_SIZE_GB = 5)
_NAME_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


# -- the source checkpoint -------------------------------------------------------------------


def resolve_source(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local directory, or a Hugging Face hub id fetched (or found in the local cache:
    HF_HUB_OFFLINE=1 uses the cache only) with `huggingface_hub.snapshot_download`."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConversionError(f"{p} is a file; pass the model directory")
        return p
    text = str(path_or_repo)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith("/"):
        raise ConversionError(f"model directory {p} does not exist (nor is it a hub id like org/name)")
    try:
        return hub_snapshot(text, revision=revision)
    except Exception as e:
        raise ConversionError(
            f"cannot fetch {text!r} from the Hugging Face hub or find it in the local cache "
            f"({type(e).__name__}: {e}); check the id, your network or HF_HUB_OFFLINE, or "
            "pass a local directory"
        ) from e


def read_config(src: Path) -> Dict[str, Any]:
    try:
        return load_config(src)
    except (ConfigError, FileNotFoundError) as e:
        raise ConversionError(str(e)) from None


def model_args(config: Dict[str, Any], path: Path):
    """(ModelArgs, expected text shapes) of a config.json, or ConversionError naming the
    file: the config parser and the module tree reject hostile values with whatever
    Python raises, so every failure is turned into one line here."""
    from ..models.config import ModelArgs

    try:
        args = ModelArgs.from_dict(config, source=str(path))
        return args, expected_shapes(args)
    except ConfigError as e:  # names the file and the field
        raise ConversionError(str(e)) from e
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise ConversionError(f"{path} has a field of the wrong kind or range ({type(e).__name__}: {e})") from e


# -- planning ----------------------------------------------------------------------------------


@dataclass
class TensorJob:
    """One output tensor (or quantized triplet) and where its data comes from."""

    name: str  # output name; '<module>.weight' for quantized matrices
    shape: Tuple[int, ...]  # logical (unquantized) shape
    src: TensorRef  # the float source, or the packed weight of a quantized source
    src_scales: Optional[TensorRef] = None
    src_biases: Optional[TensorRef] = None
    src_quant: Optional[Quant] = None  # (bits, group, mode) of a quantized source
    out_dtype: str = "F32"  # floats out: the tensor itself, or the (affine) scales/biases
    quant: Optional[Quant] = None  # (bits, group, mode) to quantize to
    outputs: List[Tuple[str, str, Tuple[int, ...]]] = field(default_factory=list)

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def rows(self) -> int:
        return math.prod(self.shape) // self.cols if self.cols else 0

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def src_bytes(self) -> int:
        return sum(r.nbytes for r in (self.src, self.src_scales, self.src_biases) if r is not None)

    @property
    def out_bytes(self) -> int:
        return sum(math.prod(s) * ST_DTYPES[d][0] for _, d, s in self.outputs)

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    def plan_outputs(self) -> None:
        if self.quant is None:
            self.outputs = [(self.name, self.out_dtype, self.shape)]
            return
        bits, group, mode = self.quant
        lead, c = self.shape[:-1], self.cols
        self.outputs = [
            (f"{self.module}.weight", "U32", lead + (c * bits // 32,)),
            (f"{self.module}.scales", self.out_dtype if mode == "affine" else "U8", lead + (c // group,)),
        ]
        if mode == "affine":  # the other modes keep no biases
            self.outputs.append((f"{self.module}.biases", self.out_dtype, lead + (c // group,)))


def _source_mode(base, s: TensorRef, b: Optional[TensorRef], bits: int, group: int, src_record) -> str:
    """The mode of a quantized source module: affine keeps float scales and biases; the
    others uint8 scales alone, each with one (bits, group) (mlx-lm's infer_quant_config),
    and the record must say the same."""
    if s.dtype != "U8":
        if b is None:
            raise ConversionError(f"{base} has float scales but no biases: an affine module needs both")
        mode = "affine"
    else:
        found = [m for m, fixed in MODES.items() if fixed == (bits, group)]
        if not found or b is not None:
            raise ConversionError(f"{base}: uint8 scales with {bits} bits, group {group}"
                                  f"{' and biases' if b is not None else ''} fit no quantization mode")
        mode = found[0]
    qp = module_quantization(src_record, base)
    if qp is not None and qp[2] != mode:
        raise ConversionError(f"{base} is stored as {mode} but config.json's record says {qp[2]}")
    return mode


def _infer_source_quant(base, w: TensorRef, s: TensorRef, expected, src_record):
    """(bits, group, logical shape) of a quantized source module from its shapes, checked
    against the config's record where the config does not fix the input dimension."""
    if w.dtype != "U32":
        raise ConversionError(f"{base}.weight is {w.dtype}, expected packed uint32 next to {base}.scales")
    if not w.shape or not s.shape or not w.shape[-1] or not s.shape[-1]:
        raise ConversionError(f"{base}: packed shape {list(w.shape)} / scales {list(s.shape)} are empty")
    words, ngroups = w.shape[-1], s.shape[-1]
    if expected is not None:
        cols = expected[-1]
        bits = words * 32 // cols if cols else 0
        if bits * cols != words * 32 or cols % ngroups:
            raise ConversionError(
                f"{base}: packed shape {list(w.shape)} / scales {list(s.shape)} do not fit the "
                f"config's {list(expected)}"
            )
        return bits, cols // ngroups, tuple(expected)
    qp = module_quantization(src_record, base)
    if qp is None:
        raise ConversionError(f"{base} is quantized but config.json has no quantization record")
    bits = qp[0]
    cols = words * 32 // bits
    return bits, cols // ngroups, tuple(w.shape[:-1]) + (cols,)


def source_record(config: Dict[str, Any], where: str) -> Optional[Dict[str, Any]]:
    """The quantization record of a config.json, checked (ConversionError naming `where`
    and the field when it is malformed)."""
    key = "quantization" if config.get("quantization") else "quantization_config"
    record = config.get(key) or None
    try:
        check_quantization_record(record, f"{where}: {key}")
    except RecipeError as e:
        raise ConversionError(f"{e}; fix or re-download the config") from e
    return record


def _require_float(ref: TensorRef) -> None:
    if ref.dtype not in FLOAT_DTYPES:
        raise ConversionError(
            f"{ref.file}: tensor {ref.key} is labelled {ref.dtype} but the model expects a float "
            f"({'/'.join(FLOAT_DTYPES)}); the file is damaged: download or convert it again"
        )


def plan_jobs(
    tensors: Dict[str, TensorRef],
    config: Dict[str, Any],
    recipe: Recipe,
    warn: Callable[[str], None] = lambda m: None,
    config_path: Path = Path("config.json"),
) -> Tuple[List[TensorJob], Dict[str, Tuple[int, int]]]:
    """Maps source tensors to output jobs (renamed, checked against the config's shapes,
    quantization decided per module). Returns the jobs and {module: (bits, group, mode)} of
    those quantized."""
    _, expected = model_args(config, config_path)
    src_record = source_record(config, str(config_path))

    renamed: Dict[str, TensorRef] = {}
    for key, ref in tensors.items():
        name = hf_to_mlx_name(key, keep_vision=True)
        if name is None:
            continue
        if name in renamed:
            raise ConversionError(f"tensors {renamed[name].key} and {key} both map to {name}")
        renamed[name] = ref

    floats_seen = [r.dtype for n, r in renamed.items() if r.dtype in FLOAT_DTYPES and not n.endswith(QUANT_SUFFIXES)]
    # the float dtype of a module whose scales are uint8 (mxfp4/nvfp4/mxfp8) when dequantized
    model_float = max(set(floats_seen), key=floats_seen.count) if floats_seen else "F32"
    jobs: List[TensorJob] = []
    for name in sorted(renamed):
        if name.endswith(QUANT_SUFFIXES):
            base = name.rsplit(".", 1)[0]
            if f"{base}.weight" not in renamed:
                raise ConversionError(f"{name} has no {base}.weight beside it")
            continue
        ref = renamed[name]
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        job = TensorJob(name=name, shape=ref.shape, src=ref)
        if base is not None and f"{base}.scales" in renamed:
            s = renamed[f"{base}.scales"]
            b = renamed.get(f"{base}.biases")
            bits, group, shape = _infer_source_quant(base, ref, s, expected.get(name), src_record)
            mode = _source_mode(base, s, b, bits, group, src_record)
            job.shape, job.src_scales, job.src_biases, job.src_quant = shape, s, b, (bits, group, mode)
            floats = (s, b) if mode == "affine" else ()  # uint8 scales: checked by _source_mode
        else:
            floats = (ref,)
        for f in floats:  # every tensor of the model is float but the packed weights (and uint8 scales)
            _require_float(f)
        src_float = floats[0].dtype if floats else model_float
        job.out_dtype = _NAME_TO_ST[recipe.dtype] if recipe.dtype else src_float
        if not is_vision_tensor(name):
            job.quant = recipe.quant_for(name, job.shape)
        job.plan_outputs()
        jobs.append(job)

    _check_against_config(jobs, expected)

    quantized: Dict[str, Quant] = {}
    skipped = []
    for j in jobs:
        if j.quant is not None:
            quantized[j.module] = j.quant
        elif recipe.quantized and recipe.params_for(j.name, j.shape[:-1] + (recipe.group_size,)):
            skipped.append(j.module)
    if skipped:
        warn(
            f"{len(skipped)} module(s) left unquantized: input dimension not a multiple of "
            f"group size {recipe.group_size} (e.g. {skipped[0]})"
        )
    return jobs, quantized


def _check_against_config(jobs: List[TensorJob], expected: Dict[str, Tuple[int, ...]]) -> None:
    """Every tensor the config implies is there with its shape, and nothing else but the
    vision tower."""
    seen = {j.name for j in jobs}
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ConversionError(
            f"the checkpoint lacks {len(missing)} tensor(s) its config.json requires "
            f"(e.g. {', '.join(missing[:4])}); the weights and config do not belong together"
        )
    by_name = {j.name: j for j in jobs}
    wrong = [
        f"{n} {list(by_name[n].shape)} (config implies {list(s)})"
        for n, s in expected.items()
        if tuple(by_name[n].shape) != tuple(s)
    ]
    if wrong:
        raise ConversionError(
            f"{len(wrong)} tensor(s) do not have the shape config.json implies: {'; '.join(wrong[:4])}"
        )
    unexpected = [j.name for j in jobs if j.name not in expected and not is_vision_tensor(j.name)]
    if unexpected:
        raise ConversionError(
            f"the checkpoint has {len(unexpected)} tensor(s) a DiffusionGemma model does not use "
            f"(e.g. {', '.join(unexpected[:4])}); is config.json the right one?"
        )


def plan_shards(jobs: Sequence[TensorJob], max_shard_size: int = MAX_SHARD_SIZE) -> List[List[TensorJob]]:
    """Greedy shards of at most `max_shard_size` bytes, in name order, a module's tensors
    kept together; a module larger than the limit gets a shard of its own (mlx-lm's
    make_shards rule, applied to planned sizes instead of live arrays)."""
    shards: List[List[TensorJob]] = []
    size = 0
    for j in jobs:
        if not shards or size + j.out_bytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(j)
        size += j.out_bytes
    return shards



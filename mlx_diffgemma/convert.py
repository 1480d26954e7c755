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

Memory: mlx-lm's / mlx-vlm's `save_model`/`save_weights` build the whole model and hand
every shard to `mx.save_safetensors` at once (up to 5 GiB of arrays alive), which does not
fit a 48 GB checkpoint on a 24 GB machine. Here every output tensor's size is known from
the source shapes and the recipe before anything is written, so each shard's safetensors
header is written first and the tensors are then streamed into their slots: a tensor is
read from its source shard a block of rows at a time (rows are independent for both
casting and affine quantization, whose groups run along the last axis), quantized, and
written at its offset. Peak memory is one block (64 MiB of float32 by default) plus the
interpreter, whatever the size of the largest tensor.

Atomic: everything is written into `<out>.tmp-<pid>` beside the output and renamed at the
end; any failure (bad input, Ctrl-C, SIGTERM/SIGHUP, disk full) removes it and raises one
error saying why, and a later run removes the `.tmp-<pid>` of a run that was killed
(SIGKILL). With --force the final swap (previous output to `<out>.old-<pid>`, new one in,
old one removed) is not cut by Ctrl-C or SIGTERM: the signal waits for its end and the
message says the new output is in place; a swap cut by SIGKILL is undone (the previous
output moved back) or finished (the old one removed) by the next run, which says so.
Publishing never removes what was not checked at the start: a directory that
appeared at the output meanwhile is left alone (the finished output is kept beside it),
`--force` replaces only the directory found at the start, and an output that is, holds
or lies inside the source is refused. A symlinked output is written at the link's target.

Checked inputs: every safetensors header as the reference library checks it (contiguous,
non-overlapping tensors covering the data exactly), float tensors labelled as floats,
config.json / the index / the quantization record field by field; a broken tokenizer,
chat template or generation config is copied with a warning (`verify` reports it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .checkpoint import (
    FLOAT_DTYPES,
    INDEX_FILE,
    ST_DTYPES,
    ConversionError,
    ShardFiles,
    TensorRef,
    header_bytes,
    read_json,
    scan_checkpoint,
)
from .config import ConfigError, load_config
from .loader import check_sidecars
from .model import expected_shapes
from .paths import hub_snapshot
from .publish import (
    Published,
    _Terminated,
    check_no_overlap,
    output_target,
    publish,
    recover_swaps,
    remove_stale_tmp,
    terminate_as_interrupt,
)
from .recipes import (
    DTYPE_NAMES,
    MODES,
    RECIPES,
    Quant,
    Recipe,
    RecipeError,
    check_quantization_record,
    make_recipe,
    module_quantization,
    quantization_record,
)
from .sharding import tensor_array
from .weights import QUANT_SUFFIXES, hf_to_mlx_name, is_vision_tensor

MAX_SHARD_SIZE = 5 << 30  # bytes, as mlx-lm / mlx-vlm (MAX_FILE_SIZE_GB = 5)
CHUNK_BYTES = 64 << 20  # float32 bytes per processed block of rows
SHARD_FORMAT = "model-{:05d}-of-{:05d}.safetensors"
# Files copied next to the weights (the tokenizer, chat template, generation and
# processor configs); config.json and the index are written, never copied.
SIDECAR_PATTERNS = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "LICENSE*")
# Keys of generation_config.json that mlx-vlm copies to the top of config.json.
GENERATION_TOP_LEVEL_KEYS = ("eos_token_id", "temperature", "top_p", "top_k", "do_sample")


_NAME_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP during a conversion; the partial output has been removed
    (or, for one that came during the final swap, the new output is in place: the message
    says which). `exit_code` is the shell's for that signal (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def _mx_dtype(st: str):
    import mlx.core as mx

    return {
        "BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U32": mx.uint32,
        "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16, "I32": mx.int32,
        "U64": mx.uint64, "I64": mx.int64, "BOOL": mx.bool_,
    }[st]


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
    from .config import ModelArgs

    try:
        args = ModelArgs.from_dict(config, source=str(path))
        return args, expected_shapes(args)
    except ConfigError as e:  # names the file and the field
        raise ConversionError(str(e)) from e
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise ConversionError(f"{path} has a field of the wrong kind or range ({type(e).__name__}: {e})") from e


# -- planning ----------------------------------------------------------------------------------


@dataclass
class Job:
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
) -> Tuple[List[Job], Dict[str, Tuple[int, int]]]:
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
    jobs: List[Job] = []
    for name in sorted(renamed):
        if name.endswith(QUANT_SUFFIXES):
            base = name.rsplit(".", 1)[0]
            if f"{base}.weight" not in renamed:
                raise ConversionError(f"{name} has no {base}.weight beside it")
            continue
        ref = renamed[name]
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        job = Job(name=name, shape=ref.shape, src=ref)
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


def _check_against_config(jobs: List[Job], expected: Dict[str, Tuple[int, ...]]) -> None:
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


def plan_shards(jobs: Sequence[Job], max_shard_size: int = MAX_SHARD_SIZE) -> List[List[Job]]:
    """Greedy shards of at most `max_shard_size` bytes, in name order, a module's tensors
    kept together; a module larger than the limit gets a shard of its own (mlx-lm's
    make_shards rule, applied to planned sizes instead of live arrays)."""
    shards: List[List[Job]] = []
    size = 0
    for j in jobs:
        if not shards or size + j.out_bytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(j)
        size += j.out_bytes
    return shards


# -- streaming the data ------------------------------------------------------------------------


def _to_bytes(arr) -> memoryview:
    import mlx.core as mx

    if arr.dtype == mx.bfloat16:
        arr = arr.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(arr))).cast("B")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _stream_job(job: Job, files: ShardFiles, fd: int, offsets: Dict[str, int], on_bytes=None) -> None:
    import mlx.core as mx

    cols = job.cols
    rows = job.rows
    if rows == 0 or cols == 0:
        return
    step = max(1, CHUNK_BYTES // (4 * cols))
    raw_copy = job.quant is None and job.src_quant is None and job.out_dtype == job.src.dtype
    out_item = {name: ST_DTYPES[dt][0] * (math.prod(shape) // rows) for name, dt, shape in job.outputs}
    if job.quant is not None and job.src_quant == job.quant and all(
        ref.dtype == dt for (_, dt, _), ref in zip(job.outputs[1:], (job.src_scales, job.src_biases))
    ):
        # Already quantized exactly so: copy the packed weight, scales and biases as they are
        # (dequantize + quantize would be lossy for no reason).
        bits, group, _ = job.quant
        for (name, _, _), ref, width in zip(
            job.outputs,
            (job.src, job.src_scales, job.src_biases),
            (cols * bits // 32, cols // group, cols // group),
        ):
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                data = files.read(ref, r0, r1, width)
                _pwrite_all(fd, memoryview(data).cast("B"), offsets[name] + r0 * out_item[name])
                if on_bytes:
                    on_bytes(data.nbytes)
        return
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if raw_copy:
            data = files.read(job.src, r0, r1, cols)
            _pwrite_all(fd, memoryview(data).cast("B"), offsets[job.name] + r0 * out_item[job.name])
            if on_bytes:
                on_bytes(data.nbytes)
            continue
        if job.src_quant is not None:
            bits, group, mode = job.src_quant
            w = tensor_array(files.read(job.src, r0, r1, cols * bits // 32), job.src.dtype)
            s = tensor_array(files.read(job.src_scales, r0, r1, cols // group), job.src_scales.dtype)
            b = None
            if job.src_biases is not None:
                b = tensor_array(files.read(job.src_biases, r0, r1, cols // group), job.src_biases.dtype)
            x = mx.dequantize(w, s, b, group_size=group, bits=bits, mode=mode)
            nread = w.nbytes + s.nbytes + (b.nbytes if b is not None else 0)
        else:
            x = tensor_array(files.read(job.src, r0, r1, cols), job.src.dtype)
            nread = x.nbytes
        x = x.astype(_mx_dtype(job.out_dtype))
        if job.quant is None:
            parts = [x]
        else:
            bits, group, mode = job.quant
            parts = list(mx.quantize(x, group_size=group, bits=bits, mode=mode))
        mx.eval(parts)
        for (name, _, _), part in zip(job.outputs, parts):
            _pwrite_all(fd, _to_bytes(part), offsets[name] + r0 * out_item[name])
        del parts, x
        if on_bytes:
            on_bytes(nread)
    mx.clear_cache()


# -- config and side files -----------------------------------------------------------------------


def build_config(
    config: Dict[str, Any],
    src: Path,
    recipe: Recipe,
    record: Optional[dict],
) -> Dict[str, Any]:
    """config.json of the output: the source's, with the full-attention dims spelled out
    (mlx-vlm reads `global_head_dim`/`num_global_key_value_heads`, not transformers'
    `per_layer_config`), generation_config.json merged in as mlx-vlm does, the old
    quantization record replaced by the new one, keys sorted (mlx-vlm's save_config)."""
    from .config import ModelArgs

    cfg = copy.deepcopy(config)
    cfg.pop("quantization", None)
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("torch_dtype", None)
    args = ModelArgs.from_dict(config)
    tc = cfg["text_config"]
    tc.setdefault("global_head_dim", args.global_head_dim)
    tc.setdefault("num_global_key_value_heads", args.num_global_key_value_heads)
    tc.setdefault("layer_types", list(args.layer_types))
    if recipe.dtype:
        cfg["dtype"] = recipe.dtype
        if "dtype" in tc:
            tc["dtype"] = recipe.dtype
    gen_path = src / "generation_config.json"
    if gen_path.is_file():
        try:
            gen = read_json(gen_path)
        except ConversionError:  # copied as it is; check_sidecars warns about it
            gen = None
        if gen:
            cfg["generation_config"] = gen
            for k in GENERATION_TOP_LEVEL_KEYS:
                if k in gen:
                    cfg[k] = gen[k]
    if record is not None:
        cfg["quantization"] = record
        cfg["quantization_config"] = copy.deepcopy(record)
    return dict(sorted(cfg.items()))


def copy_sidecars(src: Path, dst: Path) -> List[str]:
    copied = []
    for pattern in SIDECAR_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.name in ("config.json", INDEX_FILE) or not f.is_file():
                continue
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


# -- convert ---------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n}"  # pragma: no cover


def _progress(enabled: bool, console):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
        console=console,
        disable=not enabled,
        transient=False,
    )


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
    new_config = build_config(config, src, r, record)
    shards = plan_shards(jobs, max_shard_size)
    total_out = sum(j.out_bytes for j in jobs)
    total_in = sum(j.src_bytes for j in jobs)

    tmp = target.tmp
    with _partial_output(tmp, out, total_out):
        _check_disk(tmp.parent, total_out)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        say(f"Converting [bold]{src}[/bold] -> [bold]{out}[/bold]: {r.describe()}")
        names = [SHARD_FORMAT.format(i + 1, len(shards)) for i in range(len(shards))]
        _write_shards(tmp, names, shards, total_in, progress, console)
        index = {"metadata": {"total_size": total_out}, "weight_map": _weight_map(names, shards)}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=4))
        copied = copy_sidecars(src, tmp)
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


def _check_disk(where: Path, need: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < need + (64 << 20):
        raise ConversionError(
            f"not enough disk space in {where}: the output needs {human_bytes(need)}, "
            f"{human_bytes(free)} free"
        )


@contextlib.contextmanager
def _partial_output(tmp: Path, out: Path, total_out: int):
    """Whatever breaks the block (an error, Ctrl-C, SIGTERM/SIGHUP, a full disk) removes
    the partial output `tmp` and becomes one ConversionError (or ConversionInterrupted)
    saying why."""
    signals = contextlib.ExitStack()
    signals.enter_context(terminate_as_interrupt())
    try:
        yield
    except Published as e:  # the signal waited for the swap: the conversion is done
        how = "interrupted" if e.signum == signal.SIGINT else f"terminated by {e.args[0]}"
        was = "; the previous output was removed" if e.replaced else ""
        raise ConversionInterrupted(
            f"conversion {how} as it finished: {out} holds the new output{was}", signum=e.signum) from e
    except KeyboardInterrupt as e:
        shutil.rmtree(tmp, ignore_errors=True)
        how = f"terminated by {e.args[0]}" if isinstance(e, _Terminated) else "interrupted"
        raise ConversionInterrupted(
            f"conversion {how}; removed the partial output {tmp.name}, {out} untouched",
            signum=getattr(e, "signum", signal.SIGINT),
        ) from e
    except ConversionError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise ConversionError(
                f"disk full while writing {out} (the output needs {human_bytes(total_out)}); removed the "
                "partial output, free some space and run again"
            ) from e
        raise ConversionError(f"conversion failed writing {out}: {e}; removed the partial output") from e
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(
            f"conversion failed ({type(e).__name__}: {e}); removed the partial output"
        ) from e
    finally:
        signals.close()


def _write_shards(tmp: Path, names: List[str], shards: List[List[Job]], total_in: int,
                  progress: bool, console) -> None:
    """Every shard: its header first, then each job streamed into its slots."""
    files = ShardFiles()
    n_jobs = sum(len(shard) for shard in shards)
    done = 0
    try:
        with _progress(progress, console) as bar:
            task = bar.add_task("converting", total=total_in, tensor="")
            for fname, shard in zip(names, shards):
                # natural alignment: 8-, 4-, 2-, 1-byte dtypes in that order
                entries = sorted(
                    (o for j in shard for o in j.outputs),
                    key=lambda e: (-ST_DTYPES[e[1]][0], e[0]),
                )
                head, offsets, data_len = header_bytes(entries)
                fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
                try:
                    _pwrite_all(fd, memoryview(head), 0)
                    if hasattr(os, "posix_fallocate") and data_len:
                        os.posix_fallocate(fd, 0, len(head) + data_len)  # disk full fails here
                    else:
                        os.ftruncate(fd, len(head) + data_len)
                    base = {name: len(head) + off for name, off in offsets.items()}
                    for j in shard:
                        done += 1
                        bar.update(task, description=f"tensor {done}/{n_jobs}", tensor=j.name)
                        _stream_job(j, files, fd, base, on_bytes=lambda n: bar.advance(task, n))
                    os.fsync(fd)
                finally:
                    os.close(fd)
    finally:
        files.close()


def _weight_map(names: List[str], shards: List[List[Job]]) -> Dict[str, str]:
    return dict(sorted((name, fname) for fname, shard in zip(names, shards)
                       for j in shard for name, _, _ in j.outputs))


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
    t.add_row("parameters", f"{_count(s['params'])} ({', '.join(f'{k}: {_count(v)}' for k, v in s['params_by_format'].items())})")
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

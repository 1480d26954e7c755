"""Writing a planned conversion: shard headers first, then every tensor streamed into its
slot, the config and side files beside them, inside a partial output that any failure
removes.

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
"""

from __future__ import annotations

import contextlib
import copy
import errno
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..models.checkpoint import INDEX_FILE, ST_DTYPES, ConversionError, ShardFiles, header_bytes
from ..models.config import read_json_object
from ..models.recipes import Recipe
from ..models.sharding import tensor_array
from .plan import TensorJob
from .publish import Published, _Terminated, terminate_as_interrupt

CHUNK_BYTES = 64 << 20  # float32 bytes per processed block of rows
# Files copied next to the weights (the tokenizer, chat template, generation and
# processor configs); config.json and the index are written, never copied.
SIDECAR_PATTERNS = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "LICENSE*")
# Keys of generation_config.json that mlx-vlm copies to the top of config.json.
GENERATION_TOP_LEVEL_KEYS = ("eos_token_id", "temperature", "top_p", "top_k", "do_sample")


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



def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n}"  # pragma: no cover


def progress_bar(enabled: bool, console):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

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


def _stream_job(job: TensorJob, files: ShardFiles, fd: int, offsets: Dict[str, int], on_bytes=None) -> None:
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
    from ..models.config import ModelArgs

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
            gen = read_json_object(gen_path, "an object", ConversionError)
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



def check_disk(where: Path, need: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < need + (64 << 20):
        raise ConversionError(
            f"not enough disk space in {where}: the output needs {human_bytes(need)}, "
            f"{human_bytes(free)} free"
        )


@contextlib.contextmanager
def partial_output(tmp: Path, out: Path, total_out: int):
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


def write_shards(tmp: Path, names: List[str], shards: List[List[TensorJob]], total_in: int,
                  progress: bool, console) -> None:
    """Every shard: its header first, then each job streamed into its slots."""
    files = ShardFiles()
    n_jobs = sum(len(shard) for shard in shards)
    done = 0
    try:
        with progress_bar(progress, console) as bar:
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


def weight_map(names: List[str], shards: List[List[TensorJob]]) -> Dict[str, str]:
    return dict(sorted((name, fname) for fname, shard in zip(names, shards)
                       for j in shard for name, _, _ in j.outputs))


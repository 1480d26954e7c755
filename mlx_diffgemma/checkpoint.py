"""The files of a model directory, read and checked the same way by the converter,
`verify`, the MLX loader and the torch path: safetensors headers (held to the reference
library's rules), the shard index and the scan of every shard, the header of a shard
written slot by slot, and the tokenizer files and chat templates. Imports no array
framework.

Tensor data is read by hand (`TensorRef`: a file and an offset) rather than through
`mx.load`: the converter streams each tensor a block of rows at a time, while a lazily
loaded MLX array is read whole when first evaluated, which would put a 1.5 GB embedding in
memory at once. Likewise the converter writes each shard's header first and then fills
the tensors' slots (`header_bytes`); `mx.save_safetensors` needs every array of a shard
alive at once (up to 5 GiB).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .config import ConfigError, read_json_object

INDEX_FILE = "model.safetensors.index.json"


class ConversionError(RuntimeError):
    """A checkpoint that cannot be read or converted; the message says why and what to do."""


# -- safetensors, read and written by hand ------------------------------------------------

# safetensors dtype -> (itemsize, numpy dtype used to carry the raw bits)
ST_DTYPES: Dict[str, Tuple[int, Any]] = {
    "BF16": (2, np.uint16),
    "F16": (2, np.float16),
    "F32": (4, np.float32),
    "F64": (8, np.float64),
    "U8": (1, np.uint8),
    "I8": (1, np.int8),
    "U16": (2, np.uint16),
    "I16": (2, np.int16),
    "U32": (4, np.uint32),
    "I32": (4, np.int32),
    "U64": (8, np.uint64),
    "I64": (8, np.int64),
    "BOOL": (1, np.bool_),
}
FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class TensorRef:
    """One tensor inside a safetensors file: where its bytes are."""

    file: Path
    key: str
    dtype: str
    shape: Tuple[int, ...]
    begin: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPES[self.dtype][0]


class ShardFiles:
    """Read-only file descriptors of safetensors shards, opened once: a tensor's rows are
    read straight from the file (the converter streams tensors in blocks of rows; a rank
    of a split model reads only its rows)."""

    def __init__(self):
        self.fds: Dict[Path, int] = {}

    def read(self, ref: TensorRef, row0: int, row1: int, row_items: int) -> np.ndarray:
        """Rows [row0, row1) of `ref` seen as [rows, row_items] (raw bits for BF16)."""
        item, npdt = ST_DTYPES[ref.dtype]
        fd = self.fds.get(ref.file)
        if fd is None:
            fd = self.fds[ref.file] = os.open(ref.file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        n = (row1 - row0) * row_items * item
        off = ref.begin + row0 * row_items * item
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            chunk = os.pread(fd, n - got, off + got) if hasattr(os, "pread") else None
            if chunk is None:  # pragma: no cover - Windows
                os.lseek(fd, off + got, os.SEEK_SET)
                chunk = os.read(fd, n - got)
            if not chunk:
                raise ConversionError(f"{ref.file} ended early while reading {ref.key}: truncated file")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        return np.frombuffer(buf, dtype=npdt).reshape(row1 - row0, row_items)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


# The reference safetensors library's limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _parse_entry(path: Path, key: str, info: Any) -> Tuple[str, Tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field type-checked."""

    def is_count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict):
        raise ConversionError(f"{path}: malformed header entry for {key!r} (not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ST_DTYPES:
        raise ConversionError(f"{path}: tensor {key} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise ConversionError(f"{path}: tensor {key} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
        raise ConversionError(f"{path}: tensor {key} has malformed data_offsets {offsets!r}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_header(path: Union[str, Path]) -> Tuple[Dict[str, TensorRef], Dict[str, str]]:
    """Parses a safetensors header and checks it as the reference `safetensors` library
    does: the tensors' byte ranges are contiguous, do not overlap, and cover the data
    buffer exactly, so no two tensors alias the same bytes and the file holds every byte
    it promises. Only the header is read.

    Raises ConversionError naming the file when it is truncated, corrupt or not a
    safetensors file at all."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(
                    f"{path} is truncated ({size} bytes, not even a safetensors header): "
                    "download it again"
                )
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ConversionError(
                    f"{path} is corrupt or truncated: its header claims {n} bytes but the file "
                    f"has {size} (the limit is {MAX_HEADER_BYTES}); download it again"
                )
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except RecursionError:  # hostile nesting: json recurses once per bracket
        raise ConversionError(
            f"{path} is not a valid safetensors file (its header nests too deeply); download it again"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(
            f"{path} is not a valid safetensors file (unreadable header: {e}); download it again"
        ) from e
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ConversionError(f"{path}: __metadata__ is not a JSON object; download it again")
    data_start = 8 + n
    data_len = size - data_start
    tensors: Dict[str, TensorRef] = {}
    ranges = []
    for key, info in header.items():
        dtype, shape, b, e = _parse_entry(path, key, info)
        want = math.prod(shape) * ST_DTYPES[dtype][0]
        if e - b != want:
            raise ConversionError(
                f"{path} is corrupt: tensor {key} {dtype}{list(shape)} needs {want} bytes, "
                f"header gives {e - b}"
            )
        ranges.append((b, e, key))
        tensors[key] = TensorRef(path, key, dtype, shape, data_start + b)
    # Sorted by offset, each tensor must start where the previous one ended.
    end = 0
    for b, e, key in sorted(ranges):
        if b != end:
            what = "overlaps the previous tensor" if b < end else f"leaves a gap of {b - end} bytes"
            raise ConversionError(
                f"{path} is corrupt: tensor {key} at bytes {b}..{e} {what} (safetensors "
                "requires contiguous, non-overlapping tensors); download or convert it again"
            )
        end = e
    if end > data_len:
        raise ConversionError(
            f"{path} is truncated: its header describes {end + data_start} bytes but the "
            f"file has {size} (a corrupt or truncated download?); download it again"
        )
    if end < data_len:
        raise ConversionError(
            f"{path} is corrupt: {data_len - end} bytes after the last tensor are not "
            "described by its header; download or convert it again"
        )
    return tensors, meta


def header_bytes(entries: Sequence[Tuple[str, str, Tuple[int, ...]]], metadata=None):
    """safetensors header for `entries` (name, dtype, shape) laid out in that order;
    returns (header bytes incl. the length prefix, {name: data offset})."""
    header: Dict[str, Any] = {"__metadata__": metadata or {"format": "mlx"}}
    offsets = {}
    off = 0
    for name, dt, shape in entries:
        n = math.prod(shape) * ST_DTYPES[dt][0]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        offsets[name] = off
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets, off


def read_json(path: Path, what: str = "an object") -> Dict[str, Any]:
    """A JSON object from `path`; ConversionError naming the file when it is unreadable,
    not JSON, or not an object."""
    try:
        return read_json_object(path, what)
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def read_index(path: Path) -> Dict[str, str]:
    """The `weight_map` of a model.safetensors.index.json: tensor name -> shard file name,
    every shard a plain file name in the same directory."""
    weight_map = read_json(path, "a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(
            f"{path}: field weight_map must map tensor names to shard files (found "
            f"{type(weight_map).__name__}); download it again"
        )
    for k, f in weight_map.items():
        if not isinstance(f, str) or not f or f != Path(f).name or f in (".", ".."):
            raise ConversionError(
                f"{path}: field weight_map[{k!r}] must be a shard file name in the same "
                f"directory (found {f!r}); download it again"
            )
    return weight_map


def scan_checkpoint(src: Path, problems: Optional[List[str]] = None) -> Dict[str, TensorRef]:
    """Every tensor of the checkpoint in `src`, from its index (every shard it names must
    exist and hold the keys it lists) or, without an index, from its *.safetensors.

    Raises ConversionError at the first problem, or, given a `problems` list, appends
    each problem to it and returns what could be read (what `verify` reports)."""

    def problem(msg: str) -> None:
        if problems is None:
            raise ConversionError(msg)
        problems.append(msg)

    index_path = src / INDEX_FILE
    weight_map: Optional[Dict[str, str]] = None
    if index_path.exists():
        weight_map = read_index(index_path)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            problem(
                f"missing shard {', '.join(missing)} in {src}: {INDEX_FILE} lists {len(files)} "
                "shard file(s); the download is incomplete, fetch the missing file(s) again"
            )
        files = [f for f in files if f not in missing]
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            problem(f"no {INDEX_FILE} and no .safetensors files in {src}")
    tensors: Dict[str, TensorRef] = {}
    for f in files:
        try:
            found, _ = read_header(src / f)
        except ConversionError as e:
            problem(str(e))
            continue
        for k, ref in found.items():
            if k in tensors:
                problem(f"tensor {k} appears in both {tensors[k].file.name} and {f}")
            tensors[k] = ref
    if weight_map is not None:
        unlisted = [k for k, ref in tensors.items() if weight_map.get(k) != ref.file.name]
        if unlisted:
            problem(
                f"{INDEX_FILE} in {src} does not list {len(unlisted)} tensor(s) where its shards "
                f"hold them (e.g. {unlisted[0]} in {tensors[unlisted[0]].file.name}); the files "
                "do not belong together"
            )
        absent = [
            k for k, f in weight_map.items()
            if f in files and (k not in tensors or tensors[k].file.name != f)
        ]
        if absent:
            problem(
                f"{INDEX_FILE} in {src} lists {len(absent)} tensor(s) its shards do not hold "
                f"(e.g. {absent[0]} in {weight_map[absent[0]]}); the files do not belong together"
            )
    return tensors




class WeightsError(ValueError):
    """A checkpoint whose tensors do not match the model its config describes, or whose
    weight files are missing or damaged."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors that wrap another."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def check_tokenizer_files(model_path: Path) -> None:
    """The tokenizer's JSON files and chat templates parse, else a ConfigError naming the
    file (transformers would fail later with a bare JSONDecodeError or TemplateSyntaxError)."""
    for name in TOKENIZER_JSON_FILES:
        if (model_path / name).exists():
            data = read_json_object(model_path / name)
            if name == "tokenizer_config.json" and data.get("chat_template") is not None:
                _check_chat_template(data["chat_template"], f"{model_path / name}: chat_template")
    template = model_path / CHAT_TEMPLATE_FILE
    if template.exists():
        try:
            text = template.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{template} is not UTF-8 text ({e.reason}); fix or remove it") from None
        _check_chat_template(text, str(template))


def _check_chat_template(template: Any, where: str) -> None:
    """A chat template (a string, or transformers' list of {name, template}) compiles."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("template"), str) for t in template
    ):
        sources = [t["template"] for t in template]
    elif isinstance(template, str):
        sources = [template]
    else:
        raise ConfigError(f"{where} must be a string or a list of {{name, template}} objects")
    for source in sources:
        try:
            _compile_jinja_template(source)
        except TemplateError as e:
            line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
            raise ConfigError(f"{where} is not a valid Jinja template ({e}{line}); fix it") from None

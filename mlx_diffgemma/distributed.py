"""The ranks of one split model (`mx.distributed`, started by `mlx.launch`): finding the
group, small messages between ranks, the checks that keep them in step, and the
watchdog that turns a missing peer into one clear line.

Every rank runs the same denoising loop with the same noise, so they sample the same
tokens; `CheckedDenoiser` verifies it at every step (the ranks' decisions are gathered
and compared), because ranks that drift apart would go on issuing collectives that no
longer pair up. Messages and checks run on the CPU stream (`stream=mx.cpu`): a rank
waiting for the next request must not hold a GPU command buffer open.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

PEER_TIMEOUT_ENV = "MLX_DIFFGEMMA_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 120.0  # seconds a rank waits on its peers inside one operation


class RankError(ValueError):
    """The ranks of a split model cannot go on together (they disagree, or loaded
    different models); every rank raises it at the same point."""


def launched_group():
    """The group mlx.launch (or mpirun) started this process in, when it has more than
    one rank; None in a plain process."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


# The chat backend wrapper of rank 0 of a command-line run (mirror.py sets it), through
# which `backends.make_backend` leads the other ranks; None elsewhere.
lead = {"backend": None}


def leading(backend):
    """`backend` (an MLXBackend of a split model) as rank 0 of a command-line run uses
    it; as it is in a program whose every rank makes the same calls itself."""
    wrap = lead["backend"]
    return backend if wrap is None else wrap(backend)


def peer_timeout() -> float:
    value = os.environ.get(PEER_TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_PEER_TIMEOUT
    except ValueError:
        raise ValueError(f"{PEER_TIMEOUT_ENV}={value!r} is not a number of seconds") from None


# -- messages (rank 0 to all) --------------------------------------------------------------


def _all_sum(a: mx.array, group) -> mx.array:
    return mx.distributed.all_sum(a, group=group, stream=mx.cpu)


def broadcast_bytes(data: Optional[bytes], group) -> bytes:
    """Rank 0's `data` on every rank (the others pass None): its length, then its bytes,
    each an all_sum to which the other ranks add zeros."""
    root = group.rank() == 0
    n = int(_all_sum(mx.array([len(data) if root else 0], dtype=mx.int32), group).item())
    if n == 0:
        return b""
    buf = np.frombuffer(data, dtype=np.uint8) if root else np.zeros(n, dtype=np.uint8)
    return bytes(np.asarray(_all_sum(mx.array(buf), group)))


def broadcast_json(obj: Any, group) -> Any:
    data = json.dumps(obj).encode() if group.rank() == 0 else None
    return json.loads(broadcast_bytes(data, group).decode())


def broadcast_int(value: Optional[int], group) -> int:
    v = value if group.rank() == 0 else 0
    return int(_all_sum(mx.array([v], dtype=mx.int32), group).item())


def broadcast_array(a: Optional[np.ndarray], group) -> np.ndarray:
    """Rank 0's NumPy array, bit for bit, on every rank."""
    header = {"dtype": a.dtype.str, "shape": list(a.shape)} if group.rank() == 0 else None
    header = broadcast_json(header, group)
    data = broadcast_bytes(np.ascontiguousarray(a).tobytes() if group.rank() == 0 else None, group)
    return np.frombuffer(data, dtype=np.dtype(header["dtype"])).reshape(header["shape"]).copy()


def shared_seed(group) -> int:
    """A random seed drawn on rank 0 and given to every rank."""
    return broadcast_int(int.from_bytes(os.urandom(4), "little") >> 1, group)


def barrier(group) -> None:
    mx.eval(_all_sum(mx.array([1], dtype=mx.int32), group))


_ALIVE = 0x5EEDCAFE - (1 << 31)  # heads every rank's row: a row without it came from no rank


def agree(group, values: Sequence[int], what: str) -> None:
    """RankError unless every rank passed the same `values` (int32). A rank that left
    shows as a row without the marker (MLX's ring backend may return instead of waiting)."""
    head = [_ALIVE, group.rank()]
    row = mx.array(np.concatenate([head, np.asarray(values, dtype=np.int64)]).astype(np.int32))
    rows = np.array(mx.distributed.all_gather(row, group=group, stream=mx.cpu)).reshape(group.size(), -1)
    gone = [r for r in range(group.size()) if list(rows[r, :2]) != [_ALIVE, r]]
    if gone:
        raise RankError(
            f"rank {', '.join(map(str, gone))} stopped answering at {what}: it left the run or its "
            "connection broke; stop every rank and start again")
    rows = rows[:, 2:]
    differ = [r for r in range(1, group.size()) if not np.array_equal(rows[r], rows[0])]
    if differ:
        who = ", ".join(map(str, differ))
        raise RankError(
            f"the ranks disagree at {what}: rank {who} computed other values than rank 0 "
            "(ranks must run the same model, inputs and noise, on kernels that round alike); "
            "stopping")


def checksum(ids: Sequence[int]) -> int:
    return zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes()) & 0x7FFFFFFF


# -- loading -------------------------------------------------------------------------------

_PROVENANCE_KEYS = ("_name_or_path", "transformers_version")
_SAMPLE = 1 << 16


def model_fingerprint(model_path: Path) -> bytes:
    """16 bytes that differ between model directories that differ: the config (without
    its provenance keys), every shard's safetensors header and size, and 64 KB of its
    data at the start, middle and end. Headers and a few samples only."""
    from .config import load_config

    model_path = Path(model_path)
    h = hashlib.sha256()
    config = {k: v for k, v in load_config(model_path).items() if k not in _PROVENANCE_KEYS}
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in sorted(model_path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(fh.read(min(n, size)))
            for at in (8 + n, max(8 + n, size // 2), max(8 + n, size - _SAMPLE)):
                fh.seek(at)
                h.update(fh.read(_SAMPLE))
    return h.digest()[:16]


# How far loading got: "fingerprint" once this rank exchanged its model fingerprint,
# "loaded" once every rank holds its share (mirror.py's rank 0 reads it to tell the other
# ranks to stop in whatever step they wait).
stage = {"loading": None}


def check_same_model(model_path: Path, group, fingerprint: Optional[bytes] = None) -> None:
    """RankError on every rank unless all ranks are loading the same model directory
    contents. (Rank 0 may pass 16 zero bytes instead: "stop, nothing will be loaded".)"""
    fp = fingerprint if fingerprint is not None else model_fingerprint(model_path)
    # Not under the watchdog: the other ranks may still be starting (or loading).
    mine = mx.array(np.frombuffer(fp, dtype=np.uint8))
    rows = np.array(mx.distributed.all_gather(mine, group=group, stream=mx.cpu)).reshape(group.size(), -1)
    stage["loading"] = "fingerprint"
    if not rows[0].any():
        raise LeaderStopped()
    differ = [r for r in range(1, group.size()) if not np.array_equal(rows[r], rows[0])]
    if differ:
        raise RankError(
            f"the ranks loaded different models: rank {', '.join(map(str, differ))} "
            f"({rows[differ[0]].tobytes().hex()[:12]}) differs from rank 0 "
            f"({rows[0].tobytes().hex()[:12]}) in config.json or weights; give every rank "
            "the same model directory (copy it to each Mac, or convert it the same way)")


class LeaderStopped(Exception):
    """Rank 0 stopped before loading (its command failed): the other ranks exit too."""


# -- the watchdog --------------------------------------------------------------------------


class _Watchdog:
    """Ends this process with one line when an operation that needs the other ranks
    makes no progress for `timeout` seconds: MLX's ring backend waits forever on a
    peer that is gone."""

    def __init__(self):
        self.what: List[str] = []
        self.deadline: Optional[float] = None
        self.timeout = DEFAULT_PEER_TIMEOUT
        self.rank = 0
        self.thread: Optional[threading.Thread] = None
        self.lock = threading.Lock()

    def arm(self, what: str) -> None:
        with self.lock:
            self.timeout = peer_timeout()
            self.what.append(what)
            self.deadline = time.monotonic() + self.timeout
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)
                self.thread.start()

    def disarm(self) -> None:
        with self.lock:
            self.what.pop()
            # Leaving an inner operation is progress: an outer one gets a fresh limit.
            self.deadline = time.monotonic() + self.timeout if self.what else None

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 8))
            with self.lock:
                late = self.deadline is not None and time.monotonic() > self.deadline
                what = self.what[-1] if self.what else ""
            if late:
                sys.stderr.write(
                    f"mlx-diffgemma: error: rank {self.rank}: no answer from the other ranks for "
                    f"{self.timeout:g} s while {what}: a rank dropped out or stalled; stop every "
                    f"rank and start again ({PEER_TIMEOUT_ENV} sets the limit)\n")
                sys.stderr.flush()
                os._exit(1)


_watchdog = _Watchdog()


@contextmanager
def watch(what: str) -> Iterator[None]:
    """Runs the block under the watchdog (`what` names it in the message)."""
    group = mx.distributed.init()
    _watchdog.rank = group.rank()
    _watchdog.arm(what)
    try:
        yield
    finally:
        _watchdog.disarm()


# -- the denoising loop, checked ---------------------------------------------------------


class CheckedDenoiser:
    """A split model's denoiser (reference or fast mode) whose every rank checks, each
    step, that all ranks decided the same: the next canvas, its argmax, the accepted
    positions and the stop. It also checks that they encode the same tokens. A cheap
    collective of a few KB per step; the steps themselves run under the watchdog."""

    def __init__(self, inner, group):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_group", group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def encode(self, token_ids: Sequence[int]) -> None:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        with watch(f"encoding {len(ids)} tokens"):
            agree(self._group, [len(ids), checksum(ids)], "the tokens to encode")
            self._inner.encode(token_ids)

    def step(self, canvas, canvas_index: int, step: int):
        with watch(f"denoising canvas {canvas_index} (step counter {step})"):
            out = self._inner.step(canvas, canvas_index, step)
            nxt, argmax, accepted, stop = out
            values = np.concatenate([np.array(nxt).reshape(-1), np.array(argmax).reshape(-1),
                                     np.array(accepted).reshape(-1).astype(np.int64), [int(stop)]])
            agree(self._group, values, f"canvas {canvas_index}, step counter {step}")
        return out


def checked(denoiser, model):
    """`denoiser` checked across ranks when `model` is split, else as it is."""
    group = getattr(model, "group", None)
    return denoiser if group is None else CheckedDenoiser(denoiser, group)

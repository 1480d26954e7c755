"""Lanes: a forward's tokens split across MLX streams (the CPU backend's cores).

Everything in a layer but attention's mixing is per token, so the tokens of a forward (a
canvas, a prefill chunk) can be cut into contiguous lanes that run on separate streams;
only the keys and values are joined before attention, and the logits after the LM head.
On MLX's CPU backend each stream is a worker thread and the quantized kernels
(`quantized_matmul`, `gather_qmm`: most of a step, BENCHMARKS.md) are single-threaded, so lanes use the
cores those kernels leave idle. Each token's arithmetic is unchanged, so the logits are
bit-identical to one lane (tests/test_model_parity.py holds this). A GPU already runs
each kernel on all its cores: there lanes would only add launches, so they are on by
default for the CPU alone, and one lane is exactly the plain forward.

This module is the only place that knows about lanes; `model.py` calls `run_layer` and
`on_lanes` with one lane or many.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

# Every lane holds at least this many tokens: with fewer, the per-lane overhead outweighs
# the parallel work, and BLAS libraries may switch to small-matrix kernels that sum in
# another order (OpenBLAS did at 16 rows: float32 logits moved in the last bits).
MIN_LANE_TOKENS = 32

Lane = Tuple[int, int, mx.Stream]  # (first token, end, stream)
# Per (device, thread): MLX refuses a stream made on another thread ("There is no
# Stream(cpu, 1) in current thread"), e.g. a server's worker after the main thread.
_lane_streams: Dict[Tuple[str, int], List[mx.Stream]] = {}


def default_lanes() -> int:
    """One lane per usable CPU core on the CPU backend, one elsewhere."""
    if mx.default_device() != mx.cpu:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def make_lanes(tokens: int, n: Optional[int] = None) -> List[Lane]:
    """Up to `n` (default: `default_lanes()`) contiguous (start, stop, stream) spans
    covering `tokens`, each of at least MIN_LANE_TOKENS tokens. The first lane runs on the
    default stream; the others on streams of the default device made once per thread and
    reused (MLX streams live as long as the process)."""
    n = default_lanes() if n is None else n
    n = max(1, min(n, tokens // MIN_LANE_TOKENS))
    device = mx.default_device()
    streams = _lane_streams.setdefault((str(device), threading.get_ident()), [])
    while len(streams) < n - 1:
        streams.append(mx.new_stream(device))
    all_streams = [mx.default_stream(device)] + streams[: n - 1]
    bounds = [tokens * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1], all_streams[i]) for i in range(n)]


def split_lanes(x: Optional[mx.array], lanes: Sequence[Lane]) -> List[Optional[mx.array]]:
    """x [batch, tokens, ...] cut into the lanes' token spans."""
    if x is None or len(lanes) == 1:
        return [x] * len(lanes)
    return [x[:, a:b] for a, b, _ in lanes]


def join_lanes(xs: Sequence[mx.array], axis: int = 1) -> mx.array:
    return xs[0] if len(xs) == 1 else mx.concatenate(list(xs), axis=axis)


def on_lanes(lanes: Sequence[Lane], fn: Callable, *per_lane: Sequence) -> List:
    """fn(lane's items of `per_lane`...) built on each lane's stream."""
    if len(lanes) == 1:
        return [fn(*(a[0] for a in per_lane))]
    out = []
    for i, (_, _, stream) in enumerate(lanes):
        with mx.stream(stream):
            out.append(fn(*(a[i] for a in per_lane)))
    return out


def attention_inputs(
    layer,
    hs: List[mx.array],
    lanes: Sequence[Lane],
    *,
    offset: Union[int, mx.array],
    cache=None,
    encode: bool = False,
    context: Optional[Tuple[mx.array, mx.array]] = None,
) -> Tuple[List[mx.array], mx.array, mx.array]:
    """Each lane's queries, and the keys and values all lanes attend to: the lanes' own,
    joined (and, encoding, appended to the cache) after the cached context."""
    attn = layer.self_attn
    qkv = on_lanes(
        lanes,
        lambda h, lane: attn.project(layer.input_layernorm(h), offset + lane[0]),
        hs,
        lanes,
    )
    k = join_lanes([t[1] for t in qkv], axis=2)
    v = join_lanes([t[2] for t in qkv], axis=2)
    k, v = attn.keys_values(k, v, cache=cache, encode=encode, context=context)
    return [t[0] for t in qkv], k, v


def run_layer(
    layer,
    hs: List[mx.array],
    lanes: Sequence[Lane],
    *,
    offset: Union[int, mx.array],
    layer_scalar: mx.array,
    cache=None,
    encode: bool = False,
    masks: Optional[Sequence[Any]] = None,
    context: Optional[Tuple[mx.array, mx.array]] = None,
) -> List[mx.array]:
    """One layer (`model.DecoderLayer`) over the lanes' hidden states `hs`."""
    masks = masks or [None] * len(lanes)
    if len(lanes) == 1:
        return [layer(hs[0], offset=offset, layer_scalar=layer_scalar, cache=cache,
                      encode=encode, mask=masks[0], context=context)]
    qs, k, v = attention_inputs(layer, hs, lanes, offset=offset, cache=cache, encode=encode,
                                context=context)
    return on_lanes(lanes, lambda h, q, m: layer.finish(h, q, k, v, m, layer_scalar), hs, qs, masks)


def lane_masks(mask: Any, L: int, keys: int, lanes: Sequence[Lane]) -> List[Any]:
    """Each lane's rows of an encoder mask over `keys` keys, the last L of them new.
    "causal" (aligned to the last key) becomes an explicit mask once rows are split."""
    if len(lanes) == 1 or mask is None:
        return [mask] * len(lanes)
    if isinstance(mask, str):
        k = mx.arange(keys)[None]
        return [k <= mx.arange(a + keys - L, b + keys - L)[:, None] for a, b, _ in lanes]
    return [mask[a:b] for a, b, _ in lanes]

"""One model split over the ranks of an `mx.distributed` group (`Model.shard`, and
`load(..., group=)` through `local_weights`).

What each of N ranks holds:
- attention: 1/N of the query heads, the key/value heads those queries read, and the
  matching input columns of `o_proj`. A layer with fewer KV heads than ranks (the full
  layers: 2 KV heads) gives each rank the one KV head its queries share, so that head
  is replicated on the ranks of its group. The encoder cache then holds this rank's
  heads only.
- dense MLP: 1/N of the intermediate dimension (gate/up rows, down_proj columns), cut
  at quantization-group boundaries (the released 2112 = 33 groups of 64 does not split
  evenly in two: one rank takes 17 groups, the other 16).
- routed experts: E/N whole experts; the router runs on every rank. MLX has no
  all-to-all, so each rank computes its own experts' share of every token and the
  shares are summed (`owned_experts`).
- embedding (and the tied LM head), norms, router, self-conditioning MLP, vision tower:
  replicated. The self-conditioning product (softmax over the vocabulary times the
  embedding table, as large as the LM head) is split by vocabulary rows at run time
  over the replicated table; the LM head is not: its output would have to be gathered
  ([canvas x vocab] per step, 134 MB in bf16 at the released shapes) to save what the
  split saves (BENCHMARKS.md, "Several Macs").

Partial outputs are summed with `all_sum`: attention's and the feed-forward's (dense
and routed together, one collective) per layer, and self-conditioning's per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


class ShardingError(ValueError):
    """The model cannot be split over this many ranks (the message says why and which
    rank counts work)."""


@dataclass(frozen=True)
class Span:
    """What a rank keeps of one module: `rows` (output features), `cols` (input
    features) or `experts`, as [start, stop) in logical (unquantized) units."""

    kind: str
    start: int
    stop: int


def even_span(total: int, n: int, rank: int, unit: int = 1) -> Tuple[int, int]:
    """[start, stop) of `rank`'s share of `total`, cut at multiples of `unit`, the n
    shares differing by at most one unit."""
    units = total // unit
    stop = total if rank == n - 1 else units * (rank + 1) // n * unit
    return units * rank // n * unit, stop


def _kv_splits(kv: int, n: int) -> bool:
    return kv % n == 0 or n % kv == 0


def _problems(args, n: int) -> List[str]:
    out = []
    h = args.num_attention_heads
    if h % n:
        out.append(f"{h} attention heads")
    kvs = sorted({args.kv_heads_of(i) for i in range(args.num_hidden_layers)})
    bad_kv = [kv for kv in kvs if not _kv_splits(kv, n)]
    if bad_kv:
        out.append(f"{' and '.join(map(str, bad_kv))} key-value heads")
    if args.num_experts % n:
        out.append(f"{args.num_experts} experts")
    return out


def valid_rank_counts(args, upto: int = 16) -> List[int]:
    return [n for n in range(1, upto + 1) if not _problems(args, n)]


def check_rank_count(args, n: int) -> None:
    """ShardingError unless `n` ranks split the heads, KV heads and experts evenly."""
    problems = _problems(args, n)
    if problems:
        ok = [c for c in valid_rank_counts(args) if c > 1]
        fix = (f"launch {', '.join(map(str, ok[:-1]))}{' or ' if len(ok) > 1 else ''}{ok[-1]} ranks "
               "instead" if ok else "run it in one process")
        raise ShardingError(
            f"cannot split this model over {n} ranks: its {', '.join(problems)} do not divide "
            f"evenly (key-value heads must divide the rank count or be divided by it); {fix}")


def head_spans(args, layer: int, rank: int, n: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(query heads, key/value heads) rank `rank` of `n` holds in `layer`."""
    h, kv = args.num_attention_heads, args.kv_heads_of(layer)
    q = even_span(h, n, rank)
    if kv % n == 0:
        return q, even_span(kv, n, rank)
    first = rank * kv // n  # fewer KV heads than ranks: the one these queries read
    return q, (first, first + 1)


def _group_size(module: nn.Module) -> int:
    return int(getattr(module, "group_size", 1)) if hasattr(module, "scales") else 1


def plan(model, rank: int, n: int) -> Dict[str, Span]:
    """module path -> what rank `rank` of `n` keeps of it (replicated modules absent)."""
    return plan_spans(model.args, rank, n, lambda path: _group_size(_module(model, path)))


def plan_spans(args, rank: int, n: int, group_of: Callable[[str], int]) -> Dict[str, Span]:
    """`plan` from the config alone; `group_of(module path)`: the quantization group
    size of that module (1 when it is not quantized), which column cuts must respect."""
    check_rank_count(args, n)
    out: Dict[str, Span] = {}
    e0, e1 = even_span(args.num_experts, n, rank)
    for i, kind in enumerate(args.layer_types):
        p = f"model.decoder.layers.{i}"
        hd = args.head_dim_of(i)
        (h0, h1), (k0, k1) = head_spans(args, i, rank, n)
        out[f"{p}.self_attn.q_proj"] = Span("rows", h0 * hd, h1 * hd)
        out[f"{p}.self_attn.k_proj"] = Span("rows", k0 * hd, k1 * hd)
        if kind == "sliding_attention":  # full layers have no v_proj
            out[f"{p}.self_attn.v_proj"] = Span("rows", k0 * hd, k1 * hd)
        g = group_of(f"{p}.self_attn.o_proj")
        if (h0 * hd) % g or (h1 * hd) % g:
            raise ShardingError(
                f"cannot split layer {i}'s attention over {n} ranks: each rank's "
                f"{(h1 - h0) * hd} o_proj input columns are not whole quantization groups of "
                f"{g}; launch fewer ranks or use a checkpoint quantized with smaller groups")
        out[f"{p}.self_attn.o_proj"] = Span("cols", h0 * hd, h1 * hd)
        g = group_of(f"{p}.mlp.down_proj")
        if args.intermediate_size // g < n:
            raise ShardingError(
                f"cannot split the dense MLP's {args.intermediate_size // g} quantization "
                f"groups over {n} ranks; launch fewer ranks")
        i0, i1 = even_span(args.intermediate_size, n, rank, g)
        out[f"{p}.mlp.gate_proj"] = Span("rows", i0, i1)
        out[f"{p}.mlp.up_proj"] = Span("rows", i0, i1)
        out[f"{p}.mlp.down_proj"] = Span("cols", i0, i1)
        out[f"{p}.experts.gate_up_proj"] = Span("experts", e0, e1)
        out[f"{p}.experts.down_proj"] = Span("experts", e0, e1)
    return out


def param_slice(span: Span, name: str, module: nn.Module) -> Tuple[int, int, int]:
    """(axis, start, stop) of parameter `name` (weight, scales, biases) of `module` that
    `span` keeps: the output axis for rows and experts; for columns the input axis, in
    packed words for a quantized weight and in groups for its scales and biases."""
    if span.kind in ("rows", "experts"):
        return 0, span.start, span.stop
    if name == "bias":
        raise ShardingError("a layer split by its input columns cannot carry a bias")
    if not hasattr(module, "scales"):
        return -1, span.start, span.stop
    if name == "weight":
        return -1, span.start * module.bits // 32, span.stop * module.bits // 32
    return -1, span.start // module.group_size, span.stop // module.group_size


def take(a, axis: int, start: int, stop: int):
    """`a`[start:stop] along `axis` (an mx or NumPy array)."""
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


def _module(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def sliced_names(model, spans: Dict[str, Span]) -> Dict[str, Tuple[int, int, int]]:
    """parameter name -> (axis, start, stop) for every parameter the spans cut."""
    out = {}
    for path, span in spans.items():
        module = _module(model, path)
        for name, value in module.parameters().items():
            if isinstance(value, mx.array):
                out[f"{path}.{name}"] = param_slice(span, name, module)
    return out


def set_sharded(model, group, spans: Dict[str, Span]) -> None:
    """Marks `model` as split over `group` (the parameters are `spans`' slices): each
    layer's local head counts, its group for the partial sums, each rank's first expert
    and its rows of the vocabulary for self-conditioning."""
    args, n, rank = model.args, group.size(), group.rank()
    for i, layer in enumerate(model.layers):
        (h0, h1), (k0, k1) = head_spans(args, i, rank, n)
        layer.self_attn.n_heads = h1 - h0
        layer.self_attn.n_kv_heads = k1 - k0
        layer.group = group
        layer.experts.first = spans[f"model.decoder.layers.{i}.experts.gate_up_proj"].start
    model.group = group
    model.vocab_span = Span("rows", *even_span(args.vocab_size, n, rank))


def shard_model(model, group) -> None:
    """Splits a loaded model in place over `group` (`Model.shard`): every cut parameter
    is replaced by a copy of this rank's slice, so the full arrays can be freed."""
    n = group.size()
    if n == 1:
        return
    spans = plan(model, group.rank(), n)
    cuts = sliced_names(model, spans)
    params = dict(tree_flatten(model.parameters()))
    new = {k: mx.contiguous(take(params[k], *cut)) for k, cut in cuts.items()}
    mx.eval(list(new.values()))
    model.update(tree_unflatten(list(new.items())))
    set_sharded(model, group, spans)


_SPLIT_PARTS = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.",
                ".self_attn.o_proj.", ".mlp.", ".experts.")


def is_split(name: str) -> bool:
    """Whether tensor `name` (our name) is split over the ranks of a split model."""
    return name.startswith("model.decoder.layers.") and any(p in name for p in _SPLIT_PARTS)


def local_shape(shape: Tuple[int, ...], cut: Optional[Tuple[int, int, int]]) -> Tuple[int, ...]:
    if cut is None:
        return tuple(shape)
    axis, start, stop = cut
    out = list(shape)
    out[axis] = stop - start
    return tuple(out)


# -- the routed experts, split by expert --------------------------------------------------


def owned_experts(experts, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
    """This rank's share of the routed experts' output for tokens `x` [.., H] routed to
    `indices` [.., k] with `weights`: only the (token, expert) pairs whose expert this
    rank holds are computed (sorted by expert, one gather_qmm per projection, as the
    whole model does), and every other pair contributes zero, so summing the ranks'
    shares gives the whole model's output.

    How many pairs this rank owns depends on the routing, so it is read on the host
    (one synchronisation per layer) and rounded up to a multiple of 32 rows so that
    kernels see few shapes; the padding rows compute a real expert and are weighted 0.
    Without it every rank would run all k experts of every token (no saving in compute,
    a third of a step at the released shapes)."""
    E = experts.gate_up_proj["weight"].shape[0]
    *lead, k = indices.shape
    H = x.shape[-1]
    local = indices.reshape(-1) - experts.first
    owned = (local >= 0) & (local < E)
    key = mx.where(owned, local, E)
    order = mx.argsort(key)
    n = int(owned.sum().item())
    pairs = local.size
    if n == 0:
        return mx.zeros(x.shape, x.dtype)
    m = min(pairs, -(-n // 32) * 32)
    rows = order[:m]
    idx = mx.minimum(key[rows], E - 1)
    xs = x.reshape(-1, 1, H)[rows // k]
    gate, up = mx.split(experts.gate_up_proj(xs, idx, sorted_indices=True), 2, axis=-1)
    y = experts.down_proj(nn.gelu_approx(gate) * up, idx, sorted_indices=True).squeeze(-2)
    w = mx.where(owned[rows], weights.reshape(-1)[rows], 0.0)
    out = mx.zeros((pairs, y.shape[-1]), y.dtype)
    out[rows] = y * mx.expand_dims(w.astype(y.dtype), -1)
    return out.reshape(*lead, k, y.shape[-1]).sum(axis=-2)


def all_sum_parts(parts: List[mx.array], group) -> List[mx.array]:
    """Each of `parts` (same leading shape) summed over the group, in one collective."""
    sizes = np.cumsum([p.shape[-1] for p in parts])[:-1].tolist()
    total = mx.distributed.all_sum(mx.concatenate(parts, axis=-1), group=group)
    return mx.split(total, sizes, axis=-1)


# -- loading only this rank's slices -------------------------------------------------------


def tensor_array(a: np.ndarray, st_dtype: str) -> mx.array:
    """An MLX array of raw safetensors data read with NumPy (BF16 comes as its bits)."""
    arr = mx.array(a)
    if st_dtype == "BF16":
        arr = arr.view(mx.bfloat16)
    return arr


def local_weights(model, spans: Dict[str, Span], weights: Dict[str, mx.array],
                  refs: Dict[str, Any]) -> Dict[str, mx.array]:
    """This rank's arrays of a checkpoint: `weights` (lazy mx.load arrays, our names; the
    dict is emptied as it is read) as they are where replicated; where a span cuts the
    first axis (experts, heads, the dense MLP's rows: nearly all of a split rank's bytes)
    only those rows are read from the file (`refs`: our name -> checkpoint.TensorRef); a
    column cut (o_proj, the dense down_proj) reads the tensor, keeps a copy of the slice
    and lets the tensor go before the next."""
    from .checkpoint import ShardFiles

    cuts = sliced_names(model, spans)
    files = ShardFiles()
    out: Dict[str, mx.array] = {}
    try:
        for name in list(weights):
            arr = weights.pop(name)
            cut = cuts.get(name)
            if cut is None:
                out[name] = arr
                continue
            axis, start, stop = cut
            ref = refs.get(name)
            if axis == 0 and ref is not None:
                row_items = int(np.prod(ref.shape[1:])) if len(ref.shape) > 1 else 1
                rows = files.read(ref, start, stop, row_items)
                out[name] = tensor_array(rows, ref.dtype).reshape(stop - start, *ref.shape[1:])
            else:
                out[name] = mx.contiguous(take(arr, axis, start, stop))
            del arr
            mx.eval(out[name])  # one tensor at a time: the peak stays one full tensor
    finally:
        files.close()
    return out

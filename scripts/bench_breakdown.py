"""Our denoising step split into its pieces, each timed alone (`scripts/bench.py
--breakdown`). Every piece runs through the model's public pieces (`Model.embed`,
`self_conditioned`, `head`, `DecoderLayer.attention` / `dense` / `moe`, lanes.py) on
the lanes the step runs on, as the step runs it."""

from __future__ import annotations

import statistics
from typing import Any, Callable, Dict

import mlx.core as mx
import numpy as np

from mlx_diffgemma.bench.bench import timed
from mlx_diffgemma.generation.denoiser import MLXDenoiser
from mlx_diffgemma.models.lanes import attention_inputs, join_lanes, on_lanes, run_layer, split_lanes

KINDS = ("sliding_attention", "full_attention")


def _layer_pieces(layer, cache, hs, lanes, offset: int, t: Callable) -> Dict[str, float]:
    """One layer's attention (incl. its norm), dense MLP and router + experts (incl.
    norms), and the whole layer, at the hidden states `hs` (one per lane)."""

    def attention():
        qs, k, v = attention_inputs(layer, hs, lanes, offset=offset, cache=cache)
        return on_lanes(lanes, lambda q: layer.attention(q, k, v, None), qs)

    return {
        "attention": t(attention),
        "dense_mlp": t(lambda: on_lanes(lanes, layer.dense, hs)),
        "experts": t(lambda: on_lanes(lanes, layer.moe, hs)),
        "layer": t(lambda: run_layer(layer, hs, lanes, offset=offset,
                                     layer_scalar=layer.layer_scalar, cache=cache)),
    }


def _layer_totals(per_kind: Dict[str, Dict[str, float]], counts: Dict[str, int]) -> Dict[str, float]:
    def total(name):
        return sum(per_kind[k][name] * counts[k] for k in per_kind)

    pieces = {
        "attention": total("attention"),
        "experts (router + experts)": total("experts"),
        "dense MLP": total("dense_mlp"),
    }
    pieces["layer rest (residuals, norms)"] = max(0.0, total("layer") - sum(pieces.values()))
    return pieces


def breakdown(model, prompt: np.ndarray, gen, iters: int = 3) -> Dict[str, Any]:
    """Per layer kind: attention, dense MLP, router + experts, the rest of the layer;
    then the final norm + LM head (with soft-capping), self-conditioning (softmax of the
    previous logits, the product with the embedding, its MLP), the embedding lookup and
    the sampler (everything after the logits); each timed alone with `mx.eval` barriers
    at the benched shapes, and the whole step for the sum check."""
    den = MLXDenoiser(model, gen)
    den.encode(prompt.reshape(-1).tolist())
    a, cache, N = model.args, den.cache, gen.max_denoising_steps
    C = a.canvas_length
    h = mx.random.normal((1, C, a.hidden_size)).astype(model.dtype)
    canvas = mx.random.randint(0, a.vocab_size, (1, C), dtype=mx.int32)
    logits = model.decode(canvas, cache, None)
    mx.eval(h, logits)

    def t(fn):
        mx.eval(fn())
        return statistics.median(timed(lambda: mx.eval(fn())) for _ in range(iters))

    lanes = model.lanes_for(C)
    hs = split_lanes(h, lanes)

    def per_lane(fn, *xs):
        return lambda: on_lanes(lanes, fn, *[split_lanes(x, lanes) for x in xs])

    counts = {kind: a.layer_types.count(kind) for kind in KINDS}
    per_kind = {
        kind: _layer_pieces(model.layers[i], cache[i], hs, lanes, cache.offset, t)
        for kind in KINDS if counts[kind] for i in [a.layer_types.index(kind)]
    }
    pieces = _layer_totals(per_kind, counts)
    pieces["LM head (norm, matmul, softcap)"] = t(lambda: join_lanes(on_lanes(lanes, model.head, hs)))
    pieces["self-conditioning (softmax, embedding matmul, MLP)"] = t(
        per_lane(model.self_conditioned, h, logits.astype(model.dtype)))
    pieces["embedding lookup"] = t(per_lane(model.embed, canvas))

    def sampler():
        den.start_canvas(0)  # no history, no self-conditioning input
        return den.sample(logits / gen.temperature(N), canvas, 0, N)[0]

    pieces["sampler (temperature, argmax, sample, entropy, accept, renoise, stop)"] = t(sampler)
    # The whole step, self-conditioned from the step before, for the sum check.
    den.step(canvas, 0, N)
    step = statistics.median(timed(lambda: den.step(canvas, 0, N)) for _ in range(iters))
    return {
        "pieces_s": pieces,
        "per_layer_s": per_kind,
        "layer_counts": counts,
        "sum_s": sum(pieces.values()),
        "step_s": step,
    }


def print_breakdown(bd: Dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"per-step breakdown (ours, pieces timed alone); measured step {bd['step_s']:.3f} s")
    t.add_column("piece")
    t.add_column("s / step", justify="right")
    t.add_column("share", justify="right")
    for k, v in bd["pieces_s"].items():
        t.add_row(k, f"{v:.4f}", f"{100 * v / bd['sum_s']:.1f}%")
    t.add_row("sum of pieces", f"{bd['sum_s']:.4f}", "100%")
    console.print(t)

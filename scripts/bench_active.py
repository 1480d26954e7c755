#!/usr/bin/env python
"""Fast mode at the released shapes: the step time by the number of computed canvas
positions, and from it and the toys' measured trajectories the expected fast/reference
ratio at 26B-A4B, beside the FLOP arithmetic.

    python scripts/bench_active.py --sizes 16,32,64,128,256 \
        --toy toy-sudoku-open=benchmarks/cpu-2core/fast-toy-sudoku-open.json \
        --toy toy-sudoku=benchmarks/cpu-2core/fast-toy-sudoku.json --json out.json

The weights are synthetic.py's: random, already-quantized mixed-4, at the released
shapes. Each piece is timed apart, per computed-position count n:
  layers     the decoder layers on n positions, the others' keys and values stale
             (Model.forward_positions, as the active set runs them): a one-layer model of
             each attention kind, weighted by the released pattern (25 sliding, 5 full)
  head       final norm, the [hidden x vocab] LM head and soft-capping on n rows
  top-K      fast mode's selection on those logits (fast.py's functions): exact top-64
             sample, argmax and entropy, and the top-64 probabilities of the softmax
  sparse sc  fast mode's self-conditioning input: top-64 probabilities times gathered
             (dequantized) embedding rows, plus the self-conditioning MLP
and, for the reference at n = 256, the full-vocabulary sampler and the dense
self-conditioning product (softmax over the vocabulary times the embedding table).
The vocabulary-sized pieces run on 1/--vocab-slice of the 262,144 rows and are scaled
back (each is linear in the vocabulary: independent row blocks), which keeps a CPU run
to minutes.

The projection replays each mode's measured work per step (bench_fast.py's JSON: steps,
positions, LM-head rows and self-conditioning rows, scaled from the toy's canvas to 256
positions) on these times, interpolated between the measured sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
from bench_fast import MODES  # noqa: E402

from mlx_diffgemma.bench.synthetic import preset_args, synthetic_model  # noqa: E402
from mlx_diffgemma.generation.fast import sample_top_k, top_k_probabilities  # noqa: E402
from mlx_diffgemma.models.config import read_json_object  # noqa: E402
from mlx_diffgemma.models.model import sparse_soft_embedding  # noqa: E402

TOP_K = 64


def seconds(fn: Callable[[], Any], iters: int) -> float:
    """Median wall seconds of `fn()` (each call evaluates its own outputs)."""
    out = []
    for _ in range(max(iters, 1)):
        tic = time.perf_counter()
        fn()
        out.append(time.perf_counter() - tic)
    return statistics.median(out)


def top_k_pieces(logits: mx.array) -> List[mx.array]:
    """Fast mode's per-step selection (fast.py's own functions): the top-64 sample,
    argmax and entropy, and the top-64 probabilities sparse self-conditioning reads."""
    g = mx.random.gumbel(logits.shape)
    return [*sample_top_k(logits, g, TOP_K), *top_k_probabilities(logits, TOP_K)]


def full_sample(logits: mx.array) -> List[mx.array]:
    """The reference sampler's full-vocabulary work: argmax, the Gumbel-max sample and
    the entropy over every token."""
    g = mx.random.gumbel(logits.shape)
    return list(sample_top_k(logits, g, 0)[:3])


def time_layers(model, sizes: Sequence[int], prompt_tokens: int, iters: int) -> Dict[int, float]:
    """Per n: seconds of the model's layers on n canvas positions, the others' keys and
    values stale (from one full first pass), as the active set runs them."""
    C, V = model.canvas_length, model.vocab_size
    cache = model.make_cache()
    model.encode(mx.random.randint(3, V, (1, prompt_tokens), dtype=mx.int32), cache)
    canvas = mx.random.randint(3, V, (1, C), dtype=mx.int32)
    kv = [None] * len(model.layers)
    mx.eval(model.forward_positions(canvas, mx.arange(C), C, cache, kv, head=False), kv)
    out = {}
    for n in sizes:
        idx = mx.arange(n)
        out[n] = seconds(lambda: mx.eval(model.forward_positions(
            canvas[:, idx], idx, C, cache, list(kv), head=False)), iters)
    return out


def time_vocab_pieces(model, sizes: Sequence[int], iters: int, scale: float) -> Dict[int, Dict[str, float]]:
    """Per n: the LM head, the top-K sampler and sparse self-conditioning on n rows, the
    first two times `scale` (the model holds 1/scale of the vocabulary: both are linear
    in it, row blocks of the head and of the selection being independent)."""
    dec, H = model.model.decoder, model.args.hidden_size
    out = {}
    for n in sizes:
        h = mx.random.normal((1, n, H)).astype(model.dtype)
        logits = model.head(h)
        picked = top_k_pieces(logits)
        emb = model.embed(mx.random.randint(3, model.vocab_size, (1, n), dtype=mx.int32))
        mx.eval(logits, picked, emb)
        out[n] = {
            "head": scale * seconds(lambda: mx.eval(model.head(h)), iters),
            "top_k": scale * seconds(lambda: mx.eval(top_k_pieces(logits)), iters),
            "sparse_sc": seconds(lambda: mx.eval(dec.self_conditioning(
                emb, sparse_soft_embedding(dec.embed_tokens, picked[4], picked[5], model.embed_scale))), iters),
        }
    return out


def time_reference_pieces(model, n: int, iters: int, scale: float) -> Dict[str, float]:
    """The reference's own per-step work on n rows: the full-vocabulary sampler and the
    dense self-conditioning product, times `scale` (linear in the vocabulary)."""
    H = model.args.hidden_size
    logits = model.head(mx.random.normal((1, n, H)).astype(model.dtype))
    emb = model.embed(mx.random.randint(3, model.vocab_size, (1, n), dtype=mx.int32))
    mx.eval(logits, emb)
    return {
        "full_sampler": scale * seconds(lambda: mx.eval(full_sample(logits)), iters),
        "dense_sc": scale * seconds(lambda: mx.eval(model.self_conditioned(emb, logits)), iters),
    }


def time_pieces(config: str, sizes: Sequence[int], prompt_tokens: int, iters: int,
                vocab_slice: int) -> Dict[str, Any]:
    """Every piece at the shapes of preset `config`: the layers on one-layer models of each
    attention kind, weighted by the released pattern's counts (25 sliding, 5 full), and
    the vocabulary-sized pieces on 1/vocab_slice of the vocabulary, scaled back."""
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    full = preset_args(config)
    vocab = full.vocab_size // vocab_slice
    counts = {kind: full.layer_types.count(kind) for kind in dict.fromkeys(full.layer_types)}
    layers = {n: 0.0 for n in sizes}
    model = None
    for kind, count in counts.items():
        model = synthetic_model(preset_args(config, num_hidden_layers=1, layer_types=[kind], vocab_size=vocab),
                                recipe="mixed-4", dtype=dtype, seed=0)
        per = time_layers(model, sizes, prompt_tokens, iters)
        print(f"{kind}: " + " ".join(f"n={n} {t:.3f}s" for n, t in per.items()), flush=True)
        for n in sizes:
            layers[n] += count * per[n]
    scale = full.vocab_size / vocab
    rows = time_vocab_pieces(model, sizes, iters, scale)
    for n in sizes:
        rows[n]["layers"] = layers[n]
        print(f"n={n:4d} " + " ".join(f"{k} {v:.3f}s" for k, v in rows[n].items()), flush=True)
    reference = time_reference_pieces(model, max(sizes), iters, scale)
    print(f"reference at n={max(sizes)}: " + " ".join(f"{k} {v:.3f}s" for k, v in reference.items()), flush=True)
    return {"sizes": rows, "reference_rows": max(sizes), "reference": reference,
            "layers": full.num_hidden_layers, "vocab": full.vocab_size, "vocab_timed": vocab}


def step_seconds(t: Dict[str, Any], n: float, head_rows: float, sc_rows: float,
                 top_k: bool, sparse_sc: bool) -> float:
    """One step's seconds at the released shapes: `n` positions through every layer,
    `head_rows` LM-head rows sampled (top-K or the full vocabulary) and `sc_rows`
    self-conditioned inputs (sparse or dense), interpolated between the measured sizes."""
    sizes = sorted(t["sizes"])

    def at(piece: str, x: float) -> float:
        ys = [t["sizes"][s][piece] for s in sizes]
        if x > sizes[-1]:  # more than a canvas per step (the repair pass): linear beyond
            return ys[-1] * x / sizes[-1]
        return float(np.interp(x, sizes, ys)) if x > 0 else 0.0

    per_ref_row = {k: v / t["reference_rows"] for k, v in t["reference"].items()}
    sample = at("top_k", head_rows) if top_k else per_ref_row["full_sampler"] * head_rows
    sc = at("sparse_sc", sc_rows) if sparse_sc else per_ref_row["dense_sc"] * sc_rows
    return at("layers", n) + at("head", head_rows) + sample + sc


def project(t: Dict[str, Any], toy: str, path: Path) -> List[Dict[str, Any]]:
    """Per mode of bench_fast's JSON at `path`: projected seconds per generated token at
    the released shapes, and the FLOP projection bench_fast wrote, both as x less than
    the reference."""
    from mlx_diffgemma.models.paths import packaged_model

    canvas = read_json_object(Path(packaged_model(toy)) / "config.json", "config")["canvas_length"]
    f = 256 / canvas
    rows = []
    for name, r in json.loads(path.read_text()).items():
        if "work" not in r:
            continue
        w, opts = r["work"], MODES.get(name)
        S = max(w["steps"], 1)
        step = step_seconds(t, w["positions"] * f / S, w["lm_head_rows"] * f / S,
                            w["sc_rows"] * f / S, top_k=bool(opts and opts.top_k),
                            sparse_sc=bool(r.get("sc_k")))
        rows.append({"mode": name, "accuracy": r["accuracy"], "steps_per_canvas": r["steps_per_canvas"],
                     "active": w["positions"] * f / S, "step_s": step,
                     "s_per_token": S * step / max(r["tokens"], 1),
                     "flops_per_token": r["real_work_per_token"]})
    ref = rows[0]
    for row in rows:
        row["x_less_time"] = ref["s_per_token"] / row["s_per_token"]
        row["x_less_flops"] = ref["flops_per_token"] / row["flops_per_token"]
    return rows


def print_tables(t: Dict[str, Any], projections: Dict[str, List[Dict[str, Any]]]) -> None:
    full = max(t["sizes"])
    ref_step = step_seconds(t, full, full, full, top_k=False, sparse_sc=False)
    print(f"\nstep time by computed positions, {t['layers']} layers, vocabulary {t['vocab']} "
          f"(timed on {t['vocab_timed']} rows, scaled); seconds")
    print(f"{'n':>5s} {'layers':>8s} {'head':>7s} {'top-K':>7s} {'sparse sc':>9s} "
          f"{'fast step':>9s} {'per position':>12s} {'ref step / step':>15s}")
    for n, p in sorted(t["sizes"].items()):
        step = step_seconds(t, n, n, n, top_k=True, sparse_sc=True)
        print(f"{n:5d} {p['layers']:8.2f} {p['head']:7.2f} {p['top_k']:7.3f} {p['sparse_sc']:9.3f} "
              f"{step:9.2f} {step / n:12.3f} {ref_step / step:14.2f}x")
    r = t["reference"]
    print(f"reference step at {full}: {ref_step:.2f} s (full-vocabulary sampler {r['full_sampler']:.3f} s, "
          f"dense self-conditioning {r['dense_sc']:.3f} s)")
    for toy, rows in projections.items():
        print(f"\n{toy}: projected at 26B-A4B from the measured trajectories")
        print(f"{'mode':26s} {'acc':>6s} {'steps/cv':>8s} {'active':>7s} {'step s':>7s} {'s/token':>8s} "
              f"{'x less (time)':>13s} {'x less (FLOPs)':>14s}")
        for row in rows:
            print(f"{row['mode']:26s} {row['accuracy']:6.3f} {row['steps_per_canvas']:8.2f} "
                  f"{row['active']:7.1f} {row['step_s']:7.2f} {row['s_per_token']:8.3f} "
                  f"{row['x_less_time']:13.2f} {row['x_less_flops']:14.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="real", help="synthetic preset (default: the released shapes)")
    p.add_argument("--sizes", default="16,32,64,128,256")
    p.add_argument("--vocab-slice", type=int, default=8,
                   help="time the vocabulary-sized pieces on 1/N of the vocabulary (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--iters", type=int, default=1, help="timed repetitions per piece (median)")
    p.add_argument("--toy", action="append", default=[], metavar="NAME=JSON",
                   help="a packaged toy and bench_fast.py's JSON of it (repeatable)")
    p.add_argument("--times", default=None, metavar="JSON",
                   help="reuse the step times of an earlier run's --json (only re-project)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.times:
        times = json.loads(Path(a.times).read_text())["times"]
        times["sizes"] = {int(n): v for n, v in times["sizes"].items()}
    else:
        canvas = preset_args(a.config).canvas_length
        sizes = sorted({min(int(s), canvas) for s in a.sizes.split(",")})
        print(f"{a.config} shapes on {mx.default_device()}", flush=True)
        times = time_pieces(a.config, sizes, a.prompt_tokens, a.iters, a.vocab_slice)
    projections = {}
    for spec in a.toy:
        toy, path = spec.split("=", 1)
        projections[toy] = project(times, toy, Path(path))
    print_tables(times, projections)
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "device": str(mx.default_device()),
                                            "times": times, "projections": projections}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

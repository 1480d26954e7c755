#!/usr/bin/env python
"""Each speed/memory change of BENCHMARKS.md measured alone: the runtime with and without
it, steps timed interleaved (A, B, A, B, ...), median per variant, peak memory per
variant, and whether every draft and the decoder logits stay bit-identical.

    python scripts/bench_changes.py sort          # experts sorted before gather_(q)mm
    python scripts/bench_changes.py compile       # mx.compile of the decoder step
    python scripts/bench_changes.py memory        # dropped logits reference, fused entropy
    python scripts/bench_changes.py clear-cache   # mx.clear_cache() at each canvas
    python scripts/bench_changes.py sync          # one host sync per step vs none
    python scripts/bench_changes.py lanes         # tokens split into lanes on CPU streams
    python scripts/bench_changes.py sampler-lanes # (prototype) the sampler on lanes too
      [--recipe mixed-4,fp32] [--config small] [--vocab N] [--reps 5]

"without" is the code as it was (or the alternative), restored by monkeypatching, so
both variants run in one process on one model.
"""

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

import mlx_diffgemma as md  # noqa: E402
import mlx_diffgemma.generation.sampler as S  # noqa: E402
import mlx_diffgemma.models.lanes as L  # noqa: E402
import mlx_diffgemma.models.model as M  # noqa: E402
from mlx_diffgemma.bench.bench import bench_generation  # noqa: E402
from mlx_diffgemma.bench.synthetic import preset_args, synthetic_model  # noqa: E402
from mlx_diffgemma.generation.denoiser import MLXDenoiser  # noqa: E402
from mlx_diffgemma.generation.events import Draft  # noqa: E402


def patch(obj, name, value):
    """(enter, exit) that set obj.name = value and restore the current value."""
    old = getattr(obj, name)
    return (lambda: setattr(obj, name, value), lambda: setattr(obj, name, old))


def both(*pairs):
    return (lambda: [p[0]() for p in pairs], lambda: [p[1]() for p in reversed(pairs)])


NOOP = (lambda: None, lambda: None)


# -- the alternatives ------------------------------------------------------------------


def experts_unsorted(self, x, indices, weights):
    x = mx.expand_dims(x, (-2, -3))
    gate, up = mx.split(self.gate_up_proj(x, indices, sorted_indices=False), 2, axis=-1)
    y = self.down_proj(nn.gelu_approx(gate) * up, indices, sorted_indices=False).squeeze(-2)
    return (y * mx.expand_dims(weights.astype(y.dtype), -1)).sum(axis=-2)


def step_keeping_logits(self, canvas, canvas_index, step):
    logits = self.model.decode(canvas, self.cache, self._sc_logits)
    processed = logits / self.gen.temperature(step)  # `logits` stays referenced
    return self.sample(processed, canvas, canvas_index, step)


def eager_entropy(logits):
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(mx.exp(logp) * logp).sum(axis=-1)


def start_canvas_clearing(self, canvas_index):
    mx.clear_cache()
    return _start_canvas(self, canvas_index)


_start_canvas = MLXDenoiser.start_canvas


def variants(change):
    if change == "sort":
        return {"sorted (runtime)": NOOP, "unsorted": patch(M.Experts, "__call__", experts_unsorted)}
    if change == "compile":
        return {"eager (runtime)": patch(M.Model, "compile_decode", False),
                "compiled decoder": patch(M.Model, "compile_decode", True)}
    if change == "memory":
        keep, eager = patch(MLXDenoiser, "step", step_keeping_logits), patch(S, "_entropy", eager_entropy)
        return {"before: logits kept, eager entropy": both(keep, eager),
                "logits reference dropped": eager,
                "fused entropy": keep,
                "both (runtime)": NOOP}
    if change == "lanes":
        return {"one lane": patch(M.Model, "lanes", 1), "one lane per core (runtime)": NOOP}
    raise ValueError(change)


# -- measurement -----------------------------------------------------------------------


def build(a):
    args = preset_args(a.config, vocab_size=a.vocab)
    return args, synthetic_model(args, recipe=a.recipe_now, seed=0)


def ab(a, vs):
    args, m = build(a)
    V, C = args.vocab_size, args.canvas_length
    prompt = np.random.default_rng(0).integers(3, V, 512).tolist()
    gen = bench_generation(8, 2 * C)
    state, times, peaks = {}, {n: [] for n in vs}, {n: [] for n in vs}
    for name, (enter, leave) in vs.items():
        enter()
        mx.random.seed(0)
        d = MLXDenoiser(m, gen)
        d.encode(prompt)
        c = d.step(d.start_canvas(0), 0, 8)[0]
        state[name] = [d, d.step(c, 0, 7)[0]]  # warm, self-conditioned from here on
        leave()
    for _ in range(a.reps):
        for name, (enter, leave) in vs.items():
            enter()
            d, c = state[name]
            mx.clear_cache()
            mx.reset_peak_memory()
            for i in range(3):
                tic = time.perf_counter()
                c, am, acc, _ = d.step(c, 0, 6 - i)
                am.tolist(), acc.tolist()
                times[name].append(time.perf_counter() - tic)
            peaks[name].append(mx.get_peak_memory())
            state[name][1] = c
            leave()
    sigs = {}
    for name, (enter, leave) in vs.items():
        enter()
        s = []
        kw = dict(max_new_tokens=2 * C, max_denoising_steps=4, eos_token_id=None)
        for extra in ({"noise": md.SeededNoise(1)}, {"seed": 3}):
            evs = md.stream_generate(m, None, prompt[:100], **extra, **kw)
            s.append([(e.tokens, e.accepted) for e in evs if isinstance(e, Draft)])
        cache = m.make_cache()
        m.encode(mx.array([prompt[:100]]), cache)
        canvas = mx.array(np.random.default_rng(1).integers(0, V, (1, C)))
        l1 = m.decode(canvas, cache, None)
        l2 = m.decode(canvas, cache, l1 / 0.7)
        s.append(hashlib.sha256(np.array(l1).tobytes() + np.array(l2).tobytes()).hexdigest())
        sigs[name] = s
        leave()
    first = next(iter(sigs.values()))
    return {
        name: {
            "step_ms": round(statistics.median(times[name]) * 1e3, 1),
            "peak_mb": round(max(peaks[name]) / 1e6, 1),
            "drafts_identical": sigs[name][:2] == first[:2],
            "logits_identical": sigs[name][2] == first[2],
        }
        for name in vs
    }


def clear_cache(a):
    args, m = build(a)
    V, C = args.vocab_size, args.canvas_length
    prompt = np.random.default_rng(0).integers(3, V, 700).tolist()
    out = {}
    for name, f in [("no clear (runtime)", _start_canvas), ("clear_cache per canvas", start_canvas_clearing)] * 2:
        MLXDenoiser.start_canvas = f
        mx.clear_cache()
        mx.reset_peak_memory()
        tic, mem = time.perf_counter(), []
        for ev in md.stream_generate(m, None, prompt, seed=0, max_new_tokens=4 * C,
                                     max_denoising_steps=4, eos_token_id=None):
            if isinstance(ev, md.Commit):
                mem.append(round((mx.get_active_memory() + mx.get_cache_memory()) / 1e6))
        out.setdefault(name, []).append({"s": round(time.perf_counter() - tic, 2), "active+cache_mb": mem,
                                         "peak_active_mb": round(mx.get_peak_memory() / 1e6)})
    MLXDenoiser.start_canvas = _start_canvas
    return out


def sync(a):
    """Steps as the runtime runs them (one eval + reads per step) against the same graphs
    chained with async_eval and evaluated once at the end: the most removing the per-step
    host sync could give."""
    args, m = build(a)
    V = args.vocab_size
    gen = bench_generation(8, 512)
    d = MLXDenoiser(m, gen)
    d.encode(np.random.default_rng(0).integers(3, V, 512).tolist())

    def synced(n):
        c = d.start_canvas(0)
        for s in range(n, 0, -1):
            c, am, acc, _ = d.step(c, 0, s)
            am.tolist(), acc.tolist()

    def unsynced(n):
        c, outs = d.start_canvas(0), []
        for s in range(n, 0, -1):
            processed = m.decode(c, d.cache, d._sc_logits) / gen.temperature(s)
            argmax = mx.argmax(processed, -1).astype(mx.int32)
            sample = mx.random.categorical(processed, axis=-1).astype(mx.int32)
            fresh = mx.random.randint(0, V, c.shape, dtype=mx.int32)
            e = S.token_entropy(processed)
            acc = S.entropy_bound_accept(e, gen.entropy_bound)
            c = mx.where(acc, sample, fresh)
            stop, d._history = S.stable_and_confident(argmax, d._history, e, 1, gen.confidence_threshold)
            d._sc_logits = processed
            mx.async_eval(c, argmax, acc, stop, processed, d._history)
            outs.append((argmax, stop))
        mx.eval(outs)

    for f in (synced, unsynced):
        f(3)
    res = {"synced (runtime)": [], "no per-step sync": []}
    for _ in range(a.reps):
        for name, f in zip(res, (synced, unsynced)):
            tic = time.perf_counter()
            f(6)
            res[name].append((time.perf_counter() - tic) / 6)
    return {k: {"step_ms": round(statistics.median(v) * 1e3, 1)} for k, v in res.items()}


def sampler_lanes(a):
    """Prototype of the next CPU lever: the sampler's per-token work (argmax, the
    categorical draw, the entropy) on the forward's lanes, the draw's Gumbel noise made
    whole (as `mx.random.categorical` makes it) and sliced, so seeded runs keep their
    bits. Times and peak (in [canvas x vocab] float32 units) against the runtime's."""
    args, m = build(a)
    C, V = args.canvas_length, args.vocab_size
    p = mx.random.normal((1, C, V)) * 3
    mx.eval(p)
    lanes = L.make_lanes(C)

    def one():
        mx.random.seed(1)
        return mx.argmax(p, -1), mx.random.categorical(p, axis=-1), S.token_entropy(p)

    def on_lanes():
        mx.random.seed(1)
        g = mx.random.gumbel(p.shape, dtype=p.dtype)
        parts = L.on_lanes(
            lanes, lambda x, gx: (mx.argmax(x, -1), mx.argmax(x + gx, -1), S.token_entropy(x)),
            L.split_lanes(p, lanes), L.split_lanes(g, lanes))
        return tuple(L.join_lanes([q[i] for q in parts]) for i in range(3))

    x, y = one(), on_lanes()
    mx.eval(x, y)
    res = {"identical": all(np.array_equal(np.array(u), np.array(v)) for u, v in zip(x, y)),
           "lanes": len(lanes)}
    for name, f in (("one lane (runtime)", one), ("sampler on lanes", on_lanes)):
        times, peaks = [], []
        for _ in range(a.reps):
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            tic = time.perf_counter()
            mx.eval(f())
            times.append(time.perf_counter() - tic)
            peaks.append((mx.get_peak_memory() - base) / (C * V * 4))
        res[name] = {"ms": round(statistics.median(times) * 1e3, 1), "peak_units": round(max(peaks), 2)}
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("change", choices=["sort", "compile", "memory", "clear-cache", "sync", "lanes",
                                         "sampler-lanes"])
    p.add_argument("--recipe", default="mixed-4,fp32", help="comma-separated recipes")
    p.add_argument("--config", default="small")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    for recipe in a.recipe.split(","):
        a.recipe_now = recipe
        if a.change == "clear-cache":
            res = clear_cache(a)
        elif a.change == "sync":
            res = sync(a)
        elif a.change == "sampler-lanes":
            res = sampler_lanes(a)
        else:
            res = ab(a, variants(a.change))
        print(json.dumps({"change": a.change, "recipe": recipe, "config": a.config,
                          "vocab": a.vocab, "results": res}, indent=1), flush=True)


if __name__ == "__main__":
    main()

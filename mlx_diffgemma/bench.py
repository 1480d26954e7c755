"""`mlx-diffgemma bench`: prefill, denoising step, canvas and generation speed, side by
side with mlx-vlm 0.7.10 and transformers on the same checkpoint, in one run.

What is measured (medians after warm-up, each implementation in turn, same process):

* prefill: one encoder pass over N prompt tokens into a fresh cache;
* step: one denoising step at the model's canvas (decoder forward with
  self-conditioning from the previous step + the reference sampler), in the middle of
  a canvas (the first step of a canvas, which has no self-conditioning input, is not
  counted);
* canvas: a fresh canvas denoised for exactly `--steps` steps (the stopping rule is
  not consulted, so convergence cannot hide per-step cost);
* generation: the implementation's own generation loop for `--gen-tokens` tokens at
  `--steps` steps per canvas, prompt included, as tokens per second;
* peak memory (MLX: `mx.get_peak_memory`, weights included; torch: CUDA only).

The model is a directory (`--model`) or a synthetic checkpoint (`--config`): the real
module tree with random already-quantized weights (`synthetic.py`), the released
26B-A4B shapes (`--config real`) or a scaled-down preset with the same structure.
mlx-vlm runs the same arrays (shared); transformers runs them dequantized to float32.

    mlx-diffgemma bench                          # default: preset "small", all three
    mlx-diffgemma bench --config real --impl ours,mlx-vlm --steps 48
    mlx-diffgemma bench --breakdown --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

IMPLS = ("ours", "mlx-vlm", "transformers")


# -- machine ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _global_symbol_library(symbol: str) -> Optional[str]:
    """The library that provides `symbol` in the process's global scope (the executable,
    LD_PRELOAD, their dependencies), which is where MLX's own lookups start; None when
    no global library has it (MLX then uses the BLAS it was built against)."""
    import ctypes
    import ctypes.util

    try:
        addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

    info = DlInfo()
    try:
        libdl = ctypes.CDLL(ctypes.util.find_library("dl") or None)
        if libdl.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) and info.fname:
            return os.path.realpath(info.fname.decode())
    except (AttributeError, OSError):
        pass
    return "unknown"


def blas_info() -> Dict[str, Any]:
    """Which BLAS MLX's CPU backend runs with, and what its float32 matmul achieves.

    MLX resolves `cblas_sgemm` through the global scope first, so a preloaded BLAS
    (LD_PRELOAD=.../openblas-pthread/libblas.so.3) wins over the reference BLAS the
    mlx-cpu wheel bundles; the measured GFLOPS is the proof either way."""
    a = mx.random.normal((512, 512))
    mx.eval(a @ a)
    tic = time.perf_counter()
    for _ in range(5):
        mx.eval(a @ a)
    gflops = 5 * 2 * 512**3 / (time.perf_counter() - tic) / 1e9
    if platform.system() == "Darwin":
        return {"name": "Accelerate", "library": None, "sgemm_gflops": round(gflops, 1)}
    lib = _global_symbol_library("cblas_sgemm")
    if lib is None:
        bundled = ""
        try:
            for line in open("/proc/self/maps"):
                if "mlx_cpu.libs" in line and "blas" in line:
                    bundled = line.split()[-1]
                    break
        except OSError:
            pass
        return {"name": "reference BLAS bundled with the mlx-cpu wheel", "library": bundled or None,
                "sgemm_gflops": round(gflops, 1)}
    name = "OpenBLAS" if "openblas" in lib.lower() else os.path.basename(lib)
    if lib != "unknown" and os.path.basename(lib) in os.environ.get("LD_PRELOAD", "") or \
            "openblas" in os.environ.get("LD_PRELOAD", "").lower():
        name += " (LD_PRELOAD)"
    return {"name": name, "library": lib, "sgemm_gflops": round(gflops, 1)}


def machine_info(torch_threads: Optional[int]) -> Dict[str, Any]:
    import mlx_lm

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mlx_device": str(mx.default_device()),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "blas": blas_info(),
    }
    try:
        import mlx_vlm

        info["mlx_vlm"] = mlx_vlm.__version__
    except ImportError:
        pass
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


# -- model -----------------------------------------------------------------------------


def build_model(args) -> tuple:
    """(our model, HF-style config dict, description) from `--model` or `--config`."""
    from .synthetic import hf_config, preset_args, synthetic_model

    if args.model:
        from .loader import load_model

        model, config = load_model(args.model)
        if mx.default_device() == mx.cpu and model.dtype != mx.float32:
            # MLX's CPU kernels: bf16/fp16 quantized matmuls are 10-200x slower and
            # bf16 gather_mm is missing; float32 is the only fair CPU setting.
            model.set_dtype(mx.float32)
        return model, config, f"{args.model}"
    over = dict(
        num_hidden_layers=args.layers, num_experts=args.experts, vocab_size=args.vocab,
        hidden_size=args.hidden, canvas_length=args.canvas,
    )
    margs = preset_args(args.config, **over)
    dtype = args.dtype
    if dtype == "auto":
        # The released checkpoint's bf16 on a GPU; float32 on MLX's CPU backend, whose
        # quantized kernels are 10x slower in bf16 (and 100x in fp16).
        dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    model = synthetic_model(margs, recipe=args.recipe, dtype=getattr(mx, dtype), seed=args.seed)
    return model, hf_config(margs), f"synthetic {args.config} ({args.recipe})"


def model_info(model, config, description) -> Dict[str, Any]:
    from .synthetic import quantization_of, weight_bytes

    a = model.args
    q = quantization_of(model)
    bits = sorted({v["bits"] for v in q.values()})
    return {
        "source": description,
        "layers": a.num_hidden_layers,
        "layer_types": "".join("f" if t == "full_attention" else "s" for t in a.layer_types),
        "hidden": a.hidden_size,
        "experts": f"{a.num_experts} (top-{a.top_k_experts}, {a.moe_intermediate_size} wide)",
        "vocab": a.vocab_size,
        "canvas": a.canvas_length,
        "sliding_window": a.sliding_window,
        "quantized_bits": bits,
        "dtype": str(model.dtype),
        "weights_gb": round(weight_bytes(model) / 1e9, 3),
    }


# -- timing ----------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def measure(runner, prompt: np.ndarray, steps: int, gen_tokens: int, iters: int,
            warmup: int, canvas_iters: int, skip_generate: bool = False) -> Dict[str, Any]:
    """The runner's prefill / step / canvas / generation numbers (see module doc)."""
    out: Dict[str, Any] = {}
    runner.reset_peak()

    times = [_timed(lambda: runner.prefill(prompt)) for _ in range(warmup + iters)][warmup:]
    out["prefill_s"] = statistics.median(times)
    # The peak is read after each phase and the largest kept: a phase may reset it (our
    # MLXDenoiser does, when created).
    peaks = [runner.peak_gb()]

    runner.set_context(prompt)
    # Steps from the middle of canvases: drop each canvas's first step (no
    # self-conditioning input) and the warm-up steps.
    step_times: List[float] = []
    seen = 0
    while len(step_times) < iters:
        canvas = runner.start()
        for n in range(steps, 0, -1):
            tic = time.perf_counter()
            canvas = runner.step(canvas, n)
            t = time.perf_counter() - tic
            if n == steps and steps > 1:
                continue
            seen += 1
            if seen > warmup:
                step_times.append(t)
            if len(step_times) >= iters:
                break
    out["step_s"] = statistics.median(step_times)
    out["step_samples"] = len(step_times)

    def canvas_run():
        c = runner.start()
        for n in range(steps, 0, -1):
            c = runner.step(c, n)

    out["canvas_s"] = statistics.median(_timed(canvas_run) for _ in range(canvas_iters))
    peaks.append(runner.peak_gb())

    if not skip_generate:
        res: Dict[str, Any] = {}
        t = _timed(lambda: res.update(runner.generate(prompt, gen_tokens, steps)))
        out["generate_s"] = t
        out["generate_tokens"] = res["tokens"]
        out["generate_tps"] = res["tokens"] / t
        out["steps_per_canvas"] = res["steps_per_canvas"]
        peaks.append(runner.peak_gb())
    out["peak_gb"] = None if peaks[0] is None else max(peaks)
    return out


# -- breakdown -------------------------------------------------------------------------


def breakdown(model, prompt: np.ndarray, gen, iters: int = 3) -> Dict[str, Any]:
    """Our per-step time split into its pieces, each timed alone with `mx.eval` barriers
    at the benched shapes: per layer kind, attention (incl. its norms), dense MLP
    (incl. norms), router + experts (incl. norms); then the final norm + LM head (with
    soft-capping), self-conditioning (softmax of the previous logits, the product with
    the embedding, its MLP) and the sampler (everything after the logits). Each piece
    runs on the lanes the step runs on (lanes.py)."""
    from .denoiser import MLXDenoiser
    from .lanes import attention_inputs, join_lanes, on_lanes, run_layer, split_lanes

    den = MLXDenoiser(model, gen)
    den.encode(prompt.reshape(-1).tolist())
    cache = den.cache
    a = model.args
    dec = model.model.decoder
    C, H = a.canvas_length, a.hidden_size
    h = mx.random.normal((1, C, H)).astype(model.dtype)
    canvas = mx.random.randint(0, a.vocab_size, (1, C), dtype=mx.int32)
    logits = model.decode(canvas, cache, None)
    mx.eval(h, logits)

    def t(fn):
        mx.eval(fn())
        return statistics.median(_timed(lambda: mx.eval(fn())) for _ in range(iters))

    # Every piece runs on the lanes the step uses (lanes.py), as the step runs it.
    lanes = model._lanes(C)
    hs = split_lanes(h, lanes)

    def per_lane(fn, *xs):
        return lambda: on_lanes(lanes, fn, *([split_lanes(x, lanes) for x in xs] or [hs]))

    pieces: Dict[str, float] = {}
    counts = {"sliding_attention": 0, "full_attention": 0}
    for kind in counts:
        counts[kind] = a.layer_types.count(kind)
    per_kind: Dict[str, Dict[str, float]] = {}
    offset = cache.offset
    for kind in counts:
        if not counts[kind]:
            continue
        i = a.layer_types.index(kind)
        layer, c = dec.layers[i], cache.layers[i]

        def attention():
            qs, k, v = attention_inputs(layer, hs, lanes, offset=offset, cache=c)
            return on_lanes(
                lanes, lambda q: layer.post_attention_layernorm(layer.self_attn.attend(q, k, v, None)), qs)

        def moe(x):
            idx, w = layer.router(x)
            return layer.post_feedforward_layernorm_2(
                layer.experts(layer.pre_feedforward_layernorm_2(x), idx, w))

        per_kind[kind] = {
            "attention": t(attention),
            "dense_mlp": t(per_lane(
                lambda x: layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(x))))),
            "experts": t(per_lane(moe)),
            "layer": t(lambda: run_layer(
                layer, hs, lanes, offset=offset, layer_scalar=layer.layer_scalar, cache=c)),
        }

    def total(name):
        return sum(per_kind[k][name] * counts[k] for k in per_kind)

    pieces["attention"] = total("attention")
    pieces["experts (router + experts)"] = total("experts")
    pieces["dense MLP"] = total("dense_mlp")
    pieces["layer rest (residuals, norms)"] = max(
        0.0, total("layer") - pieces["attention"] - pieces["experts (router + experts)"] - pieces["dense MLP"])
    pieces["LM head (norm, matmul, softcap)"] = t(
        lambda: join_lanes(on_lanes(lanes, lambda x: model._logits(dec.norm(x)), hs)))
    sc_logits = logits.astype(model.dtype)
    pieces["self-conditioning (softmax, embedding matmul, MLP)"] = t(
        per_lane(model._self_conditioned, h, sc_logits))
    pieces["embedding lookup"] = t(per_lane(model._embed, canvas))

    def sampler():
        den._sc_logits, den._history = None, None
        processed = logits / gen.temperature(gen.max_denoising_steps)
        return den.sample(processed, canvas, 0, gen.max_denoising_steps)[0]

    pieces["sampler (temperature, argmax, sample, entropy, accept, renoise, stop)"] = t(sampler)
    # The whole step, the same way, for the sum check.
    den._sc_logits = sc_logits
    step = statistics.median(
        _timed(lambda: den.step(canvas, 0, gen.max_denoising_steps)) for _ in range(iters))
    return {
        "pieces_s": pieces,
        "per_layer_s": per_kind,
        "layer_counts": counts,
        "sum_s": sum(pieces.values()),
        "step_s": step,
    }


# -- memory arithmetic -----------------------------------------------------------------


def memory_arithmetic(config: Dict[str, Any], recipe: str = "mixed-4", prompt: int = 4096,
                      new_tokens: int = 256, act_bytes: int = 2, prefill_chunk: int = 2048) -> Dict[str, Any]:
    """Peak-memory arithmetic of a generation (`prompt` tokens, then `new_tokens`) with the
    model `config` quantized by `recipe`, activations in a 2-byte float (bf16).

    * weights: from the recipe (`sizes.estimate`);
    * KV cache: every sliding layer keeps window-1 + slack (one canvas) tokens, every
      full layer prompt + generated tokens (the conservative count: our drafter never
      encodes the last canvas);
    * one denoising step, counted in units of a [canvas x vocab] float32 array (268 MB at
      the real shapes), live at the step's peak (measured
      on the CPU backend at smaller shapes, see BENCHMARKS.md): the processed float32
      logits (which took the raw logits' buffer), the self-conditioning copy of them kept
      for the next step (bf16: half a unit), and two sampler temporaries (the Gumbel
      draw's and the fused entropy pass's);
    * the layers' own activations at the canvas, and the prefill's largest transient
      (a full layer's unfused attention scores + softmax over a `prefill_chunk`-token
      chunk), which is smaller than the step's and so not added.
    """
    from .config import ModelArgs
    from .sizes import estimate

    a = ModelArgs.from_dict(config)
    est = estimate(config, recipe)
    C, V = a.canvas_length, a.vocab_size
    slack = C  # make_cache's default
    context = prompt + new_tokens
    kv = 0
    for i, kind in enumerate(a.layer_types):
        heads, dim = a.kv_heads_of(i), a.head_dim_of(i)
        kept = min(context, a.sliding_window - 1 + slack) if kind == "sliding_attention" else context
        kv += 2 * heads * dim * kept * act_bytes
    unit = C * V * 4
    step_units = {
        "processed logits, float32 (the raw logits' buffer)": 1.0,
        "self-conditioning input kept for the next step (bf16)": act_bytes / 4,
        "sampler temporaries (Gumbel draw + fused entropy pass)": 2.0,
    }
    layer_acts = (
        # a full layer's attention scores and their softmax, canvas x (context + canvas)
        2 * a.num_attention_heads * C * (context + C) * act_bytes
        # routed activations: canvas x top-k x 2 x moe_intermediate (gate_up), twice
        + 2 * C * a.top_k_experts * 2 * a.moe_intermediate_size * act_bytes
    )
    prefill = 2 * a.num_attention_heads * prefill_chunk * prompt * act_bytes
    step = sum(step_units.values()) * unit
    total = est["bytes"] + kv + step + layer_acts
    return {
        "recipe": est["recipe"],
        "weights_gb": est["bytes"] / 1e9,
        "kv_cache_gb": kv / 1e9,
        "step_units": step_units,
        "unit_gb": unit / 1e9,
        "step_activations_gb": step / 1e9,
        "layer_activations_gb": layer_acts / 1e9,
        "prefill_transient_gb": prefill / 1e9,
        "total_gb": total / 1e9,
        "target_gb": 17.0,
        "met": total / 1e9 <= 17.0,
    }


# -- report ----------------------------------------------------------------------------


def _ratio(ours: Optional[float], theirs: Optional[float], higher_is_better=False) -> Optional[float]:
    if not ours or not theirs:
        return None
    return ours / theirs if higher_is_better else theirs / ours


def ratios(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Our speed-up over each peer per metric (>1: ours is faster)."""
    ours = results.get("ours")
    out = {}
    if not ours or "error" in ours:
        return out
    for name, r in results.items():
        if name == "ours" or "error" in r:
            continue
        out[name] = {
            "prefill": _ratio(ours.get("prefill_s"), r.get("prefill_s")),
            "step": _ratio(ours.get("step_s"), r.get("step_s")),
            "canvas": _ratio(ours.get("canvas_s"), r.get("canvas_s")),
            "generate": _ratio(ours.get("generate_tps"), r.get("generate_tps"), True),
        }
    return out


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}{unit}" if v < 100 else f"{v:.1f}{unit}"
    return f"{v}{unit}"


def print_report(report: Dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 120))
    m, s = report["machine"], report["settings"]
    console.print(
        f"[bold]machine[/bold] {m['cpu']} ({m['cores']} cores), MLX {m['mlx']} on {m['mlx_device']}, "
        f"BLAS: {m['blas']['name']} ({m['blas']['sgemm_gflops']} GFLOPS float32 matmul)"
    )
    mi = report["model"]
    console.print(
        f"[bold]model[/bold] {mi['source']}: {mi['layers']} layers ({mi['layer_types']}), hidden "
        f"{mi['hidden']}, experts {mi['experts']}, vocab {mi['vocab']}, canvas {mi['canvas']}, "
        f"bits {mi['quantized_bits'] or 'float'}, {mi['dtype']}, weights {mi['weights_gb']} GB"
    )
    console.print(
        f"[bold]settings[/bold] prompt {s['prompt_tokens']} tokens, {s['steps']} steps per canvas "
        f"(fixed), generation {s['gen_tokens']} tokens, medians of {s['iters']} after {s['warmup']} warm-up"
        + (f"; ours on {s['lanes']['step']} lanes per step, {s['lanes']['prefill']} in prefill"
           if "lanes" in s else "")
    )
    results, rat = report["results"], report["ratios"]
    names = [n for n in IMPLS if n in results]
    table = Table(title="DiffusionGemma bench (seconds unless noted; 'ours x' = our speed-up, >1 = faster)")
    table.add_column("metric")
    for n in names:
        table.add_column(report["labels"].get(n, n), justify="right")
        if n != "ours":
            table.add_column("ours x", justify="right")
    rows = [
        (f"prefill {s['prompt_tokens']} tok (s)", "prefill_s", "prefill"),
        (f"denoising step, canvas {mi['canvas']} (s)", "step_s", "step"),
        (f"canvas at {s['steps']} steps (s)", "canvas_s", "canvas"),
        (f"generation {s['gen_tokens']} tok (tok/s)", "generate_tps", "generate"),
        ("peak memory (GB)", "peak_gb", None),
    ]
    for label, key, rkey in rows:
        cells = [label]
        for n in names:
            r = results[n]
            cells.append("error" if "error" in r else _fmt(r.get(key)))
            if n != "ours":
                v = rat.get(n, {}).get(rkey) if rkey else None
                cells.append(f"{v:.2f}x" if v else "-")
        table.add_row(*cells)
    console.print(table)
    for n in names:
        if "error" in results[n]:
            console.print(f"[yellow]{n}: {results[n]['error']}[/yellow]")
    if report.get("check"):
        for n, c in report["check"].items():
            console.print(
                f"same checkpoint: {n} decoder logits vs ours max |diff| {c['max_abs_diff']:.2e}, "
                f"argmax agreement {c['argmax_agreement']:.4f}"
            )
    for note in report.get("notes", []):
        console.print(f"[dim]- {note}[/dim]")
    bd = report.get("breakdown")
    if bd:
        t = Table(title=f"per-step breakdown (ours, pieces timed alone); measured step {bd['step_s']:.3f} s")
        t.add_column("piece")
        t.add_column("s / step", justify="right")
        t.add_column("share", justify="right")
        for k, v in bd["pieces_s"].items():
            t.add_row(k, f"{v:.4f}", f"{100 * v / bd['sum_s']:.1f}%")
        t.add_row("sum of pieces", f"{bd['sum_s']:.4f}", "100%")
        console.print(t)


# -- CLI -------------------------------------------------------------------------------


def add_bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .synthetic import PRESETS

    src = p.add_argument_group("model")
    src.add_argument("--model", default=None, help="a model directory (ours/mlx-vlm layout or HF)")
    src.add_argument("--config", default="small", choices=sorted(PRESETS),
                     help="synthetic checkpoint shapes: 'real' = the released 26B-A4B, or a "
                     "scaled-down preset with the same structure (default: small)")
    src.add_argument("--recipe", default="mixed-4", choices=["mixed-4", "4bit", "8bit", "fp32"],
                     help="quantization of the synthetic weights (default mixed-4)")
    src.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="scales/biases/activations of the synthetic model (default: float32 on "
                     "the CPU backend, bfloat16 on a GPU)")
    for flag, dest in (("--layers", "layers"), ("--experts", "experts"), ("--vocab", "vocab"),
                       ("--hidden", "hidden"), ("--canvas", "canvas")):
        src.add_argument(flag, dest=dest, type=int, default=None, help=f"override the preset's {dest}")
    run = p.add_argument_group("run")
    run.add_argument("--impl", default=None,
                     help="comma-separated subset of ours,mlx-vlm,transformers (default: all "
                     "available; transformers is left out for --config real)")
    run.add_argument("--prompt-tokens", type=int, default=512, help="prefill length N (default 512)")
    run.add_argument("--steps", type=int, default=8,
                     help="denoising steps per canvas, fixed (default 8; the release uses 48)")
    run.add_argument("--gen-tokens", type=int, default=None,
                     help="tokens to generate end to end (default: two canvases)")
    run.add_argument("--iters", type=int, default=3, help="timed repetitions (median)")
    run.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    run.add_argument("--canvas-iters", type=int, default=1, help="timed full canvases (median)")
    run.add_argument("--no-generate", action="store_true", help="skip the end-to-end generation")
    run.add_argument("--no-check", action="store_true",
                     help="skip comparing the implementations' decoder logits")
    run.add_argument("--breakdown", action="store_true", help="also time each piece of our step")
    run.add_argument("--compile-decode", action="store_true",
                     help="run our decoder step through mx.compile (off by default: it did not pay "
                     "on the CPU backend; see BENCHMARKS.md)")
    run.add_argument("--lanes", type=int, default=None,
                     help="split our forward's tokens into this many lanes on separate streams "
                     "(default: one per CPU core on the CPU backend, one on a GPU; see lanes.py)")
    run.add_argument("--torch-threads", type=int, default=None,
                     help="torch intra-op threads (default: OMP_NUM_THREADS, else 1)")
    run.add_argument("--torch-device", default=None, help="cpu or cuda (default: cuda if available)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--memory-arithmetic", action="store_true",
                     help="print the peak-memory arithmetic of the real 26B-A4B mixed 4-bit "
                     "model (4K prompt, 256 new tokens) and exit")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def _impls(args, real: bool) -> List[str]:
    if args.impl:
        chosen = [x.strip() for x in args.impl.split(",") if x.strip()]
        bad = [x for x in chosen if x not in IMPLS]
        if bad:
            raise ValueError(f"unknown implementation(s) {bad}; choose from {', '.join(IMPLS)}")
        return chosen
    return ["ours", "mlx-vlm"] if real else list(IMPLS)


def main_bench(args) -> int:
    from rich.console import Console

    from .peers import bench_generation

    console = Console(width=max(Console().width, 120))
    if args.memory_arithmetic:
        from .synthetic import hf_config, preset_args

        mem = memory_arithmetic(hf_config(preset_args("real")))
        console.print_json(data=mem)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"memory_arithmetic": mem}, f, indent=2)
        return 0

    if "transformers" in (args.impl or "transformers"):
        try:
            import torch

            # One intra-op thread unless told otherwise: on the 2-core shared machine of
            # BENCHMARKS.md, two threads made transformers' step 7x slower (OpenMP waits
            # on a busy sibling core).
            threads = args.torch_threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
            torch.set_num_threads(threads)
        except ImportError:
            pass
    machine = machine_info(args.torch_threads)
    model, config, description = build_model(args)
    if args.compile_decode:
        model.compile_decode = True
    if args.lanes is not None:
        model.lanes = args.lanes
    C, V = model.canvas_length, model.vocab_size
    gen_tokens = args.gen_tokens or 2 * C
    gen = bench_generation(args.steps, gen_tokens)
    prompt = random_prompt(config, V, args.prompt_tokens, args.seed)
    impls = _impls(args, real=model.args.hidden_size == 2816 and model.args.num_hidden_layers >= 30)

    report: Dict[str, Any] = {
        "machine": machine,
        "model": model_info(model, config, description),
        "settings": {
            "prompt_tokens": args.prompt_tokens, "steps": args.steps, "gen_tokens": gen_tokens,
            "iters": args.iters, "warmup": args.warmup, "canvas_iters": args.canvas_iters,
            "compile_decode": bool(getattr(model, "compile_decode", False)),
            "lanes": {"step": len(model._lanes(C)), "prefill": len(model._lanes(args.prompt_tokens))},
            "sampler": "reference: entropy-bound (bound %g), categorical at temperature 1 of the "
            "processed logits, linear temperature %g..%g, full canvas, stable-and-confident "
            "stop (stability %d, confidence %g) evaluated but never met by random weights"
            % (gen.entropy_bound, gen.t_min, gen.t_max, gen.stability_threshold, gen.confidence_threshold),
        },
        "labels": {"ours": "mlx-diffgemma", "mlx-vlm": "mlx-vlm", "transformers": "transformers"},
        "results": {},
        "notes": [],
    }
    runners = {}
    for name in impls:
        try:
            runners[name] = _make_runner(name, model, config, gen, args, report)
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            report["results"][name] = {"error": f"{type(e).__name__}: {e}"}
    for name, runner in runners.items():
        console.print(f"[dim]measuring {name} ...[/dim]")
        try:
            report["results"][name] = measure(
                runner, prompt, args.steps, gen_tokens, args.iters, args.warmup,
                args.canvas_iters, skip_generate=args.no_generate,
            )
        except Exception as e:
            report["results"][name] = {"error": f"{type(e).__name__}: {e}"}
        mx.clear_cache()
    report["ratios"] = ratios(report["results"])

    if not args.no_check and "ours" in runners and len(runners) > 1:
        canvas = np.random.default_rng(args.seed + 1).integers(0, V, (1, C))
        short = prompt[:, : min(prompt.shape[1], 64)]
        ref = runners["ours"].decoder_logits(short, canvas)
        report["check"] = {}
        for name, runner in runners.items():
            if name == "ours":
                continue
            try:
                other = runner.decoder_logits(short, canvas)
                report["check"][name] = {
                    "max_abs_diff": float(np.abs(other - ref).max()),
                    "argmax_agreement": float((other.argmax(-1) == ref.argmax(-1)).mean()),
                }
            except Exception as e:
                report["notes"].append(f"logit check for {name} failed: {e}")
    if args.breakdown:
        report["breakdown"] = breakdown(model, prompt, gen, iters=args.iters)

    print_report(report, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        console.print(f"wrote {args.json}")
    return 0


def random_prompt(config: Dict[str, Any], vocab: int, n: int, seed: int) -> np.ndarray:
    """[1, n] random token ids that are plain text for every implementation: no special
    ids below 3 and no image/video placeholder ids (mlx-vlm replaces those with pad and
    splices in vision features; its defaults are the released model's ids)."""
    special = {255999, 258880, 258881, 258882}
    for key in ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id"):
        if isinstance(config.get(key), int):
            special.add(config[key])
    allowed = np.setdiff1d(np.arange(3, vocab), np.fromiter(special, dtype=np.int64))
    return np.random.default_rng(seed).choice(allowed, size=(1, n))


def _make_runner(name: str, model, config, gen, args, report):
    from . import peers

    if name == "ours":
        return peers.OursRunner(model, gen, seed=args.seed)
    if name == "mlx-vlm":
        import mlx_vlm

        report["labels"]["mlx-vlm"] = f"mlx-vlm {mlx_vlm.__version__}"
        report["notes"].append(
            "mlx-vlm: step = the body of stream_diffusion_generate's loop for "
            "diffusion_sampler='entropy-bound', temperature=1.0, diffusion_full_canvas=True, "
            "with its own functions (decoder logits, schedule, argmax, categorical, entropy, "
            "self-conditioning input, acceptance, renoise, stable-and-confident check); "
            "generation = stream_diffusion_generate itself with those settings (its loop skips "
            "the sampler at the last step of a canvas)"
        )
        vm = peers.build_mlx_vlm_model(model, config, gen)
        return peers.MLXVLMRunner(vm, gen, seed=args.seed)
    if name == "transformers":
        import torch
        import transformers

        need = peers.torch_float_bytes(model)
        if need > 8e9 and not os.environ.get("BENCH_FORCE_TORCH"):
            raise RuntimeError(
                f"transformers needs the float32 weights ({need / 1e9:.0f} GB) in memory; "
                "skipped (set BENCH_FORCE_TORCH=1 to try)"
            )
        device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
        report["labels"]["transformers"] = f"transformers {transformers.__version__} ({device})"
        report["notes"].append(
            f"transformers: float32 weights (the quantized ones dequantized), "
            f"{torch.get_num_threads()} torch thread(s); step = TorchDenoiser.step "
            "(transformers' network + the reference sampler, as its generate() does it)"
        )
        return peers.TorchRunner(peers.build_torch_model(model, config, device), gen, seed=args.seed)
    raise ValueError(name)

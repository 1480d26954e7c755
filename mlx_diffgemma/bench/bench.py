"""`mlx-diffgemma bench`: our implementation's prefill, denoising step, canvas and
generation speed and peak memory, on a checkpoint directory or a synthetic model.

What is measured (medians after warm-up):

* prefill: one encoder pass over N prompt tokens into a fresh cache;
* step: one denoising step at the model's canvas (decoder forward with
  self-conditioning from the previous step + the reference sampler), in the middle of
  a canvas (the first step of a canvas, which has no self-conditioning input, is not
  counted);
* canvas: a fresh canvas denoised for exactly `--steps` steps (the stopping rule is
  not consulted, so convergence cannot hide per-step cost);
* generation: `stream_generate` for `--gen-tokens` tokens at `--steps` steps per
  canvas, prompt included, as tokens per second;
* peak memory: `mx.get_peak_memory`, weights included.

The model is a directory (`--model`) or a synthetic checkpoint (`--config`): the real
module tree with random already-quantized weights (`synthetic.py`), the released
26B-A4B shapes (`--config real`) or a scaled-down preset with the same structure.
The prompt is random token ids, leaving out the special ids the config (and the
tokenizer, when the directory has one) names.

    mlx-diffgemma bench                          # preset "small"
    mlx-diffgemma bench --config real --steps 48
    mlx-diffgemma bench --memory-arithmetic

The side-by-side comparison with mlx-vlm and transformers on the same checkpoint, and
the per-piece breakdown of a step, are `scripts/bench.py` (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..generation.api import make_denoiser, stream_generate
from ..generation.denoiser import MLXDenoiser
from ..generation.loop import run_to_summary
from ..generation.settings import Settings, reserved_tokens
from ..models.config import GenerationConfig

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


def machine_info() -> Dict[str, Any]:
    import mlx_lm

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mlx_device": str(mx.default_device()),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "blas": blas_info(),
    }


# -- model -----------------------------------------------------------------------------


def build_model(args) -> tuple:
    """(our model, HF-style config dict, description) from `--model` or `--config`."""
    from .synthetic import hf_config, preset_args, synthetic_model

    if args.model:
        from ..models.loader import load_model
        from ..models.paths import resolve_model_path

        # --model as chat, generate and serve take it (a directory, hub id, LM Studio or
        # packaged name).
        path = resolve_model_path(args.model, prefer="mlx")
        model, config = load_model(path)
        model.model_path = path
        if mx.default_device() == mx.cpu and model.dtype != mx.float32:
            # MLX's CPU kernels: bf16/fp16 quantized matmuls are far slower and
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
        # bf16 on a GPU; float32 on MLX's CPU backend, whose quantized kernels are far
        # slower in bf16 and fp16.
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


def special_ids(model, config: Dict[str, Any], model_dir: Optional[str] = None) -> set:
    """Token ids a random prompt leaves out: pad, BOS and EOS of the model's config, the
    config's image/video placeholder ids, and the tokenizer's special ids when
    `model_dir` has a tokenizer."""
    a = model.args
    out = {a.pad_token_id, a.bos_token_id}
    out |= set(a.eos_token_id if isinstance(a.eos_token_id, list) else [a.eos_token_id])
    for section in (config, config.get("text_config") or {}):
        out |= {v for k, v in section.items() if k.endswith("_token_id") and isinstance(v, int)}
    if model_dir:
        from ..models.tokenizer import load_tokenizer

        tok = load_tokenizer(model_dir)
        if tok is not None:
            out |= set(getattr(tok, "all_special_ids", None) or [])
    return {i for i in out if isinstance(i, int)}


def random_prompt(vocab: int, n: int, seed: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """[1, n] random token ids below `vocab`, none of them in `exclude`."""
    allowed = np.setdiff1d(np.arange(vocab), np.fromiter(set(exclude), dtype=np.int64))
    return np.random.default_rng(seed).choice(allowed, size=(1, n))


# -- our runner ------------------------------------------------------------------------


def bench_generation(steps: int, max_new_tokens: int, **overrides) -> GenerationConfig:
    """The released sampling values at a fixed step count, EOS off (random weights would
    end a run at a random point), stopping rule kept (it is part of the per-step work;
    random weights never meet it, and the bench reports steps per canvas to show it)."""
    kw = dict(max_denoising_steps=steps, max_new_tokens=max_new_tokens, eos_token_id=None)
    kw.update(overrides)
    return GenerationConfig.from_model_dir(None, **kw)


class DenoiserRunner:
    """A denoiser stepped as the drafter steps it, and generation through a drafter
    `stream_generate`; each operation returns when its work is done, so one timing loop
    (`measure`) serves every runner:

    * `prefill(ids)`: a fresh cache, the encoder over `ids`;
    * `set_context(ids)`: encode `ids` once as the context later steps read;
    * `start()` / `step(state, n)`: a fresh random canvas / one denoising step at the
      schedule's step `n` (N..1);
    * `generate(ids, max_new_tokens, steps)`: the generation loop, returning how many
      tokens it produced;
    * `reset_peak()` / `peak_gb()`.
    """

    den = None
    stream = None  # the backend's stream_generate (a staticmethod)

    def sync(self) -> None:
        pass

    def start(self):
        return self.den.start_canvas(0)

    def step(self, canvas, n: int):
        canvas, argmax, accepted, _ = self.den.step(canvas, 0, n)
        # What the drafter does with every step: the argmax row for the Draft event.
        self.den.to_list(argmax), self.den.to_list(accepted)
        return canvas

    def generate(self, ids: np.ndarray, max_new_tokens: int, steps: int) -> Dict[str, Any]:
        gen = self.gen
        summary = run_to_summary(self.stream(
            self.model, None, np.asarray(ids).reshape(-1).tolist(), seed=self.seed,
            max_new_tokens=max_new_tokens, max_denoising_steps=steps, eos_token_id=None,
            entropy_bound=gen.entropy_bound, t_min=gen.t_min, t_max=gen.t_max,
            stability_threshold=gen.stability_threshold,
            confidence_threshold=gen.confidence_threshold,
        ))
        self.sync()
        return {"tokens": len(summary.tokens), "steps_per_canvas": summary.steps_per_canvas}


class OursRunner(DenoiserRunner):
    """`MLXDenoiser` and `stream_generate` of this package."""

    stream = staticmethod(stream_generate)

    def __init__(self, model, gen: GenerationConfig, seed: int = 0, mode: str = "reference"):
        self.model = model
        self.gen = gen
        self.seed = seed
        self.mode = mode
        self.den: Optional[MLXDenoiser] = None

    def prefill(self, ids: np.ndarray) -> None:
        cache = self.model.make_cache()
        self.model.encode(mx.array(ids), cache)  # evaluates the cache

    def set_context(self, ids: np.ndarray) -> None:
        mx.random.seed(self.seed)
        self.den = make_denoiser(self.model, Settings(self.gen, mode=self.mode))
        self.den.encode(np.asarray(ids).reshape(-1).tolist())

    def generate(self, ids: np.ndarray, max_new_tokens: int, steps: int) -> Dict[str, Any]:
        self.stream = functools.partial(stream_generate, mode=self.mode)
        return super().generate(ids, max_new_tokens, steps)

    def decoder_logits(self, ids: np.ndarray, canvas: np.ndarray) -> np.ndarray:
        cache = self.model.make_cache()
        self.model.encode(mx.array(ids), cache)
        return np.array(self.model.decode(mx.array(canvas), cache, None))

    def reset_peak(self) -> None:
        mx.clear_cache()
        mx.reset_peak_memory()

    def peak_gb(self) -> Optional[float]:
        return mx.get_peak_memory() / 1e9


# -- timing ----------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def measure(runner, prompt: np.ndarray, steps: int, gen_tokens: int, iters: int,
            warmup: int, canvas_iters: int, skip_generate: bool = False) -> Dict[str, Any]:
    """The runner's prefill / step / canvas / generation numbers (see module doc)."""
    out: Dict[str, Any] = {}
    runner.reset_peak()

    times = [timed(lambda: runner.prefill(prompt)) for _ in range(warmup + iters)][warmup:]
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

    out["canvas_s"] = statistics.median(timed(canvas_run) for _ in range(canvas_iters))
    peaks.append(runner.peak_gb())

    if not skip_generate:
        res: Dict[str, Any] = {}
        t = timed(lambda: res.update(runner.generate(prompt, gen_tokens, steps)))
        out["generate_s"] = t
        out["generate_tokens"] = res["tokens"]
        out["generate_tps"] = res["tokens"] / t
        out["steps_per_canvas"] = res["steps_per_canvas"]
        peaks.append(runner.peak_gb())
    out["peak_gb"] = None if peaks[0] is None else max(peaks)
    return out


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
    from ..models.sizes import estimate, generation_memory

    est = estimate(config, recipe)
    g = generation_memory(config, prompt, new_tokens, act_bytes, prefill_chunk)
    kv, unit, step_units, step = g["kv"], g["unit"], g["step_units"], g["step"]
    layer_acts, prefill = g["layer_acts"], g["prefill"]
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
    }


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}{unit}" if v < 100 else f"{v:.1f}{unit}"
    return f"{v}{unit}"


# -- report ----------------------------------------------------------------------------


def new_report(args, model, config, description: str, gen: GenerationConfig, gen_tokens: int,
               prompt_note: str) -> Dict[str, Any]:
    """The report's machine, model and settings sections; `results` filled by `run_all`."""
    C = model.canvas_length
    return {
        "machine": machine_info(),
        "model": model_info(model, config, description),
        "settings": {
            "prompt_tokens": args.prompt_tokens, "steps": args.steps, "gen_tokens": gen_tokens,
            "iters": args.iters, "warmup": args.warmup, "canvas_iters": args.canvas_iters,
            "compile_decode": bool(getattr(model, "compile_decode", False)),
            "lanes": {"step": len(model.lanes_for(C)), "prefill": len(model.lanes_for(args.prompt_tokens))},
            "prompt": prompt_note,
            "sampler": "reference: entropy-bound (bound %g), categorical at temperature 1 of the "
            "processed logits, linear temperature %g..%g, full canvas, stable-and-confident "
            "stop (stability %d, confidence %g) evaluated but never met by random weights"
            % (gen.entropy_bound, gen.t_min, gen.t_max, gen.stability_threshold, gen.confidence_threshold),
        },
        "labels": {"ours": "mlx-diffgemma"},
        "results": {},
        "notes": [],
    }


def run_all(runners: Dict[str, Any], report: Dict[str, Any], prompt: np.ndarray, args, console) -> None:
    """`measure` of each runner in turn into `report["results"]`; a runner that fails is
    reported, not fatal."""
    for name, runner in runners.items():
        console.print(f"[dim]measuring {name} ...[/dim]")
        try:
            report["results"][name] = measure(
                runner, prompt, args.steps, report["settings"]["gen_tokens"], args.iters,
                args.warmup, args.canvas_iters, skip_generate=args.no_generate,
            )
        except Exception as e:
            report["results"][name] = {"error": f"{type(e).__name__}: {e}"}
        mx.clear_cache()


def _header(report: Dict[str, Any], console) -> None:
    m, s, mi = report["machine"], report["settings"], report["model"]
    console.print(
        f"[bold]machine[/bold] {m['cpu']} ({m['cores']} cores), MLX {m['mlx']} on {m['mlx_device']}, "
        f"BLAS: {m['blas']['name']} ({m['blas']['sgemm_gflops']} GFLOPS float32 matmul)"
    )
    console.print(
        f"[bold]model[/bold] {mi['source']}: {mi['layers']} layers ({mi['layer_types']}), hidden "
        f"{mi['hidden']}, experts {mi['experts']}, vocab {mi['vocab']}, canvas {mi['canvas']}, "
        f"bits {mi['quantized_bits'] or 'float'}, {mi['dtype']}, weights {mi['weights_gb']} GB"
    )
    console.print(
        f"[bold]settings[/bold] prompt {s['prompt_tokens']} tokens ({s['prompt']}), {s['steps']} "
        f"steps per canvas (fixed), generation {s['gen_tokens']} tokens, medians of {s['iters']} "
        f"after {s['warmup']} warm-up; ours on {s['lanes']['step']} lanes per step, "
        f"{s['lanes']['prefill']} in prefill"
    )


def print_report(report: Dict[str, Any], console, title: str = "mlx-diffgemma bench (seconds unless noted)",
                 extra: Optional[Callable[[str, Optional[str]], List[str]]] = None,
                 extra_columns: Sequence[str] = ()) -> None:
    """The header lines and one column per runner in `report["results"]`; `extra(name,
    metric)` adds the cells of `extra_columns` after each runner but the first."""
    from rich.table import Table

    _header(report, console)
    s, mi, results = report["settings"], report["model"], report["results"]
    names = list(results)
    table = Table(title=title)
    table.add_column("metric")
    for i, n in enumerate(names):
        table.add_column(report["labels"].get(n, n), justify="right")
        for col in extra_columns if i and extra else ():
            table.add_column(col, justify="right")
    rows = [
        (f"prefill {s['prompt_tokens']} tok (s)", "prefill_s", "prefill"),
        (f"denoising step, canvas {mi['canvas']} (s)", "step_s", "step"),
        (f"canvas at {s['steps']} steps (s)", "canvas_s", "canvas"),
        (f"generation {s['gen_tokens']} tok (tok/s)", "generate_tps", "generate"),
        ("peak memory (GB)", "peak_gb", None),
    ]
    for label, key, metric in rows:
        cells = [label]
        for i, n in enumerate(names):
            cells.append("error" if "error" in results[n] else _fmt(results[n].get(key)))
            if i and extra:
                cells += extra(n, metric)
        table.add_row(*cells)
    console.print(table)
    for n in names:
        if "error" in results[n]:
            console.print(f"[yellow]{n}: {results[n]['error']}[/yellow]")
    for note in report.get("notes", []):
        console.print(f"[dim]- {note}[/dim]")


def write_json(data: Dict[str, Any], path: Optional[str], console) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)
        console.print(f"wrote {path}")


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
    run.add_argument("--prompt-tokens", type=int, default=None,
                     help=f"prefill length N (default {PROMPT_TOKENS}, less when the model's context "
                     "is too short for it and the generation)")
    run.add_argument("--steps", type=int, default=8,
                     help="denoising steps per canvas, fixed (default 8; the release uses 48)")
    run.add_argument("--gen-tokens", type=int, default=None,
                     help="tokens to generate end to end (default: two canvases)")
    run.add_argument("--iters", type=int, default=3, help="timed repetitions (median)")
    run.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    run.add_argument("--canvas-iters", type=int, default=1, help="timed full canvases (median)")
    run.add_argument("--no-generate", action="store_true", help="skip the end-to-end generation")
    run.add_argument("--compile-decode", action="store_true",
                     help="run our decoder step through mx.compile (off by default: it did not pay "
                     "on the CPU backend; see BENCHMARKS.md)")
    run.add_argument("--lanes", type=int, default=None,
                     help="split our forward's tokens into this many lanes on separate streams "
                     "(default: one per CPU core on the CPU backend, one on a GPU; see lanes.py)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of the random prompt, the synthetic weights and the sampler (default 0)")
    run.add_argument("--mode", default="reference", choices=["reference", "fast"],
                     help="the denoiser: reference (default) or fast mode's (fast.py)")
    run.add_argument("--active-sizes", default=None, metavar="N,N,..",
                     help="also time one fast-mode step per number of computed positions "
                     "(e.g. 16,32,64,128,256): the decoder on those positions with the other "
                     "positions' keys and values stale, the LM head and the top-K sampler")
    run.add_argument("--memory-arithmetic", action="store_true",
                     help="print the peak-memory arithmetic of the real 26B-A4B mixed 4-bit "
                     "model (4K prompt, 256 new tokens) and exit")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def prepare(args, also_skip: Optional[Callable[[Dict[str, Any]], set]] = None) -> tuple:
    """(model, config, generation config, prompt, report) for a bench run: the model
    with `args`' decode switches, the random prompt (leaving out the special ids, and
    `also_skip(config)`), the report's fixed sections."""
    model, config, description = build_model(args)
    if args.compile_decode:
        model.compile_decode = True
    if args.lanes is not None:
        model.lanes = args.lanes
    gen_tokens = args.gen_tokens or 2 * model.canvas_length
    gen = bench_generation(args.steps, gen_tokens)
    note = fit_prompt(args, model, gen)
    skip = special_ids(model, config, getattr(model, "model_path", None)) | (also_skip(config) if also_skip else set())
    prompt = random_prompt(model.vocab_size, args.prompt_tokens, args.seed, skip)
    note = f"random ids, {len(skip)} special ids left out{note}"
    report = new_report(args, model, config, description, gen, gen_tokens, note)
    return model, config, gen, prompt, report


PROMPT_TOKENS = 512


def fit_prompt(args, model, gen: GenerationConfig) -> str:
    """Sets `args.prompt_tokens` to what the model's context holds beside the generation
    (the default 512, or less for a short context); refuses in one line a --prompt-tokens
    or --gen-tokens that does not fit. Returns a note for the report when it shortened."""
    context = int(model.args.max_position_embeddings)
    reserve = reserved_tokens(gen, model.canvas_length)
    room = context - reserve
    if room < 1:
        raise ValueError(f"--gen-tokens {gen.max_new_tokens} ({reserve} tokens in whole canvases) "
                         f"leaves no room for a prompt in the model's {context}-token context; "
                         "lower --gen-tokens")
    if args.prompt_tokens is None:
        args.prompt_tokens = min(PROMPT_TOKENS, room)
        return f", fitted to the {context}-token context" if room < PROMPT_TOKENS else ""
    if args.prompt_tokens + reserve > context:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens} + {reserve} generated exceed the model's "
                         f"{context}-token context; use --prompt-tokens {room} or less")
    return ""


def active_step_times(model, prompt: np.ndarray, sizes: Sequence[int], iters: int) -> Dict[str, float]:
    """Median seconds of one fast-mode step computing `n` canvas positions, per `n`: the
    decoder on those positions (the others' keys and values from a full first pass),
    the LM head and the top-K sampler's pieces."""
    C, V = model.canvas_length, model.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    canvas = mx.random.randint(0, V, (1, C), dtype=mx.int32)
    kv = [None] * len(model.layers)
    mx.eval(model.forward_positions(canvas, mx.arange(C), C, cache, kv), kv)
    out = {}
    for n in sorted(set(min(max(n, 1), C) for n in sizes)):
        idx = mx.arange(n)

        def step():
            logits = model.forward_positions(canvas[:, idx], idx, C, cache, list(kv))
            top = mx.argpartition(-logits, kth=63, axis=-1)[..., :64] if V > 64 else logits
            mx.eval(logits, top)

        step()
        out[str(n)] = statistics.median(timed(step) for _ in range(max(iters, 1)))
    return out


def print_active_steps(times: Dict[str, float], console) -> None:
    from rich.table import Table

    full = times.get(max(times, key=int))
    t = Table(title="fast-mode step by computed positions")
    for col in ("positions", "seconds", "vs the largest"):
        t.add_column(col, justify="right")
    for n, sec in times.items():
        t.add_row(n, f"{sec:.4f}", f"{sec / full:.2f}")
    console.print(t)


def print_memory_arithmetic(args, console) -> int:
    from .synthetic import hf_config, preset_args

    mem = memory_arithmetic(hf_config(preset_args("real")))
    console.print_json(data=mem)
    write_json({"memory_arithmetic": mem}, args.json, console)
    return 0


def main_bench(args) -> int:
    from rich.console import Console

    console = Console(width=max(Console().width, 120))
    if args.memory_arithmetic:
        return print_memory_arithmetic(args, console)
    model, _, gen, prompt, report = prepare(args)
    report["settings"]["mode"] = args.mode
    run_all({"ours": OursRunner(model, gen, seed=args.seed, mode=args.mode)}, report, prompt, args, console)
    print_report(report, console)
    if "error" in report["results"]["ours"]:
        write_json(report, args.json, console)
        raise ValueError(f"nothing was measured: {report['results']['ours']['error']}")
    if args.active_sizes:
        sizes = [int(x) for x in args.active_sizes.split(",") if x.strip()]
        report["active_step_s"] = active_step_times(model, prompt, sizes, args.iters)
        print_active_steps(report["active_step_s"], console)
    write_json(report, args.json, console)
    return 0

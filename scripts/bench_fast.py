#!/usr/bin/env python
"""Fast mode against reference mode on a trained toy model: accuracy, steps per canvas,
mean active positions per step, tokens per second and decoder work per generated token,
for reference mode, the full fast mode, each approximation alone, and mlx-vlm 0.7.10's
default sampler (confidence threshold) on the same MLX directory, in one run.

    python scripts/bench_fast.py --model toy-sudoku --n 100 [--json out.json]

Decoder work is counted, not timed (a tiny model's wall time is per-call overhead):
positions run through the layers, LM-head rows and self-conditioning entries, each
weighed by its FLOPs at the toy's shapes and, projected with the same per-step counts
scaled to a 256-token canvas, at the released 26B-A4B shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_diffgemma as md  # noqa: E402
from mlx_diffgemma.config import ModelArgs  # noqa: E402
from mlx_diffgemma.denoiser import MLXDenoiser  # noqa: E402
from mlx_diffgemma.drafter import generation_config, stream  # noqa: E402
from mlx_diffgemma.fast import FastDenoiser, FastOptions, Work  # noqa: E402

MODES: Dict[str, Optional[FastOptions]] = {
    "reference": None,
    "fast (defaults)": FastOptions(),
    "freeze (confidence) only": FastOptions(top_k=0, sc_top_k=0),
    "freeze (entropy) only": FastOptions(freeze="entropy", top_k=0, sc_top_k=0),
    "top-K sampling only": FastOptions(freeze=None, sc_top_k=0, skip_after_eos=False, renoise=True),
    "sparse self-cond. only": FastOptions(freeze=None, top_k=0, skip_after_eos=False, renoise=True),
    "fast, open renoised": FastOptions(renoise=True),
    "fast + active set": FastOptions(active_set=True),
    "fast + active set, refresh 1": FastOptions(active_set=True, refresh_every=1),
    "fast, no self-cond.": FastOptions(self_conditioning=False),
    "fast + repair": FastOptions(repair=True),
}


def position_flops(args: ModelArgs) -> float:
    """FLOPs of one canvas position through every layer (projections, dense MLP, routed
    experts; attention's mixing left out: it scales with the context, not the canvas)."""
    H = args.hidden_size
    total = 0.0
    for i in range(args.num_hidden_layers):
        hd, kv = args.head_dim_of(i), args.kv_heads_of(i)
        attn = H * (args.num_attention_heads * hd) * 2 + H * kv * hd * 2
        dense = 3 * H * args.intermediate_size
        experts = args.top_k_experts * 3 * H * args.moe_intermediate_size + H * args.num_experts
        total += 2 * (attn + dense + experts)
    return total


def work_flops(args: ModelArgs, work: Work, sc_k: Optional[int]) -> float:
    """FLOPs of `work` at the shapes of `args`: layers per position, the LM head per row,
    self-conditioning per row (its MLP, plus K or V embedding rows)."""
    H, V = args.hidden_size, args.vocab_size
    sc_mlp = 2 * 3 * H * args.intermediate_size
    sc_read = 2 * H * (sc_k or V)
    return (work.positions * position_flops(args) + work.lm_head_rows * 2 * H * V
            + work.sc_rows * (sc_mlp + sc_read))


def reference_work(steps: List[int], canvas: int) -> Work:
    n = sum(steps) * canvas
    sc = sum(max(s - 1, 0) for s in steps) * canvas  # no self-conditioning at a first step
    return Work(steps=sum(steps), positions=n, lm_head_rows=n, sc_rows=sc)


def run_mode(model, tok, prompts, check, opts: Optional[FastOptions], max_new: int) -> Dict[str, Any]:
    C = model.canvas_length
    total = Work()
    ok, steps, tokens, canvases = 0, [], 0, []
    t0 = time.perf_counter()
    for i, (text, ids) in enumerate(prompts):
        gen = generation_config(model, max_new_tokens=max_new)
        noise = md.SeededNoise(i)
        den = MLXDenoiser(model, gen, noise=noise) if opts is None else FastDenoiser(model, gen, noise=noise, options=opts)
        s = list(stream(den, tok, ids))[-1]
        ok += bool(check(text, s.text))
        steps += s.steps_per_canvas
        canvases.append(s.canvases)
        tokens += len(s.tokens)
        w = reference_work(s.steps_per_canvas, C) if opts is None else den.work
        for f in ("steps", "positions", "lm_head_rows", "sc_rows"):
            setattr(total, f, getattr(total, f) + getattr(w, f))
    seconds = time.perf_counter() - t0
    return {
        "accuracy": ok / len(prompts),
        "steps_per_canvas": float(np.mean(steps)),
        "canvases": float(np.mean(canvases)),
        "mean_active": total.positions / max(total.steps, 1),
        "tokens_per_second": tokens / seconds,
        "tokens": tokens,
        "work": total,
        "sc_k": None if opts is None else (opts.sc_top_k or None),
    }


def real_shape_projection(r: Dict[str, Any], canvas: int, real: ModelArgs) -> float:
    """Work per token at the released shapes if every per-step count scaled from the
    toy's canvas to 256 positions (same steps, same active fractions)."""
    w, f = r["work"], 256 / canvas
    scaled = Work(steps=w.steps, positions=w.positions * f, lm_head_rows=w.lm_head_rows * f,
                  sc_rows=w.sc_rows * f)
    return work_flops(real, scaled, r["sc_k"]) / max(r["tokens"], 1)


def mlx_vlm_mode(path: Path, prompts, check, max_new: int) -> Dict[str, Any]:
    """mlx-vlm 0.7.10's own diffusion generation with its default sampler."""
    import importlib

    import mlx.core as mx
    from mlx_vlm.utils import load_model

    from mlx_diffgemma.loader import load_tokenizer

    d = importlib.import_module("mlx_vlm.generate.diffusion")
    model = load_model(path)
    wrapper = load_tokenizer(path)
    eos = set(wrapper.eos_token_ids)

    class Stop:  # the stopping-criteria surface mlx-vlm's loop touches
        def add_eos_token_ids(self, ids) -> None:
            eos.update([ids] if isinstance(ids, int) else ids)

        def __call__(self, t) -> bool:
            return int(t) in eos

    class Detok:  # mlx-lm's streaming detokenizer under mlx-vlm's call signature
        inner = wrapper.detokenizer

        def reset(self):
            self.inner.reset()

        def add_token(self, token, skip_special_token_ids=None):
            if int(token) not in (skip_special_token_ids or ()):
                self.inner.add_token(int(token))

        def finalize(self):
            self.inner.finalize()

        @property
        def last_segment(self):
            return self.inner.last_segment

    class Tok:  # the processor/tokenizer surface mlx-vlm's loop touches
        detokenizer = Detok()
        stopping_criteria = Stop()

    ok, steps, tokens = 0, [], 0
    t0 = time.perf_counter()
    for i, (text, ids) in enumerate(prompts):
        mx.random.seed(i)
        out, n, blocks, done = "", 0, 0, 0
        for r in d.stream_diffusion_generate(model, Tok, Tok, mx.array([ids]), None, None,
                                             max_tokens=max_new, skip_special_token_ids=sorted(eos)):
            out += r.text
            n = r.generation_tokens
            done = r.diffusion_denoising_steps
            blocks += bool(r.diffusion_block_complete)
        ok += bool(check(text, out))
        steps.append(done / max(blocks, 1))
        tokens += n
    return {"accuracy": ok / len(prompts), "steps_per_canvas": float(np.mean(steps)),
            "tokens_per_second": tokens / (time.perf_counter() - t0)}


def toy_task(hf_dir: Path, n: int):
    """The held-out prompts of a toy model trained by scripts/train_toy.py (its
    heldout.json names the task) and the task's checker."""
    from transformers import AutoTokenizer

    import train_toy

    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    data = json.loads((hf_dir / "heldout.json").read_text())
    get_task = getattr(train_toy, "get_task", None)
    task = get_task(data.get("task", "sudoku")) if get_task else None
    items = data["puzzles"][:n]
    if task is None:  # a training script without tasks: the sudoku toy
        return [(it["puzzle"], train_toy.prompt_ids(hf, it["puzzle"])) for it in items], train_toy.solves
    by_prompt = {it["puzzle"]: it for it in items}
    prompts = [(it["puzzle"], train_toy.prompt_ids(hf, it["puzzle"], task)) for it in items]
    return prompts, lambda prompt, answer: task.check(by_prompt[prompt], answer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-sudoku", help="a packaged toy model (toy-sudoku, toy-narayana) or its hf/ folder")
    p.add_argument("--n", type=int, default=100, help="held-out prompts (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: two canvases")
    p.add_argument("--no-mlx-vlm", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from mlx_diffgemma.paths import packaged_model
    from mlx_diffgemma.synthetic import preset_args

    mlx_dir = packaged_model(a.model) or Path(a.model)
    hf_dir = packaged_model(a.model, prefer="hf") or Path(a.model)
    model, tok = md.load(mlx_dir)
    prompts, check = toy_task(hf_dir, a.n)
    max_new = a.max_new_tokens or 2 * model.canvas_length
    real = preset_args("real")
    rows: Dict[str, Dict[str, Any]] = {}
    for name, opts in MODES.items():
        r = run_mode(model, tok, prompts, check, opts, max_new)
        r["work_per_token"] = work_flops(model.args, r["work"], r["sc_k"]) / max(r["tokens"], 1)
        r["real_work_per_token"] = real_shape_projection(r, model.canvas_length, real)
        rows[name] = r
    ref = rows["reference"]
    print(f"{a.model}: {len(prompts)} held-out prompts, max_new_tokens {max_new}, seeds 0..{len(prompts) - 1}")
    print(f"{'mode':26s} {'acc':>6s} {'steps/cv':>8s} {'active':>7s} {'tok/s':>7s} {'work/tok':>9s} "
          f"{'x less':>6s} {'26B x less':>10s} {'x tok/s':>7s}")
    for name, r in rows.items():
        print(f"{name:26s} {r['accuracy']:6.3f} {r['steps_per_canvas']:8.2f} {r['mean_active']:7.1f} "
              f"{r['tokens_per_second']:7.1f} {r['work_per_token'] / 1e6:8.2f}M "
              f"{ref['work_per_token'] / r['work_per_token']:6.2f} "
              f"{ref['real_work_per_token'] / r['real_work_per_token']:10.2f} "
              f"{r['tokens_per_second'] / ref['tokens_per_second']:7.2f}")
    H, V, K = real.hidden_size, real.vocab_size, FastOptions().sc_top_k
    print(f"26B-A4B FLOPs per computed canvas position: layers {position_flops(real) / 1e9:.2f} G, "
          f"LM head {2 * H * V / 1e9:.2f} G, self-conditioning dense {2 * H * V / 1e9:.2f} G / "
          f"top-{K} {2 * H * K / 1e9:.5f} G (+ its MLP {6 * H * real.intermediate_size / 1e9:.3f} G)")
    if not a.no_mlx_vlm:
        v = mlx_vlm_mode(mlx_dir, prompts, check, max_new)
        rows["mlx-vlm 0.7.10 default"] = v
        print(f"{'mlx-vlm 0.7.10 default':26s} {v['accuracy']:6.3f} {v['steps_per_canvas']:8.2f} "
              f"{'-':>7s} {v['tokens_per_second']:7.1f}")
    if a.json:
        out = {k: {kk: vv for kk, vv in r.items() if kk != "work"} | (
            {"work": vars(r["work"]) | {"per_step": None}} if "work" in r else {}) for k, r in rows.items()}
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

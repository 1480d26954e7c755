#!/usr/bin/env python
"""Speculative drafting on the toy Sudoku task, in one run.

``python scripts/bench_speculative.py [--target DIR] [--minutes 3] [--n 60] [--k 4,8,17] [--steps 1,2]``

1. The target: a tiny autoregressive Gemma 4 (`Gemma4ForCausalLM`, the toy drafter's
   shapes, its tokenizer) trained on the same 4x4 Sudoku puzzles as
   `mlx_diffgemma/assets/toy-sudoku` with train_toy.py's data and loop (next-token loss on
   the answer), saved to `--target` (reused when it already holds one).
2. On `--n` held-out puzzles: the target alone (mlx-lm greedy, `generate_step`) and the
   target with toy-sudoku drafting (`speculative_generate`, greedy) per (k, steps):
   acceptance length (tokens kept per round), target forwards per token, drafter forwards
   per token, tokens per second, solved rate, and whether every output equals the target
   alone's (greedy: it must).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import train_toy as toy  # noqa: E402

DRAFTER = ROOT / "mlx_diffgemma" / "assets" / "toy-sudoku"
ANSWER = 17  # 16 digits and <turn|>


def target_text(tokenizer) -> dict:
    """The toy drafter's text stack as an autoregressive Gemma 4's config (the released
    26B-A4B's layout: MoE blocks, keys as values in full layers)."""
    drafter = json.loads((DRAFTER / "hf" / "config.json").read_text())["text_config"]
    keep = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts",
            "top_k_experts", "num_hidden_layers", "layer_types", "num_attention_heads", "num_key_value_heads",
            "head_dim", "sliding_window", "max_position_embeddings", "rms_norm_eps")
    text = {k: drafter[k] for k in keep}
    text.update(global_head_dim=2 * text["head_dim"], num_global_key_value_heads=1, enable_moe_block=True,
                attention_k_eq_v=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                vocab_size_per_layer_input=text["vocab_size"], use_double_wide_mlp=False,
                final_logit_softcapping=30.0, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=toy.eos_ids(tokenizer))
    return text


def ar_loss(model, config, enc_ids, clean, args, gen):
    """Next-token cross-entropy on the answer (16 digits and <turn|>) after the prompt."""
    import torch

    answer = clean[:, :ANSWER]
    ids = torch.cat([enc_ids, answer], dim=1)
    logits = model(ids[:, :-1]).logits[:, enc_ids.shape[1] - 1 :]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), answer.reshape(-1))


def train_target(out: Path, minutes: float, seed: int = 0) -> None:
    import random

    import torch
    from transformers import AutoTokenizer, Gemma4ForCausalLM, Gemma4TextConfig

    t_start = time.time()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread waits on no busy sibling
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(DRAFTER / "hf")
    text = target_text(tokenizer)
    config = Gemma4TextConfig(**text)
    model = Gemma4ForCausalLM(config)
    model.set_experts_implementation("eager")
    model.train()
    maker = toy.PuzzleMaker()
    train_grids, _ = toy.split_grids(0)  # the drafter's split: its held-out grids stay unseen
    rng, cache = random.Random(seed + 2), {}

    def batch():
        prompts, targets = [], []
        for _ in range(32):
            grid = rng.choice(train_grids)
            p = maker.sample(grid, rng.randint(toy.MIN_BLANKS, toy.MAX_BLANKS), rng)
            if p not in cache:
                cache[p] = (toy.prompt_ids(tokenizer, p), toy.canvas_ids(tokenizer, grid))
            prompts.append(cache[p][0])
            targets.append(cache[p][1])
        return torch.tensor(prompts), torch.tensor(targets)

    args = SimpleNamespace(lr=3e-3, steps=700, minutes=minutes, log_every=50, eval_every=0, patience=1)
    step, why, _ = toy.optimize(model, config, batch, None, args, None, t_start, loss_fn=ar_loss)
    print(f"target trained: {step} steps, {time.time() - t_start:.0f} s ({why})", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    finish_target_dir(out, text, dict(steps=step, seconds=round(time.time() - t_start), stop=why,
                                      minutes=minutes, seed=seed))


def finish_target_dir(out: Path, text: dict, info: dict) -> None:
    """config.json as the released one has it, the drafter's tokenizer, the training record."""
    cfg = json.loads((out / "config.json").read_text())
    # transformers 5 writes these per layer only; the released config.json (and mlx-lm) at the top.
    cfg.update(global_head_dim=text["global_head_dim"], num_global_key_value_heads=text["num_global_key_value_heads"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / f).write_bytes((DRAFTER / "hf" / f).read_bytes())
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")


def puzzles(n: int) -> list:
    """The first `n` held-out puzzles of toy-sudoku (a spread of blank counts)."""
    return json.loads((DRAFTER / "hf" / "heldout.json").read_text())["puzzles"][:n]


def run_target_alone(target, prompts) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    outs, tic = [], time.perf_counter()
    for ids in prompts:
        toks = []
        for tok, _ in generate_step(mx.array(ids), target, max_tokens=ANSWER, sampler=lambda x: mx.argmax(x, -1)):
            toks.append(int(tok))
            if toks[-1] in (1, 5):  # <eos>, <turn|>
                break
        outs.append(toks)
    seconds = time.perf_counter() - tic
    n = sum(len(o) for o in outs)
    return dict(outputs=outs, tokens=n, seconds=seconds, target_forwards=n)


def run_speculative(target, ttok, drafter, dtok, prompts, k: int, steps: int, adaptive: bool = False) -> dict:
    from mlx_diffgemma.generation.events import SpeculativeSummary
    from mlx_diffgemma.generation.speculative import speculative_stream_generate

    outs, rounds, tf, df, tic = [], 0, 0, 0, time.perf_counter()
    for i, ids in enumerate(prompts):
        s = [e for e in speculative_stream_generate(target, ttok, drafter, dtok, ids, k=k, draft_steps=steps,
                                                    adaptive_k=adaptive, max_new_tokens=ANSWER, seed=i)
             if isinstance(e, SpeculativeSummary)][0]
        outs.append(s.tokens)
        rounds, tf, df = rounds + s.canvases, tf + s.target_forwards, df + s.drafter_forwards
    seconds = time.perf_counter() - tic
    n = sum(len(o) for o in outs)
    return dict(outputs=outs, tokens=n, seconds=seconds, target_forwards=tf, drafter_forwards=df, rounds=rounds)


def solved(tokenizer, items, outs) -> float:
    ok = [toy.solves(it["puzzle"], tokenizer.decode(o[:16])) for it, o in zip(items, outs)]
    return float(np.mean(ok))


def report(name, r, base, items, tokenizer) -> str:
    same = sum(a == b for a, b in zip(r["outputs"], base["outputs"]))
    acc = r["tokens"] / r.get("rounds", r["tokens"])
    df = r.get("drafter_forwards", 0) / r["tokens"]
    return (f"| {name} | {acc:.2f} | {r['target_forwards'] / r['tokens']:.3f} | {df:.2f} | "
            f"{r['tokens'] / r['seconds']:.0f} | "
            f"{r['tokens'] / r['seconds'] / (base['tokens'] / base['seconds']):.2f}x | "
            f"{solved(tokenizer, items, r['outputs']):.3f} | {same}/{len(items)} |")


# -- cost model at the real shapes ----------------------------------------------------------

# google/diffusiongemma-26B-A4B (docs/real-config.md); the autoregressive Gemma 4 26B-A4B
# target has the same text stack. Stored as mlx-community's 4-bit recipe does: experts 4-bit,
# attention, dense MLP, router and the (tied) embedding 8-bit, group 64 (4.5 and 8.5 bits).
LAYERS, EXPERTS, TOP_K = 30, 128, 8
EXPERT_BYTES = (2 * 704 * 2816 + 2816 * 704) * 4.5 / 8  # one expert of one layer: 3.3 MB
SHARED_BYTES = 1.6e9 * 8.5 / 8  # attention 1.1B + dense MLP 0.5B, read by every forward
HEAD_BYTES = 262144 * 2816 * 8.5 / 8  # the LM head (tied embedding), read by every forward
ACTIVE_FLOPS = 2 * 3.8e9 + 2 * 262144 * 2816  # per position: ~3.8B active parameters + LM head


def experts_read(n: int, independent: bool = True) -> float:
    """Distinct experts a forward over `n` positions reads per layer: routing independent
    across positions (the worst case), or identical (the best)."""
    if not independent:
        return float(TOP_K)
    return EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** n)


def forward_seconds(n: int, bandwidth: float, flops: float, independent: bool = True) -> float:
    """One forward of the 26B-A4B over `n` positions, roofline: weight bytes over bandwidth
    or arithmetic over compute, whichever is slower (the KV cache is left out: short contexts)."""
    weight_bytes = SHARED_BYTES + HEAD_BYTES + LAYERS * experts_read(n, independent) * EXPERT_BYTES
    return max(weight_bytes / bandwidth, n * ACTIVE_FLOPS / flops)


def speculative_tps(k: int, steps: int, accept: float, bandwidth: float, flops: float,
                    independent: bool = True) -> float:
    """Tokens per second when each round keeps `accept` tokens: `steps` drafter forwards over
    a k-token canvas, one encoder forward of the kept tokens, one target forward of k + 1."""
    f = lambda n: forward_seconds(n, bandwidth, flops, independent)  # noqa: E731
    return accept / (steps * f(k) + f(max(1, round(accept))) + f(k + 1))


def cost_model_table(bandwidth: float = 400e9, flops: float = 30e12) -> str:
    alone = 1 / forward_seconds(1, bandwidth, flops)
    lines = [f"Target alone: {alone:.0f} tok/s at {bandwidth / 1e9:.0f} GB/s, {flops / 1e12:.0f} TFLOPS "
             "(weights read once per token).", "",
             "| k | drafter steps | tok/s at acceptance 2 / 4 / 6 / all (k+1) | acceptance to break even |",
             "|---|---|---|---|"]
    for k in (2, 4, 8, 16):
        for steps in (1, 2):
            tps = [speculative_tps(k, steps, a, bandwidth, flops) for a in (2, 4, 6, k + 1)]
            even = next((a for a in np.arange(1, k + 1.01, 0.1)
                         if speculative_tps(k, steps, a, bandwidth, flops) >= alone), None)
            shown = " / ".join(f"{t:.0f}" if a <= k + 1 else "-" for t, a in zip(tps, (2, 4, 6, k + 1)))
            lines.append(f"| {k} | {steps} | {shown} | {'never' if even is None else f'{even:.1f}'} |")
    best = speculative_tps(4, 1, 5, bandwidth, flops, independent=False)
    lines.append("")
    lines.append(f"Best case (every position routed to the same 8 experts), k=4, 1 step, all 5 kept: "
                 f"{best:.0f} tok/s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=str(ROOT / "benchmarks" / "toy-sudoku-target"),
                   help="the trained target's directory (trained here when it holds none)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time cap of the target")
    p.add_argument("--n", type=int, default=60, help="held-out puzzles")
    p.add_argument("--k", default="4,8,17", help="draft tokens per round, comma-separated")
    p.add_argument("--steps", default="1,2", help="drafter denoising steps per round, comma-separated")
    p.add_argument("--adaptive", action="store_true", help="also run each (k, steps) with adaptive k (up to k)")
    p.add_argument("--cost-model", action="store_true", help="print only the cost model at the real shapes")
    args = p.parse_args(argv)
    for bw in (400e9, 800e9):
        print(cost_model_table(bw), "\n", flush=True)
    if args.cost_model:
        return 0

    target_dir = Path(args.target)
    if not (target_dir / "config.json").exists():
        train_target(target_dir, args.minutes)
    import mlx_lm

    from mlx_diffgemma import load

    target, ttok = mlx_lm.load(str(target_dir))
    drafter, dtok = load(DRAFTER / "mlx")
    items = puzzles(args.n)
    prompts = [toy.prompt_ids(dtok._tokenizer, it["puzzle"]) for it in items]
    run_target_alone(target, prompts[:2])  # warm-up
    base = run_target_alone(target, prompts)
    lines = ["| run | acceptance (tok/round) | target fwd/token | drafter fwd/token | tok/s | vs target | solved "
             "| same as target |",
             "|---|---|---|---|---|---|---|---|",
             report("target alone (mlx-lm greedy)", base, base, items, dtok)]
    for k in [int(x) for x in args.k.split(",")]:
        for steps in [int(x) for x in args.steps.split(",")]:
            for adaptive in (False, True) if args.adaptive else (False,):
                r = run_speculative(target, ttok, drafter, dtok, prompts, k, steps, adaptive)
                name = f"drafted, k={'<=' if adaptive else ''}{k}{' adaptive' if adaptive else ''}, {steps} step(s)"
                lines.append(report(name, r, base, items, dtok))
                print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

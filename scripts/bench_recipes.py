#!/usr/bin/env python
"""What each quantization recipe costs and keeps (BENCHMARKS.md, "Recipes").

    python scripts/bench_recipes.py memory          # the real model's memory arithmetic
    python scripts/bench_recipes.py layers          # real-shape matrices: error vs float
    python scripts/bench_recipes.py toy [--n 100]   # toy-sudoku accuracy / steps / tokens per forward

* memory: per recipe, from config.json alone (`sizes.estimate`, `bench.memory_arithmetic`):
  the file size, the text weights our runtime holds (the vision tower is read only for an image),
  the KV cache at a 4K and a 32K prompt (+ one 256-token canvas), one step's
  activations, and the totals against a 16 GB Mac's ~11 GB working set (10.5 GB target).
* layers: random heavy-tailed (Student-t, 5 degrees of freedom) weights at the released
  model's shapes, each kind quantized as the recipe quantizes it (mx.quantize /
  mx.dequantize, the converter's own calls): relative RMS error of the outputs for
  random inputs, and for the LM head (the tied embedding, a 32K-row slice of the 262K
  vocabulary) the argmax agreement and max |logit error| after the 30.0 softcap, on
  hidden states that lean slightly towards a target row (a winner about 5 sigma up, near-ties common).
* toy: the trained toy model (mlx_diffgemma/assets/toy-sudoku/hf) converted with every
  recipe and float32, each run on the same held-out puzzles with the same seed through
  this package's drafter (scripts/eval_toy.py's `evaluate`): solve rate, mean denoising
  steps per canvas, tokens per forward.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

QUANTIZED = ("8bit", "mixed-4", "mxfp4-mixed", "4bit", "3bit-mixed", "2bit-mixed")
TOY = ROOT / "mlx_diffgemma" / "assets" / "toy-sudoku" / "hf"


def memory(args) -> None:
    from estimate_sizes import REAL_CONFIG

    from mlx_diffgemma.bench.bench import memory_arithmetic
    from mlx_diffgemma.models.sizes import estimate

    print("| recipe | experts | file GB | text weights GB | KV 4K GB | KV 32K GB | step GB (4K) | total 4K GB "
          "| total 32K GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in QUANTIZED + ("bf16",):
        e = estimate(REAL_CONFIG, r)
        m4 = memory_arithmetic(REAL_CONFIG, r, prompt=4096)
        m32 = memory_arithmetic(REAL_CONFIG, r, prompt=32768)
        step = m4["step_activations_gb"] + m4["layer_activations_gb"]
        step32 = m32["step_activations_gb"] + m32["layer_activations_gb"]
        w = e["text_bytes"] / 1e9
        ex = e["by_kind"]["experts"]["bits_per_weight"]
        print(f"| {r} | {ex:.2f} b/w | {e['gb']:.2f} | {w:.2f} | {m4['kv_cache_gb']:.2f} | "
              f"{m32['kv_cache_gb']:.2f} | {step:.2f} | {w + m4['kv_cache_gb'] + step:.2f} | "
              f"{w + m32['kv_cache_gb'] + step32:.2f} |")


def _heavy(rng, shape, fan_in):
    import numpy as np

    return (rng.standard_t(5, size=shape) / np.sqrt(5 / 3) / np.sqrt(fan_in)).astype(np.float32)


def layers(args) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_diffgemma.models.recipes import make_recipe

    rng = np.random.default_rng(0)
    H, E, I, MI, V = 2816, 8, 2112, 704, 32768
    # kind -> (a runtime tensor name of that kind, list of weight shapes applied in turn)
    mats = {
        "attention": ("model.decoder.layers.0.self_attn.q_proj.weight", [(4096, H)]),
        "dense_mlp": ("model.decoder.layers.0.mlp.down_proj.weight", [(H, I)]),
        "experts": ("model.decoder.layers.0.experts.down_proj.weight", [(E, 2 * MI, H), (E, H, MI)]),
        "embedding": ("model.decoder.embed_tokens.weight", [(V, H)]),
    }
    weights = {k: [mx.array(_heavy(rng, s, s[-1])) for s in shapes] for k, (_, shapes) in mats.items()}
    tokens = 64
    x = mx.array(rng.standard_normal((tokens, H)).astype(np.float32))
    emb = weights["embedding"][0]
    targets = mx.array(rng.integers(0, V, size=tokens))
    rows = emb[targets]
    h = 0.1 * rows / mx.linalg.norm(rows, axis=-1, keepdims=True) * np.sqrt(H) + x

    xi = mx.array(rng.standard_normal((tokens, I)).astype(np.float32))

    def run(kind, ws):
        if kind == "experts":  # one expert: gelu(gate) * up, then down
            gu = x @ ws[0][0].T
            g, u = gu[:, :MI], gu[:, MI:]
            return (nn.gelu_approx(g) * u) @ ws[1][0].T
        if kind == "dense_mlp":
            return xi @ ws[0].T
        if kind == "embedding":  # the tied LM head, softcapped as the model does
            return 30.0 * mx.tanh((h @ ws[0].T) / 30.0)
        return x @ ws[0].T

    ref = {k: run(k, w) for k, w in weights.items()}
    mx.eval(ref)
    print("| recipe | attention q_proj rel. err | dense down_proj rel. err | expert MLP rel. err "
          "| LM head rel. err | LM head argmax agreement | LM head max abs logit err |")
    print("|---|---|---|---|---|---|---|")
    for r in QUANTIZED:
        recipe = make_recipe(r)
        cells = []
        for kind, (name, shapes) in mats.items():
            q = recipe.quant_for(name, shapes[0])
            ws = weights[kind]
            if q is not None:
                bits, group, mode = q
                ws = [mx.dequantize(*mx.quantize(w, group_size=group, bits=bits, mode=mode),
                                    group_size=group, bits=bits, mode=mode) for w in ws]
            y = run(kind, ws)
            rel = float(mx.sqrt(mx.mean((y - ref[kind]) ** 2) / mx.mean(ref[kind] ** 2)))
            cells.append(f"{rel:.4f}")
            if kind == "embedding":
                agree = float(mx.mean(mx.argmax(y, -1) == mx.argmax(ref[kind], -1)))
                cells += [f"{agree:.3f}", f"{float(mx.max(mx.abs(y - ref[kind]))):.3f}"]
            del ws, y
            mx.clear_cache()
        print(f"| {r} | {' | '.join(cells)} |")


def toy(args) -> None:
    from eval_toy import evaluate, make_mlx_backend
    from transformers import AutoConfig, AutoTokenizer

    from mlx_diffgemma.convert.commands import convert

    tokenizer = AutoTokenizer.from_pretrained(str(TOY))
    canvas = AutoConfig.from_pretrained(str(TOY)).canvas_length
    held = json.loads((TOY / "heldout.json").read_text())["puzzles"][: args.n]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in ("fp32",) + QUANTIZED:
            out = Path(tmp) / "recipes" / r
            s = convert(TOY, out, recipe=r, progress=False, verbose=False)
            res = evaluate(make_mlx_backend(out, args.seed), tokenizer, held, canvas, 2 * canvas)
            res["bits_per_weight"] = s["text_bits_per_weight"]
            results[r] = res
            print(f"{r}: {res}", file=sys.stderr)
    base = results["fp32"]
    print(f"toy-sudoku, {args.n} held-out puzzles, seed {args.seed}, max_new_tokens {2 * canvas}")
    print("| recipe | text bits/weight | solve rate | Δ vs float | mean steps / canvas | Δ | tokens / forward | Δ |")
    print("|---|---|---|---|---|---|---|---|")
    for r, res in results.items():
        print(f"| {r} | {res['bits_per_weight']:.2f} | {res['solve_rate']:.3f} | "
              f"{res['solve_rate'] - base['solve_rate']:+.3f} | {res['mean_steps_per_canvas']:.2f} | "
              f"{res['mean_steps_per_canvas'] - base['mean_steps_per_canvas']:+.2f} | "
              f"{res['tokens_per_forward']:.3f} | {res['tokens_per_forward'] - base['tokens_per_forward']:+.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("memory", "layers", "toy"))
    ap.add_argument("--n", type=int, default=100, help="toy: held-out puzzles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="toy: also write the results here")
    args = ap.parse_args(argv)
    {"memory": memory, "layers": layers, "toy": toy}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

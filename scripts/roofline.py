#!/usr/bin/env python
"""The denoising step at the released shapes on Apple GPUs: a roofline.

    python scripts/roofline.py [--recipe mixed-4] [--context 1024] [--active 32]

Per step, from the released config (sizes.py's byte counts of the recipe, bench_fast.py's
FLOPs per position): the arithmetic (layers, attention over the cached context and the
canvas, LM head, self-conditioning) and the bytes read (every non-expert weight, the
experts the step's positions route to, the KV cache), each turned into time on a chip's
published FP16 peak and memory bandwidth. The step takes at least the larger of the two;
the table says which bounds it. A reference step computes all 256 positions with the
dense self-conditioning product; a fast step computes n positions (the active set) with
top-64 self-conditioning.

Assumptions, stated where they matter: peaks, not what kernels reach (MLX's quantized
matmuls run below peak, which only makes compute weigh more); experts touched as if the
router picked 8 of 128 uniformly and independently per position (real routing is
skewed, so fewer distinct experts and fewer bytes: the bandwidth time is an upper
bound); the 1/n-th of a weight read again by each of n positions stays in cache.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fast import position_flops  # noqa: E402

from mlx_diffgemma.bench.synthetic import hf_config, preset_args  # noqa: E402
from mlx_diffgemma.models.config import ModelArgs  # noqa: E402
from mlx_diffgemma.models.sizes import estimate  # noqa: E402


@dataclass(frozen=True)
class Chip:
    name: str
    tflops: float  # FP16 peak (Apple GPUs run FP16 at the FP32 rate)
    gbps: float  # memory bandwidth
    source: str


# Bandwidths are Apple's published figures. Apple published 27.2 TFLOPS for the 76-core
# M2 Ultra (Mac Pro page); the others are GPU cores x 128 ALUs x 2 FLOP x clock as GPU
# databases list them (e.g. hmc-tech.com: M3 Max 40-core 14.32 TFLOPS at 1398 MHz, M4 Max
# at 1678 MHz). FP16 runs at the FP32 rate on Apple GPUs (philipturner/metal-benchmarks).
CHIPS = [
    Chip("M2 Max (38-core GPU)", 13.6, 400, "half the M2 Ultra's 27.2 TFLOPS (Apple); 400 GB/s (Apple)"),
    Chip("M3 Max (40-core GPU)", 14.3, 400, "5120 ALUs x 2 x 1.398 GHz; 400 GB/s (Apple)"),
    Chip("M4 Max (40-core GPU)", 17.2, 546, "5120 ALUs x 2 x 1.678 GHz; 546 GB/s (Apple)"),
    Chip("M2 Ultra (76-core GPU)", 27.2, 800, "27.2 TFLOPS and 800 GB/s (Apple)"),
    Chip("M3 Ultra (80-core GPU)", 28.6, 819, "10240 ALUs x 2 x 1.398 GHz; 819 GB/s (Apple)"),
]
SC_TOP_K = 64


def attention_flops(args: ModelArgs, n: int, context: int) -> float:
    """Scores and weighted values of n canvas queries over the keys they see: the cached
    context (a sliding layer's last window) and the whole canvas."""
    total = 0.0
    for i, kind in enumerate(args.layer_types):
        keys = (min(context, args.sliding_window) if kind == "sliding_attention" else context) + args.canvas_length
        total += 4 * n * args.num_attention_heads * args.head_dim_of(i) * keys
    return total


def step_flops(args: ModelArgs, n: int, context: int, dense_sc: bool) -> Dict[str, float]:
    H, V = args.hidden_size, args.vocab_size
    return {
        "layers": n * position_flops(args),
        "attention": attention_flops(args, n, context),
        "lm_head": n * 2 * H * V,
        "self_cond": n * (2 * H * (V if dense_sc else SC_TOP_K) + 6 * H * args.intermediate_size),
    }


def experts_touched(args: ModelArgs, n: int) -> float:
    """Expected distinct experts per layer that n positions route to (uniform routing)."""
    E, k = args.num_experts, args.top_k_experts
    return E * (1 - (1 - k / E) ** n)


def step_bytes(args: ModelArgs, kinds: Dict[str, Dict[str, float]], n: int, context: int,
               dense_sc: bool, act_bytes: int = 2) -> Dict[str, float]:
    """Bytes a step reads: the weights every step needs, the experts its n positions route
    to, the embedding again for dense self-conditioning, and the KV cache."""
    always = sum(kinds[k]["bytes"] for k in ("embedding", "attention", "dense_mlp", "router",
                                             "self_conditioning", "norms_and_scalars"))
    kv = 0
    for i, kind in enumerate(args.layer_types):
        kept = (min(context, args.sliding_window) if kind == "sliding_attention" else context) + args.canvas_length
        kv += 2 * args.kv_heads_of(i) * args.head_dim_of(i) * kept * act_bytes
    return {
        "weights": always,
        "experts": kinds["experts"]["bytes"] * experts_touched(args, n) / args.num_experts,
        "sc_embedding": kinds["embedding"]["bytes"] if dense_sc else 0.0,
        "kv_cache": kv,
    }


def step_time(chip: Chip, flops: float, nbytes: float) -> Dict[str, float]:
    c, b = flops / (chip.tflops * 1e12), nbytes / (chip.gbps * 1e9)
    return {"compute_ms": 1e3 * c, "bytes_ms": 1e3 * b, "ms": 1e3 * max(c, b),
            "bound": "compute" if c >= b else "bandwidth"}


def crossover(args, kinds, chip: Chip, context: int) -> int:
    """The smallest active set whose fast step is compute-bound (below it: bandwidth)."""
    for n in range(1, args.canvas_length + 1):
        t = step_time(chip, sum(step_flops(args, n, context, False).values()),
                      sum(step_bytes(args, kinds, n, context, False).values()))
        if t["bound"] == "compute":
            return n
    return args.canvas_length + 1


def tables(recipe: str, context: int, sizes: List[int], active: int, refresh: List[int]) -> None:
    args = preset_args("real")
    kinds = estimate(hf_config(args), recipe)["by_kind"]
    C = args.canvas_length
    ref_f = step_flops(args, C, context, True)
    ref_b = step_bytes(args, kinds, C, context, True)
    print(f"released shapes, recipe {recipe}, context {context} tokens; reference step at {C} positions:")
    print("  FLOPs: " + ", ".join(f"{k} {v / 1e12:.3f} T" for k, v in ref_f.items())
          + f"; total {sum(ref_f.values()) / 1e12:.2f} TFLOP")
    print("  bytes: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in ref_b.items())
          + f"; total {sum(ref_b.values()) / 1e9:.2f} GB")
    print("\n| chip | FP16 TFLOPS | GB/s | reference step: compute ms | bytes ms | bound "
          "| fast step at 256: ms | compute-bound from n = |")
    print("|---|---|---|---|---|---|---|---|")
    for chip in CHIPS:
        r = step_time(chip, sum(ref_f.values()), sum(ref_b.values()))
        f = step_time(chip, sum(step_flops(args, C, context, False).values()),
                      sum(step_bytes(args, kinds, C, context, False).values()))
        print(f"| {chip.name} | {chip.tflops} | {chip.gbps:.0f} | {r['compute_ms']:.0f} | {r['bytes_ms']:.0f} "
              f"| {r['bound']} ({r['compute_ms'] / r['bytes_ms']:.1f}x) | {f['ms']:.0f} "
              f"| {crossover(args, kinds, chip, context)} |")
    print("\nfast step by active-set size n (top-64 self-conditioning): ms on each chip, "
          "C = compute-bound, B = bandwidth-bound")
    print("| n | TFLOP | GB (experts touched / layer) | " + " | ".join(c.name.split(" (")[0] for c in CHIPS) + " |")
    print("|---|---|---|" + "---|" * len(CHIPS))
    for n in sizes:
        fl = sum(step_flops(args, n, context, False).values())
        by = sum(step_bytes(args, kinds, n, context, False).values())
        cells = []
        for chip in CHIPS:
            t = step_time(chip, fl, by)
            cells.append(f"{t['ms']:.0f} {t['bound'][0].upper()}")
        head = f"| {n} | {fl / 1e12:.3f} | {by / 1e9:.1f} ({experts_touched(args, n):.0f}) | "
        print(head + " | ".join(cells) + " |")
    print(f"\nrefresh interval with an active set of {active} positions: mean step ms "
          f"(R active-set steps, then one step over all {C}); x = full fast step / mean")
    print("| refresh_every R | " + " | ".join(c.name.split(" (")[0] for c in CHIPS) + " |")
    print("|---|" + "---|" * len(CHIPS))
    for R in refresh:
        cells = []
        for chip in CHIPS:
            a = step_time(chip, sum(step_flops(args, active, context, False).values()),
                          sum(step_bytes(args, kinds, active, context, False).values()))["ms"]
            full = step_time(chip, sum(step_flops(args, C, context, False).values()),
                             sum(step_bytes(args, kinds, C, context, False).values()))["ms"]
            mean = a if R == 0 else (R * a + full) / (R + 1)
            cells.append(f"{mean:.0f} ({full / mean:.2f}x)")
        print(f"| {R if R else 'never'} | " + " | ".join(cells) + " |")
    print("\nsources: " + "; ".join(f"{c.name}: {c.source}" for c in CHIPS))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="mixed-4")
    p.add_argument("--context", type=int, default=1024, help="cached tokens the canvas attends to")
    p.add_argument("--sizes", default="8,16,32,48,64,96,128,192,256")
    p.add_argument("--active", type=int, default=32, help="active-set size for the refresh table")
    p.add_argument("--refresh", default="0,1,2,4,8")
    a = p.parse_args(argv)
    tables(a.recipe, a.context, [int(s) for s in a.sizes.split(",")], a.active,
           [int(r) for r in a.refresh.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())

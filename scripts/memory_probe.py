#!/usr/bin/env python
"""Measures one denoising step's activation memory at the released model's canvas, vocab
and widths, on a machine that cannot hold (or step) the whole model: two layers (one
sliding, one full) of the real 26B-A4B shapes, mixed-4 synthetic weights, the embedding
left in float32 so the LM head and the self-conditioning product run through BLAS.

Prints the peak active memory above weights + KV cache during prefill and during steps
with self-conditioning, in GB and in units of one [canvas x vocab] float32 array (268 MB
here), the unit `mlx-diffgemma bench --memory-arithmetic` counts in. Activation memory
does not depend on the layer count (layers run one after another) nor on how the
weights are stored.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python scripts/memory_probe.py [--prompt-tokens 64] [--steps 3] [--lanes N]

On the CPU backend the step runs on one lane per core (lanes.py; `--lanes 1` is what a
GPU runs); the decoder's logits are evaluated before the sampler there, which keeps the
peak at one lane's (without that barrier this probe measured 4.05 units against 3.10).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlx_diffgemma.bench.bench import bench_generation  # noqa: E402
from mlx_diffgemma.bench.synthetic import preset_args, synthetic_model, weight_bytes  # noqa: E402
from mlx_diffgemma.generation.denoiser import MLXDenoiser  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lanes", type=int, default=None, help="default: the runtime's choice")
    a = p.parse_args()

    args = preset_args("real", num_hidden_layers=2,
                       layer_types=["sliding_attention", "full_attention"])
    model = synthetic_model(args, recipe="mixed-4")
    model.lanes = a.lanes
    dec = model.model.decoder
    V, H, C = args.vocab_size, args.hidden_size, args.canvas_length
    emb = nn.Embedding(V, H)
    emb.weight = (4.0 / H**0.5) * mx.random.normal((V, H))
    mx.eval(emb.parameters())
    dec.embed_tokens = emb
    weights = weight_bytes(model)
    unit = C * V * 4
    print(f"weights {weights / 1e9:.2f} GB; unit [canvas x vocab] float32 = {unit / 1e9:.3f} GB; "
          f"{len(model.lanes_for(C))} lane(s) per step")

    gen = bench_generation(8, C)
    den = MLXDenoiser(model, gen)
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    den.encode(np.random.default_rng(0).integers(3, 255000, a.prompt_tokens).tolist())
    kv = den.cache.nbytes
    pre = mx.get_peak_memory() - weights - kv
    print(f"prefill {a.prompt_tokens} tokens ({time.perf_counter() - tic:.1f} s): KV {kv / 1e6:.1f} MB, "
          f"peak above weights + KV {pre / 1e9:.3f} GB")
    canvas = den.start_canvas(0)
    for n in range(gen.max_denoising_steps, gen.max_denoising_steps - a.steps, -1):
        mx.clear_cache()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        canvas = den.step(canvas, 0, n)[0]
        extra = mx.get_peak_memory() - weights - kv
        kind = "no self-conditioning input" if n == gen.max_denoising_steps else "self-conditioned"
        print(f"step {n} ({kind}, {time.perf_counter() - tic:.1f} s): peak above weights + KV "
              f"{extra / 1e9:.3f} GB = {extra / unit:.2f} units")


if __name__ == "__main__":
    main()

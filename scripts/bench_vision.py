#!/usr/bin/env python
"""What encoding one image costs (BENCHMARKS.md, "Images"): the released vision tower's
shapes (27 layers, hidden 1152, 16 heads of 72, MLP 4304, 16-pixel patches, 3x3
pooling, position table 10240) and its embedder into the text width (2816), with
random weights of a trained layer's spread, on a synthetic photo-sized image put
through transformers' Gemma-4 image processor at a soft-token budget.

    python scripts/bench_vision.py                       # 280 soft tokens, bfloat16
    python scripts/bench_vision.py --budget 70 280 --dtype float32 --repeats 2
    python scripts/bench_vision.py --layers 2            # a slow CPU: 2 of the 27 layers

Per budget: the patches the tower runs on, the soft tokens, the seconds per image
(median of `--repeats`, after one untimed run) and, with `--layers` below 27, that time
scaled to 27 layers (the layers are identical; patch embedding, pooling and the embedder
are a fraction of a layer), and the memory: the tower's weights (read on the first
image; the 27-layer size from the config) and the peak above them while one image is
encoded (mx.get_peak_memory, i.e. MLX's own buffers; one layer's activations are alive
at a time, so the depth does not change it). The text model is built lazily and never
evaluated, so it costs nothing here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def real_vision_model(dtype: str, layers: int = 27, seed: int = 0):
    """A Model with the released text config (lazy, never evaluated) and the released
    tower, whose weights are drawn here: linear weights N(0, 1/fan_in), norms around 1,
    the position table N(0, 0.5**2)."""
    import mlx.core as mx
    from estimate_sizes import REAL_CONFIG
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_diffgemma.models.config import ModelArgs
    from mlx_diffgemma.models.model import Model
    from mlx_diffgemma.models.weights import is_vision_tensor

    config = dict(REAL_CONFIG, vision_config=dict(REAL_CONFIG["vision_config"], num_hidden_layers=layers))
    model = Model(ModelArgs.from_dict(config))
    mx.random.seed(seed)
    dt = getattr(mx, dtype)
    new = []
    for name, p in tree_flatten(model.parameters()):
        if not is_vision_tensor(name):
            continue
        if name.endswith("norm.weight"):
            w = 1.0 + 0.2 * mx.random.normal(p.shape)
        elif name.endswith("position_embedding_table"):
            w = 0.5 * mx.random.normal(p.shape)
        else:
            w = mx.random.normal(p.shape) * p.shape[-1] ** -0.5
        new.append((name, w.astype(dt)))
        mx.eval(new[-1][1])
    model.update(tree_unflatten(new))
    # The soft tokens come out in the model's dtype: make the (lazy) embedding match.
    emb = model.model.decoder.embed_tokens
    emb.weight = emb.weight.astype(dt)
    return model, sum(w.nbytes for _, w in new)


def image_arrays(budget: int, size=(768, 1024), seed: int = 0):
    """transformers' Gemma-4 image processor on a random height x width RGB image."""
    import numpy as np
    from PIL import Image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8))
    proc = Gemma4ImageProcessorPil(patch_size=16, max_soft_tokens=budget, pooling_kernel_size=3)
    out = proc([image], return_tensors="np")
    return out["pixel_values"], out["image_position_ids"], int(out["num_soft_tokens_per_image"][0])


def bench(model, budget: int, repeats: int):
    import mlx.core as mx

    pv, pos, soft = image_arrays(budget)
    patches = int((pos[0] != -1).any(-1).sum())
    model.image_features(pv, pos)  # untimed: reads the weights in, warms the kernels
    times = []
    for _ in range(repeats):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        tic = time.perf_counter()
        feats = model.image_features(pv, pos)
        mx.synchronize()
        times.append(time.perf_counter() - tic)
        peak = mx.get_peak_memory() - base
        assert feats.shape[0] == soft
        del feats
    return dict(budget=budget, patches=patches, soft=soft, seconds=statistics.median(times),
                peak_gb=peak / 1e9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, nargs="+", default=[280],
                   help="soft tokens per image (70, 140, 280, 560, 1120)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, default=27, help="tower layers to run (time scaled to 27)")
    args = p.parse_args(argv)

    import math

    import mlx.core as mx
    from estimate_sizes import REAL_CONFIG

    from mlx_diffgemma.models.sizes import vision_shapes

    model, nbytes = real_vision_model(args.dtype, args.layers)
    itemsize = mx.zeros((), getattr(mx, args.dtype)).itemsize
    full = sum(math.prod(s) for s in vision_shapes(REAL_CONFIG).values()) * itemsize
    print(f"device {mx.default_device()}, {args.dtype}, {args.layers} of 27 layers run; tower + "
          f"embedder weights {full / 1e9:.2f} GB at 27 layers ({nbytes / 1e9:.2f} GB here), read "
          "on the first image", flush=True)
    print("| budget | patches | soft tokens | s / image (run) | s / image (27 layers) | peak above weights GB |")
    print("|---|---|---|---|---|---|")
    for b in args.budget:
        r = bench(model, b, args.repeats)
        print(f"| {r['budget']} | {r['patches']} | {r['soft']} | {r['seconds']:.2f} | "
              f"{r['seconds'] * 27 / args.layers:.1f} | {r['peak_gb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

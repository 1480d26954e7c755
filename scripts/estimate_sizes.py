"""On-disk size and bits per weight of each conversion recipe for the released
google/diffusiongemma-26B-A4B-it, computed from its config alone
(`mlx_diffgemma.models.sizes.estimate`; no weights needed).

    python scripts/estimate_sizes.py            # table for the real config
    python scripts/estimate_sizes.py config.json  # for any DiffusionGemma config.json

The text shapes are those of docs/real-config.md. Of the vision tower the public config
copies give hidden 1152 and 27 layers; the remaining vision dims below (MLP 4304, 16
heads of 72, patch 16, 10240 positions) are the SigLIP-So400m shapes Gemma's towers use,
an assumption: the tower is ~0.57 B parameters, ~1.1 GB in bf16, passed through
unquantized by every recipe.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_diffgemma.models.recipes import RECIPES  # noqa: E402
from mlx_diffgemma.models.sizes import estimate  # noqa: E402

FULL = "full_attention"
SLIDING = "sliding_attention"

REAL_CONFIG = {
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "model_type": "diffusion_gemma",
    "canvas_length": 256,
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
    "text_config": {
        "model_type": "diffusion_gemma_text",
        "hidden_size": 2816,
        "intermediate_size": 2112,
        "moe_intermediate_size": 704,
        "num_experts": 128,
        "top_k_experts": 8,
        "num_hidden_layers": 30,
        "layer_types": ([SLIDING] * 5 + [FULL]) * 5,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_global_key_value_heads": 2,
        "head_dim": 256,
        "global_head_dim": 512,
        "sliding_window": 1024,
        "vocab_size": 262144,
        "max_position_embeddings": 262144,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
    },
    "vision_config": {
        "model_type": "gemma4_vision",
        "hidden_size": 1152,
        "num_hidden_layers": 27,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 72,
        "patch_size": 16,
        "position_embedding_size": 10240,
    },
}



def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(argv[0]).read_text()) if argv else REAL_CONFIG
    rows = [estimate(config, r) for r in RECIPES]
    first = rows[0]
    print(f"parameters: {first['params'] / 1e9:.2f} B "
          f"(text {first['text_params'] / 1e9:.2f} B, vision tower "
          f"{(first['params'] - first['text_params']) / 1e9:.2f} B)")
    print(f"{'recipe':<9} {'size (GB)':>10} {'size (GiB)':>11} {'bits/weight':>12} {'text bits/weight':>17}")
    for e in rows:
        print(f"{e['recipe']:<9} {e['gb']:>10.2f} {e['gib']:>11.2f} {e['bits_per_weight']:>12.3f} "
              f"{e['text_bits_per_weight']:>17.3f}")
    print("\nmixed-4 by module kind:")
    for kind, k in first["by_kind"].items():
        print(f"  {kind:<18} {k['params'] / 1e9:7.3f} B params  {k['bytes'] / 1e9:7.3f} GB  "
              f"{k['bits_per_weight']:6.3f} bits/weight")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

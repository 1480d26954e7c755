"""Synthetic DiffusionGemma models: the real module tree with random, already-quantized
weights, for benchmarks and memory arithmetic without downloading a checkpoint.

The quantized tensors are generated directly (random packed codes plus scales and
biases chosen so the dequantized weights have the spread a trained layer has), so a
model's float weights never exist in memory: the full-shape mixed 4-bit model costs its
~15 GB and nothing more. Which modules are quantized, at which width, comes from the
recipes in `recipes.py` (mixed-4: experts and self-conditioning MLP 4-bit, everything
else 8-bit, group 64).

Presets (`PRESETS`): `real` is the released 26B-A4B text model (docs/real-config.md);
the others keep its structure (five sliding layers then one full, top-8 of many experts,
full layers with their own head size and KV heads and no v_proj, a 256-token canvas)
at sizes a laptop CPU can step through.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..models.config import ModelArgs
from ..models.model import Model
from ..models.recipes import make_recipe
from ..models.weights import is_vision_tensor

# name -> ModelArgs overrides (on top of the released defaults).
PRESETS: Dict[str, Dict[str, Any]] = {
    "real": {},
    # A third of the width, a fifth of the depth.
    "large": dict(
        hidden_size=1024, intermediate_size=768, moe_intermediate_size=256,
        num_experts=128, top_k_experts=8, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, head_dim=128,
        global_head_dim=256, num_global_key_value_heads=1,
        sliding_window=512, vocab_size=32768,
    ),
    # 256 tokens x top-8 over 128 experts as in the real model (each expert sees ~16
    # tokens), narrow matrices, a 16K vocab.
    "medium": dict(
        hidden_size=512, intermediate_size=384, moe_intermediate_size=128,
        num_experts=128, top_k_experts=8, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128,
        global_head_dim=256, num_global_key_value_heads=1,
        sliding_window=256, vocab_size=16384,
    ),
    # The default bench shape: a step in ~1-2 s on a 2-core CPU with MLX's CPU kernels.
    "small": dict(
        hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
        num_experts=64, top_k_experts=8, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        global_head_dim=256, num_global_key_value_heads=1,
        sliding_window=256, vocab_size=8192,
    ),
    # For tests: seconds per run.
    "tiny": dict(
        hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
        num_experts=8, top_k_experts=2, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        global_head_dim=128, num_global_key_value_heads=1,
        sliding_window=32, vocab_size=1024, canvas_length=32,
        max_position_embeddings=8192,
    ),
}


def preset_args(name: str = "small", **overrides) -> ModelArgs:
    """ModelArgs of preset `name` with `overrides` (e.g. num_hidden_layers=12). Changing
    the depth re-derives the five-sliding-one-full layer pattern."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    if overrides.get("num_hidden_layers") is not None and overrides.get("layer_types") is None:
        kw.pop("layer_types", None)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelArgs(**kw)


def hf_config(args: ModelArgs) -> Dict[str, Any]:
    """A Hugging Face style config.json dict for `args` (what `ModelArgs.from_dict` and the
    Hugging Face config classes read)."""
    text = {
        "model_type": "diffusion_gemma_text",
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "moe_intermediate_size": args.moe_intermediate_size,
        "num_experts": args.num_experts,
        "top_k_experts": args.top_k_experts,
        "num_hidden_layers": args.num_hidden_layers,
        "layer_types": list(args.layer_types),
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "num_global_key_value_heads": args.num_global_key_value_heads,
        "head_dim": args.head_dim,
        "global_head_dim": args.global_head_dim,
        "sliding_window": args.sliding_window,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.rms_norm_eps,
        "final_logit_softcapping": args.final_logit_softcapping,
        "rope_parameters": args.rope_parameters,
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": args.pad_token_id,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "tie_word_embeddings": True,
    }
    return {
        "model_type": "diffusion_gemma",
        "canvas_length": args.canvas_length,
        "tie_word_embeddings": True,
        "text_config": text,
    }


def _std(path: str, fan_in: int, args: ModelArgs) -> float:
    """Spread of the dequantized weights: fan-in scaled, the embedding wide enough for
    logits of ~10-20 (below the soft cap), the router busy but not degenerate."""
    if path.endswith("embed_tokens"):
        return 4.0 / math.sqrt(args.hidden_size)
    if path.endswith("router.proj"):
        return 2.5
    return 1.0 / math.sqrt(fan_in)


def _random_quantized(shape, bits: int, group: int, std: float, dtype) -> tuple:
    """(packed uint32 codes, scales, biases) of an affine-quantized [.., out, in] matrix
    whose dequantized entries are uniform with mean 0 and standard deviation ~`std`."""
    *lead, rows, cols = shape
    packed = mx.random.randint(0, 2**32, (*lead, rows, cols * bits // 32), dtype=mx.uint32)
    levels = 2**bits - 1
    # Uniform codes in [0, levels]: std levels/sqrt(12) per unit of scale.
    base = std * math.sqrt(12.0) / levels
    jitter = mx.random.uniform(0.8, 1.2, (*lead, rows, cols // group))
    scales = (base * jitter).astype(dtype)
    biases = (-scales.astype(mx.float32) * (levels / 2)).astype(dtype)
    return packed, scales, biases


def _random_float(path: str, name: str, shape, args: ModelArgs, dtype) -> mx.array:
    if name == "layer_scalar":
        return mx.random.uniform(0.5, 1.5, shape).astype(dtype)
    if name == "per_expert_scale":
        return mx.random.uniform(0.5, 2.0, shape).astype(dtype)
    if len(shape) == 1:  # norms and the router scale: around 1 with a per-channel spread
        return (1.0 + 0.3 * mx.random.normal(shape)).astype(dtype)
    fan_in = shape[-1]
    return (_std(path, fan_in, args) * mx.random.normal(shape)).astype(dtype)


def synthetic_model(
    args: ModelArgs,
    recipe: Optional[str] = "mixed-4",
    dtype: mx.Dtype = mx.float32,
    seed: int = 0,
) -> Model:
    """`Model(args)` with random weights, quantized by `recipe` ("mixed-4", "4bit",
    "8bit"; None or "fp32"/"bf16"/"fp16" for float weights) and evaluated module by module.

    `dtype` is the float type of scales, biases, norms and activations. On MLX's CPU
    backend use float32: its quantized and gather kernels are far slower in bf16/fp16
    (and unquantized bf16 `gather_mm` is not implemented there).
    """
    mx.random.seed(seed)
    if recipe in ("fp32", "bf16", "fp16"):
        dtype = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[recipe]
        recipe = None
    r = make_recipe(recipe, quantize=recipe is not None)
    model = Model(args)  # float init is lazy: nothing is computed until replaced or evaluated

    chosen: Dict[str, tuple] = {}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        w = module.weight
        qp = r.params_for(f"{path}.weight", w.shape)
        if qp is None:
            return False
        chosen[path] = qp
        return {"bits": qp[0], "group_size": qp[1]}

    if r.quantized:
        # Swaps in the quantized module classes; their (lazy) codes are replaced below.
        nn.quantize(model, class_predicate=predicate)

    # Generate every tensor directly and evaluate it before the next one, so the peak is
    # the model itself plus one tensor.
    params = dict(tree_flatten(model.parameters()))
    new: Dict[str, mx.array] = {}
    for key in params:
        path, name = key.rsplit(".", 1)
        if path in chosen:
            if name != "weight":
                continue  # scales/biases come with the weight
            bits, group = chosen[path]
            mod_shape = _logical_shape(params[key].shape, bits)
            q, s, b = _random_quantized(mod_shape, bits, group, _std(path, mod_shape[-1], args), dtype)
            mx.eval(q, s, b)
            new[key], new[f"{path}.scales"], new[f"{path}.biases"] = q, s, b
        else:
            a = _random_float(path, name, params[key].shape, args, dtype)
            mx.eval(a)
            new[key] = a
    model.update(tree_unflatten(list(new.items())))
    model.eval()
    return model


def _logical_shape(packed_shape, bits: int):
    *lead, rows, packed_cols = packed_shape
    return (*lead, rows, packed_cols * 32 // bits)


def quantization_of(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """module path -> {"bits", "group_size"} for every quantized module of `model`
    (what another copy of the same checkpoint needs to be quantized identically)."""
    out = {}
    for path, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size") and hasattr(m, "scales"):
            out[path] = {"bits": m.bits, "group_size": m.group_size}
    return out


def weight_bytes(model: nn.Module) -> int:
    """The text weights' bytes (a vision tower is read only when an image is encoded)."""
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if not is_vision_tensor(k))

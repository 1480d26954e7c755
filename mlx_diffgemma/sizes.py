"""What a converted directory will weigh, per recipe, from config.json alone (no weights
read): the text model's tensors from the module tree, the vision tower's from its config."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .recipes import DEFAULT_RECIPE, make_recipe, module_kind, normalize_dtype


# -- size estimates -------------------------------------------------------------------------

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def vision_shapes(config: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """The Gemma-4 vision tower's tensors (as transformers saves them) from `vision_config`,
    plus the multimodal embedder; empty without a vision config."""
    vc = config.get("vision_config") or {}
    if not vc:
        return {}
    H = vc.get("hidden_size", 768)
    I = vc.get("intermediate_size", 3072)
    L = vc.get("num_hidden_layers", 16)
    nh = vc.get("num_attention_heads", 12)
    kv = vc.get("num_key_value_heads", nh)
    hd = vc.get("head_dim", 64)
    patch = vc.get("patch_size", 16)
    pos = vc.get("position_embedding_size", 10 * 1024)
    text_h = (config.get("text_config") or {}).get("hidden_size", 2816)
    p = "model.encoder.vision_tower"
    out: Dict[str, Tuple[int, ...]] = {
        f"{p}.patch_embedder.input_proj.weight": (H, 3 * patch * patch),
        f"{p}.patch_embedder.position_embedding_table": (2, pos, H),
        "model.encoder.embed_vision.embedding_projection.weight": (text_h, H),
    }
    if vc.get("standardize"):
        out[f"{p}.std_bias"] = (H,)
        out[f"{p}.std_scale"] = (H,)
    lin = ".linear.weight"
    for i in range(L):
        q = f"{p}.encoder.layers.{i}"
        out[f"{q}.self_attn.q_proj{lin}"] = (nh * hd, H)
        out[f"{q}.self_attn.k_proj{lin}"] = (kv * hd, H)
        out[f"{q}.self_attn.v_proj{lin}"] = (kv * hd, H)
        out[f"{q}.self_attn.o_proj{lin}"] = (H, nh * hd)
        out[f"{q}.self_attn.q_norm.weight"] = (hd,)
        out[f"{q}.self_attn.k_norm.weight"] = (hd,)
        out[f"{q}.mlp.gate_proj{lin}"] = (I, H)
        out[f"{q}.mlp.up_proj{lin}"] = (I, H)
        out[f"{q}.mlp.down_proj{lin}"] = (H, I)
        for norm in ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            out[f"{q}.{norm}.weight"] = (H,)
    return out


def quantized_nbytes(shape: Sequence[int], bits: int, group: int, scale_itemsize: int,
                     mode: str = "affine") -> int:
    """Bytes of a quantized tensor: packed uint32 weight + scales + biases (affine, in the
    float dtype), or + one uint8 scale per group (mxfp4/nvfp4/mxfp8)."""
    n = math.prod(shape)
    if mode != "affine":
        return n * bits // 8 + n // group
    return n * bits // 8 + 2 * (n // group) * scale_itemsize


def _text_tensors(args, r, item: int, ranks: int = 1):
    """(name, shape, bytes) of every text tensor of a conversion with recipe `r`; with
    `ranks` > 1 the shape and bytes rank 0 of a split model holds (sharding.py)."""
    from .model import expected_shapes

    shapes = expected_shapes(args)
    spans = {}
    if ranks > 1:
        from .sharding import plan_spans

        def group_of(path: str) -> int:
            qp = r.quant_for(f"{path}.weight", shapes[f"{path}.weight"])
            return qp[1] if qp else 1

        spans = plan_spans(args, 0, ranks, group_of)
    for name, shape in shapes.items():
        qp = r.quant_for(name, shape)
        span = spans.get(name.rsplit(".", 1)[0])
        if span is not None:
            shape = list(shape)
            shape[-1 if span.kind == "cols" else 0] = span.stop - span.start
            shape = tuple(shape)
        n = math.prod(shape)
        yield name, shape, quantized_nbytes(shape, qp[0], qp[1], item, qp[2]) if qp else n * item


def estimate(
    config: Mapping[str, Any],
    recipe: Optional[str] = DEFAULT_RECIPE,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    dtype: Optional[str] = None,
    ranks: int = 1,
) -> Dict[str, Any]:
    """On-disk size and bits per weight a conversion with `recipe` would produce for the
    model `config` (an HF config.json dict), computed from the shapes alone. With
    `ranks` > 1: what one rank of a model split over that many holds (`params`
    and `bytes` then count that rank's share of the text model).

    Returns bytes (tensor data; headers, tokenizer and config files add a few MB),
    params, `bits_per_weight` over everything written (vision tower included, counted as
    mlx-vlm counts it: stored bits / original parameter count), `text_bits_per_weight`
    over the text model alone, and a per-kind breakdown.
    """
    from .config import ModelArgs

    r = make_recipe(recipe, quantize=recipe is not None, q_bits=q_bits,
                    q_group_size=q_group_size, dtype=dtype)
    src_dtype = (
        config.get("torch_dtype") or config.get("dtype")
        or (config.get("text_config") or {}).get("dtype") or "bfloat16"
    )
    out_dtype = r.dtype or normalize_dtype(src_dtype) or "bfloat16"
    item = _ITEMSIZE[out_dtype]
    args = ModelArgs.from_dict(dict(config))

    kinds: Dict[str, Dict[str, float]] = {}

    def add(kind, n, nbytes):
        k = kinds.setdefault(kind, {"params": 0, "bytes": 0})
        k["params"] += n
        k["bytes"] += nbytes

    text_params = text_bytes = 0
    for name, shape, nbytes in _text_tensors(args, r, item, ranks):
        n = math.prod(shape)
        add(module_kind(name) or "norms_and_scalars", n, nbytes)
        text_params += n
        text_bytes += nbytes
    vis_params = vis_bytes = 0
    for name, shape in vision_shapes(config).items():
        n = math.prod(shape)
        vis_params += n
        vis_bytes += n * item
    if vis_params:
        add("vision_tower", vis_params, vis_bytes)
    for k in kinds.values():
        k["bits_per_weight"] = 8 * k["bytes"] / k["params"] if k["params"] else 0.0
    total_bytes = text_bytes + vis_bytes
    total_params = text_params + vis_params
    return {
        "recipe": r.name,
        "description": r.describe(),
        "dtype": out_dtype,
        "params": total_params,
        "text_params": text_params,
        "bytes": total_bytes,
        "gb": total_bytes / 1e9,
        "gib": total_bytes / 2**30,
        "bits_per_weight": 8 * total_bytes / total_params,
        "text_bits_per_weight": 8 * text_bytes / text_params,
        # what our runtime holds for text: the vision tower is read only for an image
        "text_bytes": text_bytes,
        "by_kind": kinds,
    }


def generation_memory(config: Mapping[str, Any], prompt: int = 4096, new_tokens: int = 256,
                      act_bytes: int = 2, prefill_chunk: int = 2048, ranks: int = 1) -> Dict[str, Any]:
    """Bytes a generation adds to the weights (`bench.memory_arithmetic` explains each
    part): the KV cache (`kv`), one denoising step's activations (`step`, in `unit`s of a
    [canvas x vocab] float32 array, `step_units`), a layer's activations at the canvas
    (`layer_acts`) and the prefill's largest transient (`prefill`, below the step's).
    `ranks` > 1: on one rank of a split model (its heads' share of the cache and of the
    attention activations; the logits and the sampler's arrays are whole on every rank)."""
    from .config import ModelArgs

    a = ModelArgs.from_dict(config)
    C, V = a.canvas_length, a.vocab_size
    slack = C  # make_cache's default
    context = prompt + new_tokens
    kv = 0
    for i, kind in enumerate(a.layer_types):
        heads, dim = a.kv_heads_of(i), a.head_dim_of(i)
        heads = max(1, heads // ranks)  # fewer KV heads than ranks: one each
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
        2 * (a.num_attention_heads // ranks) * C * (context + C) * act_bytes
        # routed activations: canvas x top-k x 2 x moe_intermediate (gate_up), twice
        + 2 * C * a.top_k_experts * 2 * a.moe_intermediate_size * act_bytes
    )
    prefill = 2 * (a.num_attention_heads // ranks) * prefill_chunk * prompt * act_bytes
    step = sum(step_units.values()) * unit
    return {"kv": kv, "unit": unit, "step_units": step_units, "step": step,
            "layer_acts": layer_acts, "prefill": prefill}

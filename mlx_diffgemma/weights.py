"""Tensor names: from a Hugging Face (or mlx-community) checkpoint to our module tree.

Our parameter names are the Hugging Face names, so the mapping only adds the `.weight`
suffix to the fused expert tensors and drops what the text runtime does not hold. The
same names are what mlx-vlm 0.7.10's `diffusion_gemma` model uses (see
docs/mlx-vlm-layout.md), so one converted directory serves both.

Used by `Model.sanitize` (runtime: vision tower dropped) and by the converter
(`keep_vision=True`: the vision tower is passed through for loaders that build it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .config import ModelArgs

_EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
_VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_ENCODER_PREFIX = "model.encoder.language_model."
QUANT_SUFFIXES = (".scales", ".biases")


def is_vision_tensor(key: str) -> bool:
    return key.startswith(_VISION_PREFIXES)


def hf_to_mlx_name(key: str, keep_vision: bool = False) -> Optional[str]:
    """Our name for checkpoint tensor `key`, or None when it is not kept.

    Dropped: `lm_head.weight` (tied to the embedding), the encoder's tied copies of the
    decoder's tensors (only its own `layer_scalar`s are kept), rotary buffers, and the
    vision tower unless `keep_vision` (the converter keeps it, unchanged). Idempotent on
    names already converted, and works on quantized siblings (`.scales`, `.biases`).
    """
    if key.startswith("lm_head.") or "rotary_emb" in key:
        return None
    if is_vision_tensor(key):
        return key if keep_vision else None
    if key.startswith(_ENCODER_PREFIX) and not key.endswith(".layer_scalar"):
        return None
    if key.endswith(_EXPERT_SUFFIXES):
        return key + ".weight"
    return key


def expected_shapes(args: "ModelArgs") -> Dict[str, Tuple[int, ...]]:
    """Every text parameter of the runtime's module tree with its (unquantized) shape, as
    implied by the config. The vision tower is not included."""
    H, I, E = args.hidden_size, args.intermediate_size, args.num_experts
    MI, nh = args.moe_intermediate_size, args.num_attention_heads
    out: Dict[str, Tuple[int, ...]] = {"model.decoder.embed_tokens.weight": (args.vocab_size, H)}
    for i in range(args.num_hidden_layers):
        p = f"model.decoder.layers.{i}"
        hd, kv = args.head_dim_of(i), args.kv_heads_of(i)
        out[f"{p}.self_attn.q_proj.weight"] = (nh * hd, H)
        out[f"{p}.self_attn.k_proj.weight"] = (kv * hd, H)
        if args.layer_types[i] != "full_attention":
            # full-attention layers take their values from the k_proj output
            out[f"{p}.self_attn.v_proj.weight"] = (kv * hd, H)
        out[f"{p}.self_attn.o_proj.weight"] = (H, nh * hd)
        out[f"{p}.self_attn.q_norm.weight"] = (hd,)
        out[f"{p}.self_attn.k_norm.weight"] = (hd,)
        out[f"{p}.mlp.gate_proj.weight"] = (I, H)
        out[f"{p}.mlp.up_proj.weight"] = (I, H)
        out[f"{p}.mlp.down_proj.weight"] = (H, I)
        out[f"{p}.router.proj.weight"] = (E, H)
        out[f"{p}.router.scale"] = (H,)
        out[f"{p}.router.per_expert_scale"] = (E,)
        out[f"{p}.experts.gate_up_proj.weight"] = (E, 2 * MI, H)
        out[f"{p}.experts.down_proj.weight"] = (E, H, MI)
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
            "pre_feedforward_layernorm_2",
        ):
            out[f"{p}.{norm}.weight"] = (H,)
        out[f"{p}.layer_scalar"] = (1,)
    out["model.decoder.norm.weight"] = (H,)
    sc = "model.decoder.self_conditioning"
    out[f"{sc}.pre_norm.weight"] = (H,)
    out[f"{sc}.gate_proj.weight"] = (I, H)
    out[f"{sc}.up_proj.weight"] = (I, H)
    out[f"{sc}.down_proj.weight"] = (H, I)
    for i in range(args.num_hidden_layers):
        out[f"{_ENCODER_PREFIX}layers.{i}.layer_scalar"] = (1,)
    return out

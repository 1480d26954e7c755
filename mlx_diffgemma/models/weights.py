"""Tensor names: from a Hugging Face (or mlx-community) checkpoint to our module tree.

Our parameter names are the Hugging Face names, so the mapping only adds the `.weight`
suffix to the fused expert tensors and drops what the text runtime does not hold. The
same names are what mlx-vlm 0.7.10's `diffusion_gemma` model uses (see
docs/mlx-vlm-layout.md), so one converted directory serves both.

Used by `Model.sanitize` (the vision tower kept when the model builds one) and by the
converter (`keep_vision=True`: the vision tower is passed through, unquantized).
"""

from __future__ import annotations

from typing import Optional

_EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
_VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_ENCODER_PREFIX = "model.encoder.language_model."
QUANT_SUFFIXES = (".scales", ".biases")
# The clamps of a vision tower's clippable linears (used only with use_clipped_linears).
CLIP_SUFFIXES = (".input_min", ".input_max", ".output_min", ".output_max")


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

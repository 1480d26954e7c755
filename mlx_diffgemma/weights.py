"""Tensor names: from a Hugging Face (or mlx-community) checkpoint to our module tree.

Our parameter names are the Hugging Face names, so the mapping only adds the `.weight`
suffix to the fused expert tensors and drops what the text runtime does not hold.
"""

from __future__ import annotations

from typing import Optional

_EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
_VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_ENCODER_PREFIX = "model.encoder.language_model."


def is_vision_tensor(key: str) -> bool:
    return key.startswith(_VISION_PREFIXES)


def hf_to_mlx_name(key: str) -> Optional[str]:
    """Our name for checkpoint tensor `key`, or None when the runtime does not load it.

    Dropped: `lm_head.weight` (tied to the embedding), the encoder's tied copies of the
    decoder's tensors (only its own `layer_scalar`s are kept), the vision tower, and
    rotary buffers. Works on quantized siblings (`.scales`, `.biases`) too.
    """
    if key.startswith("lm_head.") or is_vision_tensor(key) or "rotary_emb" in key:
        return None
    if key.startswith(_ENCODER_PREFIX) and not key.endswith(".layer_scalar"):
        return None
    if key.endswith(_EXPERT_SUFFIXES):
        return key + ".weight"
    return key

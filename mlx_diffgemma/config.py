"""Model and generation arguments, read from a Hugging Face `config.json` and
`generation_config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

MODEL_TYPE = "diffusion_gemma"
TEXT_MODEL_TYPE = "diffusion_gemma_text"

_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
    },
}

# Keys without which the text model cannot be built (the rest have the reference's defaults).
_REQUIRED_TEXT_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)


def default_layer_types(num_layers: int) -> List[str]:
    """The reference's default pattern: five sliding layers, then one full."""
    return ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)]


class ConfigError(ValueError):
    """A config.json that does not describe a DiffusionGemma model."""


@dataclass
class ModelArgs:
    model_type: str = MODEL_TYPE
    hidden_size: int = 2816
    intermediate_size: int = 2112
    moe_intermediate_size: int = 704
    num_experts: int = 128
    top_k_experts: int = 8
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    # Full-attention layers: their own head size and KV-head count, no v_proj.
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = 2
    sliding_window: int = 1024
    vocab_size: int = 262_144
    max_position_embeddings: int = 262_144
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: Optional[float] = 30.0
    layer_types: Optional[List[str]] = None
    rope_parameters: Optional[Dict[str, Dict[str, Any]]] = None
    canvas_length: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: Union[int, List[int], None] = 1

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        if self.rope_parameters is None:
            self.rope_parameters = {k: dict(v) for k, v in _DEFAULT_ROPE.items()}
        if self.num_global_key_value_heads is None:
            self.num_global_key_value_heads = self.num_key_value_heads
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_approx"):
            raise ConfigError(
                f"unsupported hidden_activation {self.hidden_activation!r}: DiffusionGemma uses "
                "'gelu_pytorch_tanh'"
            )
        if self.attention_bias:
            raise ConfigError("attention_bias=True is not part of DiffusionGemma")

    def head_dim_of(self, layer_idx: int) -> int:
        full = self.layer_types[layer_idx] == "full_attention"
        return self.global_head_dim if full else self.head_dim

    def kv_heads_of(self, layer_idx: int) -> int:
        full = self.layer_types[layer_idx] == "full_attention"
        return self.num_global_key_value_heads if full else self.num_key_value_heads

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Builds the args from an HF `config.json` dict (nested `text_config`)."""
        model_type = config.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"model_type is {model_type!r}, expected {MODEL_TYPE!r}: this is not a "
                "DiffusionGemma checkpoint (google/diffusiongemma-26B-A4B-it or a conversion of it)"
            )
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has no 'text_config' section")
        if text.get("model_type", TEXT_MODEL_TYPE) != TEXT_MODEL_TYPE:
            raise ConfigError(
                f"text_config.model_type is {text.get('model_type')!r}, expected {TEXT_MODEL_TYPE!r}"
            )
        missing = [k for k in _REQUIRED_TEXT_KEYS if text.get(k) is None]
        if missing:
            raise ConfigError(f"config.json text_config is missing required keys: {', '.join(missing)}")
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(
                "use_bidirectional_attention='all' (a bidirectional encoder) is not supported"
            )

        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in text.items() if k in names and k != "model_type"}
        if "canvas_length" in config:
            kwargs["canvas_length"] = config["canvas_length"]
        # Full-attention overrides: the released config says global_head_dim /
        # num_global_key_value_heads, transformers' save_pretrained writes per_layer_config.
        layer_types = kwargs.get("layer_types") or default_layer_types(kwargs["num_hidden_layers"])
        per_layer = text.get("per_layer_config") or {}
        if per_layer:
            kwargs.update(_global_overrides_from_per_layer(per_layer, layer_types, text))
        return cls(**kwargs)


def _global_overrides_from_per_layer(per_layer, layer_types, text) -> Dict[str, Any]:
    """Reads the full-attention head size / KV heads from `per_layer_config`."""
    out: Dict[str, Any] = {}
    seen = set()
    for key, overrides in per_layer.items():
        if key in ("sliding_attention", "full_attention"):
            kind = key
        else:
            idx = int(key)
            kind = layer_types[idx] if layer_types else None
        if kind != "full_attention":
            if overrides:
                raise ConfigError(
                    f"per_layer_config overrides a non-full-attention layer ({key}); only "
                    "full-attention layers may differ"
                )
            continue
        item = (
            overrides.get("head_dim", text.get("global_head_dim")),
            overrides.get("num_key_value_heads", text.get("num_global_key_value_heads")),
        )
        seen.add(item)
    if len(seen) > 1:
        raise ConfigError(f"full-attention layers disagree in per_layer_config: {sorted(seen)}")
    if seen:
        head_dim, kv_heads = seen.pop()
        if head_dim is not None:
            out["global_head_dim"] = head_dim
        if kv_heads is not None:
            out["num_global_key_value_heads"] = kv_heads
    return out


def load_config(model_path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(model_path) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: a model directory needs its config.json (is this the right path?)"
        )
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download or re-convert the model") from e


# -- generation ---------------------------------------------------------------------

# The released generation_config.json values, used where a checkpoint gives none.
RELEASED_GENERATION = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50],
    "pad_token_id": 0,
}

@dataclass
class GenerationConfig:
    """The drafter's parameters, under the reference's own names."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: Optional[List[int]] = field(default_factory=lambda: [1, 106, 50])
    pad_token_id: int = 0

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"invalid generation parameter: {msg}")

        if not isinstance(self.max_denoising_steps, int) or self.max_denoising_steps < 1:
            bad(f"max_denoising_steps must be an integer >= 1 (got {self.max_denoising_steps!r})")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not self.entropy_bound > 0:
            bad(f"entropy_bound must be > 0 (got {self.entropy_bound!r})")
        if self.t_min < 0 or self.t_max < 0:
            bad(f"temperatures must be >= 0 (got t_min={self.t_min}, t_max={self.t_max})")
        if self.t_min > self.t_max:
            bad(f"t_min must not exceed t_max (got t_min={self.t_min} > t_max={self.t_max})")
        if self.t_min == 0:
            # The last step runs at t_min; a zero temperature divides the logits by zero.
            bad("t_min must be > 0: the temperature at the last step is t_min")
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            bad(f"stability_threshold must be an integer >= 0 (got {self.stability_threshold!r})")
        if not self.confidence_threshold > 0:
            bad(f"confidence_threshold must be > 0 (got {self.confidence_threshold!r})")

    def temperature(self, step: int) -> float:
        """The reference's linear schedule, t_min + (t_max - t_min) * step / N, where `step`
        counts down from N (first step, t_max) to 1 (last step). Computed in float32 op by
        op as the reference does (its step is an int32 tensor), so both agree to the bit."""
        f32 = np.float32
        ratio = f32(step) / f32(self.max_denoising_steps)
        return float(f32(self.t_min) + f32(self.t_max - self.t_min) * ratio)

    @classmethod
    def from_model_dir(cls, model_path: Union[str, Path, None], **overrides) -> "GenerationConfig":
        """Checkpoint defaults (generation_config.json, else config.json) with per-call overrides."""
        values = dict(RELEASED_GENERATION)
        if model_path is not None:
            values.update(_checkpoint_generation_values(Path(model_path)))
        return cls(**values).with_overrides(**overrides)

    def with_overrides(self, **overrides) -> "GenerationConfig":
        """A copy with `overrides` applied (eos_token_id=None disables EOS), validated."""
        values = asdict(self)
        for k, v in overrides.items():
            if k not in values:
                raise TypeError(f"unknown generation parameter {k!r}; known: {', '.join(values)}")
            values[k] = v
        return type(self)(**values)


def _checkpoint_generation_values(model_path: Path) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    sources = []
    cfg_path = model_path / "config.json"
    if cfg_path.exists():
        try:
            sources.append(json.loads(cfg_path.read_text()))
        except json.JSONDecodeError:
            pass
    gen_path = model_path / "generation_config.json"
    if gen_path.exists():
        try:
            sources.append(json.loads(gen_path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{gen_path} is not valid JSON ({e})") from e
    for src in sources:  # generation_config.json wins over config.json
        for k in RELEASED_GENERATION:
            if k == "eos_token_id":
                continue
            if src.get(k) is not None:
                out[k] = src[k]
        sampler = src.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            out["entropy_bound"] = sampler["entropy_bound"]
    # eos: the generation config's list (which adds <turn|> and <|tool_response>) wins.
    for src in reversed(sources):
        if src.get("eos_token_id") is not None:
            eos = src["eos_token_id"]
            out["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
            break
    return out

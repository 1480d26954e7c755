"""Model and generation arguments, read from a Hugging Face `config.json` and
`generation_config.json`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

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


# ModelArgs fields read from the top level of config.json, never from text_config.
_TOP_LEVEL_FIELDS = (
    "vision_config", "image_token_id", "boi_token_id", "eoi_token_id",
    "vision_soft_tokens_per_image",
)


def default_layer_types(num_layers: int) -> List[str]:
    """The reference's default pattern: five sliding layers, then one full."""
    return ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)]


class ConfigError(ValueError):
    """A config.json that does not describe a DiffusionGemma model."""


# -- field checks: a config's values are checked for type and range before use, so a
# malformed file gives one line naming the file and field, never a TypeError deep inside.

_POSITIVE_INT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "top_k_experts",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "global_head_dim",
    "num_global_key_value_heads",
    "sliding_window",
    "vocab_size",
    "max_position_embeddings",
    "canvas_length",
)
_TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id")
_LAYER_KINDS = ("sliding_attention", "full_attention")


def is_int(value: Any) -> bool:
    """An integer proper: JSON's true/false are bools, which Python counts as ints."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def is_token_ids(value: Any) -> bool:
    """An id or a list of ids, each >= 0."""
    items = value if isinstance(value, list) else [value]
    return all(is_int(t) and t >= 0 for t in items)


def _check_text_fields(kwargs: Dict[str, Any], where: str) -> None:
    def bad(name: str, what: str):
        raise ConfigError(f"{where}.{name} must be {what} (got {kwargs[name]!r}); fix the file")

    for name in _POSITIVE_INT_FIELDS:
        if name in kwargs and kwargs[name] is not None:
            if not is_int(kwargs[name]) or kwargs[name] < 1:
                bad(name, "a positive integer")
    for name in _TOKEN_ID_FIELDS:
        if name in kwargs and not (is_int(kwargs[name]) and kwargs[name] >= 0):
            bad(name, "a token id (an integer >= 0)")
    if kwargs.get("eos_token_id") is not None and not is_token_ids(kwargs["eos_token_id"]):
        bad("eos_token_id", "a token id or a list of token ids")
    eps = kwargs.get("rms_norm_eps", 1e-6)
    if not (is_finite_number(eps) and eps > 0):
        bad("rms_norm_eps", "a number > 0")
    cap = kwargs.get("final_logit_softcapping")
    if cap is not None and not (is_finite_number(cap) and cap > 0):
        bad("final_logit_softcapping", "a number > 0 or null")
    if "hidden_activation" in kwargs and not isinstance(kwargs["hidden_activation"], str):
        bad("hidden_activation", "a string")
    if "attention_bias" in kwargs and not isinstance(kwargs["attention_bias"], bool):
        bad("attention_bias", "true or false")
    layer_types = kwargs.get("layer_types")
    if layer_types is not None and not (
        isinstance(layer_types, list) and all(t in _LAYER_KINDS for t in layer_types)
    ):
        bad("layer_types", f"a list of {' / '.join(_LAYER_KINDS)}")
    if kwargs.get("rope_parameters") is not None:
        _check_rope(kwargs["rope_parameters"], f"{where}.rope_parameters")
    if kwargs["top_k_experts"] > kwargs["num_experts"]:
        bad("top_k_experts", f"at most num_experts ({kwargs['num_experts']})")
    if kwargs["num_attention_heads"] % kwargs["num_key_value_heads"]:
        bad("num_key_value_heads", "a divisor of num_attention_heads")


def _check_rope(rope: Any, where: str) -> None:
    if not isinstance(rope, dict) or not all(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(
            f"{where} must map each layer type ({', '.join(_LAYER_KINDS)}) to its RoPE "
            f"settings (got {rope!r}); fix the file"
        )
    for kind in _LAYER_KINDS:
        if kind not in rope:
            raise ConfigError(f"{where} has no {kind!r} entry; fix the file")
        theta = rope[kind].get("rope_theta", 10_000.0)
        if not (is_finite_number(theta) and theta > 0):
            raise ConfigError(f"{where}.{kind}.rope_theta must be a number > 0 (got {theta!r})")
        factor = rope[kind].get("partial_rotary_factor", 1.0)
        if not (is_finite_number(factor) and 0 < factor <= 1):
            raise ConfigError(
                f"{where}.{kind}.partial_rotary_factor must be in (0, 1] (got {factor!r})"
            )
        if not isinstance(rope[kind].get("rope_type", "default"), str):
            raise ConfigError(f"{where}.{kind}.rope_type must be a string")


# -- the vision tower ------------------------------------------------------------------


@dataclass
class VisionArgs:
    """The Gemma-4 vision tower (`vision_config`, model_type "gemma4_vision"). Defaults are
    transformers' `Gemma4VisionConfig` defaults, so a partial config means what it means
    there; the released tower is hidden 1152, 27 layers, 16-pixel patches."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    @classmethod
    def from_dict(cls, vc: Dict[str, Any]) -> "VisionArgs":
        where = "vision_config"
        if vc.get("model_type", "gemma4_vision") != "gemma4_vision":
            raise ConfigError(f"{where}.model_type is {vc.get('model_type')!r}, expected 'gemma4_vision'")
        names = {f.name for f in fields(cls)} - {"rope_theta"}
        kwargs = {k: v for k, v in vc.items() if k in names and v is not None}
        for name in names - {"rms_norm_eps", "use_clipped_linears", "standardize"}:
            if name in kwargs and not (is_int(kwargs[name]) and kwargs[name] >= 1):
                raise ConfigError(f"{where}.{name} must be a positive integer (got {kwargs[name]!r}); fix the file")
        for name in ("use_clipped_linears", "standardize"):
            if name in kwargs and not isinstance(kwargs[name], bool):
                raise ConfigError(f"{where}.{name} must be true or false (got {kwargs[name]!r}); fix the file")
        eps = kwargs.get("rms_norm_eps", 1e-6)
        if not (is_finite_number(eps) and eps > 0):
            raise ConfigError(f"{where}.rms_norm_eps must be a number > 0 (got {eps!r}); fix the file")
        if vc.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_approx"):
            raise ConfigError(f"{where}.hidden_activation must be 'gelu_pytorch_tanh'")
        rope = vc.get("rope_parameters") or {}
        if not isinstance(rope, dict) or rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ConfigError(f"{where}.rope_parameters must be axial RoPE (got {rope!r}); fix the file")
        theta = rope.get("rope_theta", 100.0)
        if not (is_finite_number(theta) and theta > 0):
            raise ConfigError(f"{where}.rope_parameters.rope_theta must be a number > 0 (got {theta!r})")
        args = cls(rope_theta=float(theta), **kwargs)
        if args.head_dim % 4:
            # the 2-D RoPE rotates half of each head by x, half by y, in pairs
            raise ConfigError(f"{where}.head_dim must be a multiple of 4 (got {args.head_dim})")
        if args.num_attention_heads % args.num_key_value_heads:
            raise ConfigError(f"{where}.num_key_value_heads must divide num_attention_heads")
        return args


def _vision_fields(config: Dict[str, Any]) -> Dict[str, Any]:
    """ModelArgs' image fields from the top level of config.json."""
    out: Dict[str, Any] = {}
    vc = config.get("vision_config")
    if vc is not None:
        if not isinstance(vc, dict):
            raise ConfigError(f"vision_config must be an object (got {vc!r}); fix the file")
        out["vision_config"] = VisionArgs.from_dict(vc)
    for name in ("image_token_id", "boi_token_id", "eoi_token_id", "vision_soft_tokens_per_image"):
        if config.get(name) is not None:
            if not (is_int(config[name]) and config[name] >= 0):
                raise ConfigError(f"{name} must be an integer >= 0 (got {config[name]!r}); fix the file")
            out[name] = config[name]
    return out


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
    # Images: "vision" makes each contiguous run of image tokens attend to itself
    # bidirectionally in the encoder (text stays causal); None keeps everything causal.
    use_bidirectional_attention: Optional[str] = None
    # The vision tower (None: a text-only model) and the ids that frame an image in a
    # prompt: <|image> (boi), then one <|image|> per soft token, then <image|> (eoi).
    vision_config: Optional[VisionArgs] = None
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    vision_soft_tokens_per_image: int = 280

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
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionArgs.from_dict(self.vision_config)

    def head_dim_of(self, layer_idx: int) -> int:
        full = self.layer_types[layer_idx] == "full_attention"
        return self.global_head_dim if full else self.head_dim

    def kv_heads_of(self, layer_idx: int) -> int:
        full = self.layer_types[layer_idx] == "full_attention"
        return self.num_global_key_value_heads if full else self.num_key_value_heads

    @classmethod
    def from_dict(cls, config: Dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Builds the args from an HF `config.json` dict (nested `text_config`); `source`
        names the file in errors."""
        try:
            return cls._from_dict(config)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def _from_dict(cls, config: Dict[str, Any]) -> "ModelArgs":
        if not isinstance(config, dict):
            raise ConfigError(f"expected a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"model_type is {model_type!r}, expected {MODEL_TYPE!r}: this is not a "
                "DiffusionGemma checkpoint (google/diffusiongemma-26B-A4B-it or a conversion of it)"
            )
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("text_config is missing or not an object")
        if text.get("model_type", TEXT_MODEL_TYPE) != TEXT_MODEL_TYPE:
            raise ConfigError(
                f"text_config.model_type is {text.get('model_type')!r}, expected {TEXT_MODEL_TYPE!r}"
            )
        missing = [k for k in _REQUIRED_TEXT_KEYS if text.get(k) is None]
        if missing:
            raise ConfigError(f"text_config is missing required keys: {', '.join(missing)}")
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(
                "use_bidirectional_attention='all' (a bidirectional encoder) is not supported"
            )

        names = {f.name for f in fields(cls)} - set(_TOP_LEVEL_FIELDS)
        kwargs = {k: v for k, v in text.items() if k in names and k != "model_type"}
        _check_text_fields(kwargs, "text_config")
        if kwargs.get("use_bidirectional_attention") not in (None, "vision"):
            raise ConfigError(
                "text_config.use_bidirectional_attention must be 'vision' or null (got "
                f"{kwargs['use_bidirectional_attention']!r}); fix the file"
            )
        kwargs.update(_vision_fields(config))
        if "canvas_length" in config:
            canvas = config["canvas_length"]
            if not (is_int(canvas) and canvas >= 1):
                raise ConfigError(
                    f"canvas_length must be a positive integer (got {canvas!r}); fix the file"
                )
            kwargs["canvas_length"] = canvas
        # Full-attention overrides: the released config says global_head_dim /
        # num_global_key_value_heads, transformers' save_pretrained writes per_layer_config.
        layer_types = kwargs.get("layer_types") or default_layer_types(kwargs["num_hidden_layers"])
        per_layer = text.get("per_layer_config") or {}
        if not isinstance(per_layer, dict) or not all(
            isinstance(v, dict) for v in per_layer.values()
        ):
            raise ConfigError("text_config.per_layer_config must map layers to objects")
        if per_layer:
            kwargs.update(_global_overrides_from_per_layer(per_layer, layer_types, text))
            _check_text_fields(kwargs, "text_config.per_layer_config")
        return cls(**kwargs)


def _global_overrides_from_per_layer(per_layer, layer_types, text) -> Dict[str, Any]:
    """Reads the full-attention head size / KV heads from `per_layer_config`."""
    out: Dict[str, Any] = {}
    seen = set()
    for key, overrides in per_layer.items():
        if key in ("sliding_attention", "full_attention"):
            kind = key
        elif str(key).isdigit() and int(key) < len(layer_types):
            kind = layer_types[int(key)]
        else:
            raise ConfigError(
                f"text_config.per_layer_config key {key!r} is neither a layer type nor a "
                f"layer index below {len(layer_types)}"
            )
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
        seen = {tuple(str(x) for x in item) for item in seen}  # sortable whatever the types
        raise ConfigError(f"full-attention layers disagree in per_layer_config: {sorted(seen)}")
    if seen:
        head_dim, kv_heads = seen.pop()
        if head_dim is not None:
            out["global_head_dim"] = head_dim
        if kv_heads is not None:
            out["num_global_key_value_heads"] = kv_heads
    return out


def read_json_object(path: Path, what: str = "an object", error: type = ConfigError) -> Dict[str, Any]:
    """A JSON file that must hold an object (`what` says which kind, for the message);
    anything else is an `error` (the caller's kind: a config, a checkpoint, image
    settings) naming the file."""
    fix = "re-download or re-convert the model"
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e}); {fix}") from None
    except RecursionError:
        raise error(f"{path} nests too deeply to be {what}; {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not {what}; {fix}")
    return data


def load_config(model_path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(model_path) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: a model directory needs its config.json (is this the right path?)"
        )
    return read_json_object(path, "a model config")


# -- generation ---------------------------------------------------------------------

class GenerationConfigError(ValueError):
    """An invalid generation parameter; `field` names it (so a caller can name the file
    the value came from)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"invalid generation parameter: {message}")
        self.field = field


@dataclass(frozen=True)
class GenerationConfig:
    """The drafter's parameters, under the reference's own names; the defaults are the
    released generation_config.json's (used where a checkpoint gives none)."""

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
        if is_int(self.eos_token_id):
            object.__setattr__(self, "eos_token_id", [self.eos_token_id])
        self.validate()

    def validate(self) -> None:
        def bad(name, rule):
            value = getattr(self, name)
            raise GenerationConfigError(name, f"{name} {rule} (got {value!r})")

        for name in ("max_denoising_steps", "max_new_tokens"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                bad(name, "must be an integer >= 1")
        for name in ("entropy_bound", "confidence_threshold"):
            if not (is_finite_number(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, "must be > 0 and finite")
        for name in ("t_min", "t_max"):
            if not (is_finite_number(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "must be a temperature >= 0 and finite")
        if self.t_min > self.t_max:
            bad("t_min", f"must not exceed t_max ({self.t_max})")
        if self.t_min == 0:
            # The last step runs at t_min; a zero temperature divides the logits by zero.
            bad("t_min", "must be > 0: the temperature at the last step is t_min")
        if not (is_int(self.stability_threshold) and self.stability_threshold >= 0):
            bad("stability_threshold", "must be an integer >= 0")
        if not (is_int(self.pad_token_id) and self.pad_token_id >= 0):
            bad("pad_token_id", "must be a token id (an integer >= 0)")
        eos = self.eos_token_id
        if eos is not None and not (isinstance(eos, list) and is_token_ids(eos)):
            bad("eos_token_id", "must be a token id, a list of token ids, or null")

    def temperature(self, step: int) -> float:
        """The reference's linear schedule, t_min + (t_max - t_min) * step / N, where `step`
        counts down from N (first step, t_max) to 1 (last step). Computed in float32 op by
        op as the reference does (its step is an int32 tensor), so both agree to the bit."""
        f32 = np.float32
        ratio = f32(step) / f32(self.max_denoising_steps)
        return float(f32(self.t_min) + f32(self.t_max - self.t_min) * ratio)

    @classmethod
    def from_model_dir(cls, model_path: Union[str, Path, None], **overrides) -> "GenerationConfig":
        """Checkpoint defaults (generation_config.json, else config.json) with per-call
        overrides. A bad checkpoint value is a ConfigError naming its file."""
        values, origin = {}, {}
        if model_path is not None:
            values, origin = _checkpoint_generation_values(Path(model_path))
        try:
            defaults = cls(**values)
        except GenerationConfigError as e:
            raise ConfigError(f"{origin.get(e.field, model_path)}: {e}") from None
        return defaults.with_overrides(**overrides)

    def with_overrides(self, **overrides) -> "GenerationConfig":
        """A copy with `overrides` applied (eos_token_id=None disables EOS), validated."""
        values = asdict(self)
        for k, v in overrides.items():
            if k not in values:
                raise TypeError(f"unknown generation parameter {k!r}; known: {', '.join(values)}")
            values[k] = v
        return type(self)(**values)


def _checkpoint_generation_values(model_path: Path) -> Tuple[Dict[str, Any], Dict[str, Path]]:
    """The generation values a checkpoint sets, and the file each came from."""
    out: Dict[str, Any] = {}
    origin: Dict[str, Path] = {}
    sources = []
    # the latter wins
    for name, what in (("config.json", "a model config"), ("generation_config.json", "a generation config")):
        path = model_path / name
        if path.exists():
            sources.append((path, read_json_object(path, what)))
    for path, src in sources:
        for k in (f.name for f in fields(GenerationConfig)):
            if k == "eos_token_id":
                continue
            if src.get(k) is not None:
                out[k], origin[k] = src[k], path
        sampler = src.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            out["entropy_bound"], origin["entropy_bound"] = sampler["entropy_bound"], path
    # eos: the generation config's list (which adds <turn|> and <|tool_response>) wins.
    for path, src in reversed(sources):
        if src.get("eos_token_id") is not None:
            eos = src["eos_token_id"]
            out["eos_token_id"] = [eos] if is_int(eos) else eos
            origin["eos_token_id"] = path
            break
    return out, origin

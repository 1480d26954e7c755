"""What one generation runs with, resolved once where a request comes in.

`Settings` holds the drafter's `GenerationConfig` (the reference's names), the mode
("reference" or "fast", with fast mode's options), the seed and, with a target model
(speculative drafting), the target's sampling temperature. Each edge speaks its own
dialect and translates it into these names: the OpenAI body (serve/openai.py), the
command line's flags (chat/options.py) and the REPL's `/set key=value` (`parse_set`
here). `resolve` then checks them together, once: it builds the one `GenerationConfig`,
checks the mode (fast mode runs on MLX only), the seed and what the reply reserves of
the context. Past the edge the loop, the session, the backends and the speculative path
take the Settings as they are. No array framework here.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..models.config import GenerationConfig, is_finite_number, is_int

# reference: the released sampler, token-exact to transformers; fast: fast.py (MLX only).
MODES = ("reference", "fast")
# Seeds are unsigned 64-bit: what mx.random.seed and torch's manual_seed both take
# (NumPy's SeedSequence takes any integer >= 0).
SEED_MAX = 2**64 - 1
GEN_FIELDS = tuple(f.name for f in fields(GenerationConfig))
OTHER_FIELDS = ("mode", "fast", "seed", "target_temperature")


class SettingsError(ValueError):
    """A setting that cannot be used; `field` names it (the server's 400 says which)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_seed(seed: Any) -> Optional[int]:
    """`seed` when it is None or an integer in [0, 2**64-1], else a SettingsError."""
    if seed is not None and not (is_int(seed) and 0 <= seed <= SEED_MAX):
        raise SettingsError("seed", f"seed must be an integer from 0 to 2**64-1 = {SEED_MAX} (got {seed!r})")
    return seed


@dataclass(frozen=True)
class Settings:
    gen: GenerationConfig
    mode: str = "reference"
    fast: Any = None  # fast.FastOptions with mode "fast" (None: its defaults)
    seed: Optional[int] = None
    target_temperature: Optional[float] = None  # with a target model: its temperature (0: greedy)

    def reserve(self, canvas_length: int) -> int:
        """Context tokens a reply may take: every canvas max_new_tokens may need, whole."""
        return reserved_tokens(self.gen, canvas_length)

    def check_context(self, tokens: int, canvas_length: int, limit: int,
                      fix: str = "shorten the prompt or lower max_new_tokens", at_least: bool = False) -> None:
        """Refuses a generation from `tokens` of context (what a cache holds plus the new
        prompt; `at_least`: a lower bound, taken before the prompt is tokenized) whose
        canvases could run past `limit`."""
        check_reserve(tokens, self.reserve(canvas_length), limit, fix, at_least=at_least)

    def describe(self) -> Dict[str, Any]:
        """The settings as `/set` writes them."""
        g = self.gen
        return {
            "max_new_tokens": g.max_new_tokens,
            "steps": g.max_denoising_steps,
            "temp": f"{g.t_min:g}-{g.t_max:g}",
            "entropy_bound": g.entropy_bound,
            "stability": g.stability_threshold,
            "confidence": g.confidence_threshold,
            "seed": self.seed,
            "eos": "none" if g.eos_token_id is None else ",".join(str(t) for t in g.eos_token_id),
            "mode": self.mode,
        }


def defaults(model) -> Settings:
    """A model's generation defaults (its generation_config.json, read once at load into
    `model.generation_defaults`), reference mode, no seed."""
    gen = getattr(model, "generation_defaults", None)
    return Settings(gen if gen is not None else GenerationConfig.from_model_dir(getattr(model, "model_path", None)))


def resolve(base: Settings, *, backend: str = "mlx", context: Optional[Tuple[int, int]] = None,
            **changes) -> Settings:
    """`base` with `changes` (GenerationConfig fields under the reference's names, `mode`,
    `fast`, `seed`, `target_temperature`), checked together; the one place a
    GenerationConfig is built for a request. `backend`: "mlx" or "torch" (fast mode runs
    on MLX only). `context` = (canvas length, context limit): the reply's canvases must
    leave room for a prompt."""
    unknown = sorted(set(changes) - set(GEN_FIELDS) - set(OTHER_FIELDS))
    if unknown:
        raise TypeError(f"unknown generation parameter {unknown[0]!r}; known: {', '.join(GEN_FIELDS)}")
    gen = base.gen.with_overrides(**{k: v for k, v in changes.items() if k in GEN_FIELDS})
    mode = changes.get("mode", base.mode)
    if mode not in MODES:
        raise SettingsError("mode", f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "fast" and backend != "mlx":
        raise SettingsError("mode", "fast mode runs on the MLX backend only")
    fast = changes.get("fast", base.fast if mode == "fast" else None)
    if fast is not None and mode != "fast":
        raise SettingsError("fast", "fast options need mode='fast'")
    t = changes.get("target_temperature", base.target_temperature)
    if t is not None and not (is_finite_number(t) and t >= 0):
        raise SettingsError("temperature", f"temperature must be >= 0 (got {t!r}); 0 is greedy")
    if context is not None and reserved_tokens(gen, context[0]) >= context[1]:
        raise SettingsError("max_new_tokens", f"max_new_tokens={gen.max_new_tokens} reserves "
                            f"{reserved_tokens(gen, context[0])} tokens, the whole {context[1]}-token "
                            "context; lower it")
    return Settings(gen, mode, fast, check_seed(changes.get("seed", base.seed)), t)


# -- the context ------------------------------------------------------------------------


def reserved_tokens(gen: GenerationConfig, canvas_length: int) -> int:
    """Context tokens a reply may take: every canvas `max_new_tokens` may need, whole."""
    return math.ceil(gen.max_new_tokens / canvas_length) * canvas_length


def check_reserve(context_tokens: int, reserve: int, limit: int,
                  fix: str = "shorten the prompt or lower max_new_tokens", whose: str = "",
                  at_least: bool = False) -> None:
    """Refuses `context_tokens` plus up to `reserve` more past `limit` (`whose`: which
    model's context, for the message)."""
    if context_tokens + reserve > limit:
        raise ValueError(
            f"prompt too long: {'at least ' if at_least else ''}{context_tokens} context tokens "
            f"+ up to {reserve} generated exceed the {whose}{limit}-token context; {fix}"
        )


def context_limit(requested: Optional[int], model_limit: int) -> Tuple[int, Optional[str]]:
    """(the context a run enforces, a note or None): `requested` (--max-context), but never
    more than the model's own, and then the note says so instead of clamping in silence."""
    if requested is not None and requested < 1:
        raise ValueError(f"max_context must be a positive number of tokens (got {requested})")
    if requested is None or requested >= model_limit:
        note = None if requested in (None, model_limit) else (
            f"a {requested:,}-token context was asked for, but the model's is {model_limit:,} "
            f"tokens: using {model_limit:,}")
        return model_limit, note
    return requested, None


# -- the /set dialect (and the command line's text values) ----------------------------------

# /set keys -> GenerationConfig names
SET_KEYS = {
    "steps": "max_denoising_steps",
    "max_denoising_steps": "max_denoising_steps",
    "max_new_tokens": "max_new_tokens",
    "max-new-tokens": "max_new_tokens",
    "tokens": "max_new_tokens",
    "entropy_bound": "entropy_bound",
    "entropy": "entropy_bound",
    "stability": "stability_threshold",
    "stability_threshold": "stability_threshold",
    "confidence": "confidence_threshold",
    "confidence_threshold": "confidence_threshold",
    "t_min": "t_min",
    "t_max": "t_max",
}
_KINDS = {f.name: type(f.default) for f in fields(GenerationConfig) if f.default is not MISSING}


def parse_set(pairs: Mapping[str, Any]) -> Dict[str, Any]:
    """`/set key=value ...` (values as typed, or already numbers) -> `resolve`'s changes:
    the aliases of SET_KEYS, `temp` as "a-b", `seed` and `eos` (none or ids), `mode`."""
    out: Dict[str, Any] = {}
    for key, value in pairs.items():
        if value is None:
            continue
        if key == "mode":
            out["mode"] = str(value).strip().lower()
        elif key == "temp":
            out["t_min"], out["t_max"] = parse_temp(str(value))
        elif key == "seed":
            out["seed"] = parse_seed(value)
        elif key in ("eos", "eos_token_id"):
            out["eos_token_id"] = parse_eos(value)
        elif key in SET_KEYS:
            out[SET_KEYS[key]] = parse_number(key, _KINDS[SET_KEYS[key]], value)
        else:
            known = ", ".join(sorted(set(SET_KEYS) | {"temp", "seed", "eos", "mode"}))
            raise ValueError(f"unknown setting {key!r}; known: {known}")
    return out


def parse_temp(text: str) -> Tuple[float, float]:
    """`a-b` -> (t_min, t_max); a single value sets both. The range's dash is the first
    one that is neither the leading sign nor an exponent's (`1e-3-0.5`)."""
    text = str(text).strip()
    cut = next((i for i in range(1, len(text)) if text[i] == "-" and text[i - 1] not in "eE"), -1)
    parts = [text] if cut < 0 else [text[:cut], text[cut + 1 :]]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"temp must be a-b or one number, e.g. 0.4-0.8 (got {text!r})") from None
    return (values[0], values[-1])


def parse_seed(value) -> Optional[int]:
    """`none`/`off` (no seed) or an integer in [0, 2**64-1]."""
    if value is None or str(value).strip().lower() in ("none", "off", ""):
        return None
    try:
        seed = int(str(value).strip())
    except ValueError:
        raise ValueError(f"seed must be none or an integer from 0 to {SEED_MAX} (got {value!r})") from None
    return check_seed(seed)


def parse_number(key: str, kind: type, value) -> Any:
    try:
        return kind(str(value).strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{key} must be {what} (got {value!r})") from None


def parse_eos(value) -> Optional[List[int]]:
    """`none` (generate to max_new_tokens), `1,106,50`, or a list of ids."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [int(v) for v in value]
    text = str(value).strip().lower()
    if text in ("none", "off", ""):
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"eos must be none or comma-separated token ids (got {value!r})") from None

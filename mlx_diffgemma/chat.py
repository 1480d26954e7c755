"""`mlx-diffgemma chat` (the streaming REPL) and `mlx-diffgemma generate` (one prompt).

`ChatSession` holds the conversation and the encoder's KV cache and has no UI: it renders
the chat template, works out which tokens the cache already holds, encodes only the
rest, and streams the drafter's events. The REPL (`run_repl`) draws those events with
`rich`: a live view of the canvas being denoised, the committed text joining the
conversation, and a one-line summary per reply.

KV-cache reuse across turns
---------------------------
The Gemma 4 template ends the active turn's generation prompt with an empty thought
channel (`<|turn>model\\n<|channel>thought\\n<channel|>`), but renders the same turn as
history without it (`<|turn>model\\n{reply}<turn|>\\n`). The conversation-stable part of
a rendered prompt therefore ends right after the last `<|turn>model\\n`; everything after
it (the thought channel, then the reply's canvases that the drafter encodes while it
generates) is thrown away when the turn ends. The boundary is found without knowing the
template: render the conversation with a placeholder reply followed by one more user
turn (the reply is then history) and take the common prefix of that text, cut at the
placeholder, and the generation-prompt rendering (see `split_prompt`).

Per turn: the cache is back at the previous stable boundary; the new render must start
with the tokens the cache holds (else the cache is rolled back to the common prefix, or
reset and the whole conversation re-encoded, and the turn says so); only the new stable
tokens are encoded; the drafter gets the suffix (the thought channel) as its prompt; at
the end, interrupted or not, the cache goes back to the new stable boundary.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .config import SEED_MAX, GenerationConfig, check_seed
from .drafter import Commit, Draft, Summary
from .paths import DEFAULT_MODEL, resolve_model_path

# Tokens per encoder call while prefilling: bounds memory, and how long a Ctrl-C waits
# for the stop flag to be checked (about a second for the 26B model on CPU).
PREFILL_CHUNK = 512

# Used only when a tokenizer ships no chat template at all (the released model has one).
GEMMA4_FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|turn>' + role + '\\n' + message['content'] | trim + '<turn|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n<|channel>thought\\n<channel|>' }}{% endif %}"
)

_PLACEHOLDER = "MLXDGREPLYPLACEHOLDER"


# -- chat template ------------------------------------------------------------------


def _hf_tokenizer(tokenizer):
    """The transformers tokenizer inside mlx-lm's TokenizerWrapper (or the tokenizer)."""
    try:
        from mlx_lm.tokenizer_utils import TokenizerWrapper
    except ImportError:  # the torch path without mlx-lm
        return tokenizer
    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def ensure_chat_template(tokenizer, model_path: Optional[Path]) -> str:
    """Makes sure the tokenizer has a chat template: transformers reads an external
    `chat_template.jinja` next to tokenizer_config.json itself; older stacks do not, so
    it is loaded here when missing. Returns where the template came from."""
    hf = _hf_tokenizer(tokenizer)
    if getattr(hf, "chat_template", None):
        return "tokenizer"
    if model_path is not None and (Path(model_path) / "chat_template.jinja").exists():
        hf.chat_template = (Path(model_path) / "chat_template.jinja").read_text()
        return "chat_template.jinja"
    hf.chat_template = GEMMA4_FALLBACK_TEMPLATE
    return "built-in Gemma 4 template"


def render(tokenizer, messages: Sequence[Dict[str, str]], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except TemplateError as e:  # e.g. the template's raise_exception on a role it refuses
        raise ValueError(f"the chat template rejects this conversation: {e}") from None


def check_text(text: str, what: str) -> str:
    """`text`, when it can be encoded: undecodable input bytes reach Python as lone
    surrogates (surrogateescape), which no tokenizer or terminal takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text; type or paste it again") from None
    return text


def encode_text(tokenizer, text: str) -> List[int]:
    """Token ids of already-templated text: no BOS added (the template wrote it)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return [int(t) for t in ids]


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class PromptSplit:
    ids: List[int]  # the full prompt, generation prompt included
    stable: int  # ids[:stable] stay valid once this turn is history

    @property
    def suffix(self) -> List[int]:
        return self.ids[self.stable :]


def split_prompt(tokenizer, messages: Sequence[Dict[str, str]]) -> PromptSplit:
    """The generation prompt of `messages`, and how much of it is conversation-stable:
    the longest prefix that the next turn's rendering (this turn as history) repeats."""
    full_text = render(tokenizer, messages, add_generation_prompt=True)
    history = list(messages) + [
        {"role": "assistant", "content": _PLACEHOLDER},
        {"role": "user", "content": "x"},
    ]
    try:
        hist_text = render(tokenizer, history, add_generation_prompt=False)
        cut = hist_text.find(_PLACEHOLDER)
    except Exception:  # a template that rejects the probe: no reuse of the model turn
        hist_text, cut = "", -1
    if cut < 0:
        hist_text = render(tokenizer, messages, add_generation_prompt=False)
        cut = len(hist_text)
    stable_text = full_text[: _common_prefix_len(full_text, hist_text[:cut])]
    ids = encode_text(tokenizer, full_text)
    stable_ids = encode_text(tokenizer, stable_text)
    return PromptSplit(ids, _common_prefix_len(ids, stable_ids))


# -- backends: the cache operations a chat needs ------------------------------------------


class MLXBackend:
    """The MLX model and its `EncoderCache`.

    Going back to the stable boundary is a trim: the cache's sliding layers keep `slack`
    tokens beyond their window, sized to cover a turn's thought channel plus the
    canvases the drafter encodes, so no snapshot (and no copy of the cache) is needed.
    When a turn could outgrow the slack (max_new_tokens raised after the cache was
    made), that turn takes a snapshot and restores it instead.
    """

    name = "mlx"

    def __init__(self, model):
        import mlx.core as mx

        self.mx = mx
        self.model = model
        self.canvas_length = model.canvas_length
        self.max_context = int(model.args.max_position_embeddings)
        self.slack = 0

    def new_cache(self, max_new_tokens: int):
        C = self.canvas_length
        self.slack = math.ceil(max_new_tokens / C) * C + 64
        return self.model.make_cache(slack=self.slack)

    def encode(self, cache, ids: Sequence[int]) -> None:
        self.model.encode(self.mx.array([list(ids)], dtype=self.mx.int32), cache)

    def consistent(self, cache, length: int) -> bool:
        return all(layer.offset == length for layer in cache.layers)

    def can_trim(self, cache, n: int) -> bool:
        return n == 0 or cache.can_trim(n)

    def trim(self, cache, n: int) -> None:
        cache.trim(n)

    def offset(self, cache) -> int:
        return cache.offset

    def snapshot(self, cache):
        return cache.snapshot()

    def restore(self, cache, snap):
        cache.restore(snap)
        return cache

    def stream_generate(self, tokenizer, prompt, cache, noise, seed, gen_kwargs):
        from .denoiser import stream_generate

        return stream_generate(
            self.model, tokenizer, prompt, cache=cache, noise=noise, seed=seed, **gen_kwargs
        )

    def cache_bytes(self, cache) -> int:
        return cache.nbytes


class TorchBackend:
    """transformers' model and its DynamicCache.

    DynamicCache cannot roll back a sliding-window layer once its window is full
    (`crop` refuses), so the stable boundary is kept as a deep copy of the cache
    (`copy.deepcopy`), restored by copying it again: the reference path pays that
    memory, the MLX path trims instead.
    """

    name = "torch"

    def __init__(self, model):
        import torch

        self.torch = torch
        self.model = model
        self.canvas_length = int(model.config.canvas_length)
        self.max_context = int(model.config.get_text_config().max_position_embeddings)
        self.device = next(model.parameters()).device

    def new_cache(self, max_new_tokens: int):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def encode(self, cache, ids: Sequence[int]) -> None:
        t = self.torch.as_tensor([list(ids)], dtype=self.torch.long, device=self.device)
        with self.torch.no_grad():
            self.model.model.encoder(input_ids=t, past_key_values=cache)

    def consistent(self, cache, length: int) -> bool:
        return False  # never trimmed: always restored from the snapshot

    def can_trim(self, cache, n: int) -> bool:
        return n == 0

    def trim(self, cache, n: int) -> None:
        if n:
            raise ValueError("the torch DynamicCache cannot be trimmed")

    def offset(self, cache) -> int:
        return int(cache.get_seq_length()) if len(cache.layers) else 0

    def snapshot(self, cache):
        return copy.deepcopy(cache)

    def restore(self, cache, snap):
        return copy.deepcopy(snap)

    def stream_generate(self, tokenizer, prompt, cache, noise, seed, gen_kwargs):
        from .torch_backend import stream_generate

        return stream_generate(
            self.model, tokenizer, prompt, cache=cache, noise=noise, seed=seed, **gen_kwargs
        )

    def cache_bytes(self, cache) -> int:
        total = 0
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if t is not None and hasattr(t, "numel"):
                    total += t.numel() * t.element_size()
        return total


def make_backend(model):
    return MLXBackend(model) if hasattr(model, "make_cache") else TorchBackend(model)


# -- the session -----------------------------------------------------------------------


@dataclass
class Prefill:
    """First event of a turn: how the prompt was brought into the cache."""

    reused: int  # tokens the cache already held
    encoded: int  # new conversation tokens encoded now
    suffix: int  # generation-prompt tokens after the stable boundary (the drafter encodes them)
    time: float  # seconds spent encoding the `encoded` tokens
    note: Optional[str] = None  # why the cache was cleared, if it was
    rolled_back: int = 0  # cached tokens cut because the conversation differs from them
    kind: str = "prefill"


@dataclass
class Interrupted:
    """Last event of a turn stopped by the caller; the reply is dropped."""

    canvases_done: int
    kind: str = "interrupted"


@dataclass
class TurnStats:
    reused: int
    encoded: int
    suffix: int
    prefill_time: float
    prompt_time: float  # prefill + the drafter's encode of the suffix
    tokens: int = 0
    canvases: int = 0
    steps_per_canvas: List[int] = field(default_factory=list)
    tokens_per_forward: float = 0.0
    generation_time: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str = ""
    note: Optional[str] = None


# /set keys -> GenerationConfig names
SETTING_ALIASES = {
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
        raise ValueError(
            f"seed must be none or an integer from 0 to {SEED_MAX} (got {value!r})"
        ) from None
    return check_seed(seed)


def _parse_number(key: str, kind: type, value) -> Any:
    try:
        return kind(str(value).strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{key} must be {what} (got {value!r})") from None


def _parse_eos(value) -> Optional[List[int]]:
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


class ChatSession:
    """A conversation with one model and its encoder cache; no UI.

    `send(text)` yields a `Prefill`, then the drafter's `Draft`/`Commit` events and its
    `Summary` (the reply joins the conversation), or ends with `Interrupted` when
    `should_stop()` turns true (checked between prefill chunks and denoising steps): the
    user message and the partial reply are dropped; the cache keeps only a prefix of the
    rendered conversation, which the next turn cuts back to what it shares.

    The cache invariant: `cached_ids` are exactly the tokens the cache holds, always a
    prefix of some rendering of the conversation, ending at a stable boundary after a
    finished turn.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: Optional[str] = None,
        gen_kwargs: Optional[Dict[str, Any]] = None,
        seed: Optional[int] = None,
        noise=None,
        max_context: Optional[int] = None,
        model_name: Optional[str] = None,
        keep_history: bool = True,
    ):
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer: the model directory has none")
        self.model = model
        self.tokenizer = tokenizer
        self.backend = make_backend(model)
        self.model_path = getattr(model, "model_path", None)
        self.model_name = model_name or str(self.model_path)
        self.template_source = ensure_chat_template(tokenizer, self.model_path)
        self.system = check_text(system, "the system prompt") if system else None
        self.noise = noise
        # False: every message is sent as a fresh conversation (single-turn models such as
        # toy-sudoku); the transcript still keeps every turn.
        self.keep_history = keep_history
        limit = self.backend.max_context
        if max_context is not None and max_context < 1:
            raise ValueError(f"max_context must be a positive number of tokens (got {max_context})")
        self.max_context = min(max_context, limit) if max_context else limit
        self.seed = check_seed(seed)
        self.gen_kwargs: Dict[str, Any] = {}
        self.update_settings(**(gen_kwargs or {}))
        self.messages: List[Dict[str, str]] = []
        self.turns: List[TurnStats] = []
        self.interrupted = 0
        self.resets = 0
        self._reset_cache()

    # -- settings -------------------------------------------------------------------

    @property
    def gen(self) -> GenerationConfig:
        return GenerationConfig.from_model_dir(self.model_path, **self.gen_kwargs)

    def update_settings(self, **kwargs) -> None:
        """Validates and applies generation overrides (GenerationConfig names, plus
        `temp` as "a-b" and `seed`)."""
        new = dict(self.gen_kwargs)
        seed = self.seed
        for key, value in kwargs.items():
            if value is None:
                continue
            if key == "temp":
                new["t_min"], new["t_max"] = parse_temp(str(value))
            elif key == "seed":
                seed = parse_seed(value)
            elif key in ("eos", "eos_token_id"):
                new["eos_token_id"] = _parse_eos(value)
            elif key in SETTING_ALIASES:
                name = SETTING_ALIASES[key]
                new[name] = _parse_number(key, type(getattr(GenerationConfig(), name)), value)
            else:
                known = ", ".join(sorted(set(SETTING_ALIASES) | {"temp", "seed", "eos"}))
                raise ValueError(f"unknown setting {key!r}; known: {known}")
        gen = GenerationConfig.from_model_dir(self.model_path, **new)  # ValueError when invalid
        if self._reserve(gen) >= self.max_context:
            raise ValueError(
                f"max_new_tokens={gen.max_new_tokens} reserves {self._reserve(gen)} tokens, "
                f"the whole {self.max_context}-token context; lower it"
            )
        self.gen_kwargs, self.seed = new, seed

    def settings(self) -> Dict[str, Any]:
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
        }

    # -- conversation -----------------------------------------------------------------

    def _reset_cache(self) -> None:
        self.cache = self.backend.new_cache(self.gen.max_new_tokens)
        self.cached_ids: List[int] = []  # what the cache holds at rest (a stable prefix)
        self._snap: Optional[Tuple[int, Any]] = None  # (tokens, snapshot) of a stable boundary

    def reset(self) -> None:
        """Forgets the conversation (the system prompt stays) and empties the cache."""
        self.messages = []
        self._reset_cache()

    def set_system(self, text: Optional[str]) -> None:
        # The conversation now renders differently from its start: the next turn cuts the
        # cache back to the common prefix (<bos><|turn>) or clears it (and says so).
        self.system = check_text(text, "the system prompt") if text else None

    @property
    def cached_tokens(self) -> int:
        return len(self.cached_ids)

    def conversation(self, user_text: Optional[str] = None) -> List[Dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        if self.keep_history:
            msgs += self.messages
        if user_text is not None:
            msgs.append({"role": "user", "content": user_text})
        return msgs

    def _reserve(self, gen: GenerationConfig) -> int:
        """Context tokens a reply may take: whole canvases."""
        C = self.backend.canvas_length
        return math.ceil(gen.max_new_tokens / C) * C

    def _check_context(self, n_prompt: int) -> None:
        reserve = self._reserve(self.gen)
        if n_prompt + reserve > self.max_context:
            raise ValueError(
                f"prompt too long: {n_prompt} context tokens + up to {reserve} generated "
                f"exceed the {self.max_context}-token context; /reset the conversation, "
                "shorten the message or lower max_new_tokens"
            )

    def _rollback(self, length: int) -> bool:
        """Brings the cache back to its first `length` tokens: a trim (MLX, when every
        layer is at the same offset and the sliding layers' slack covers it), else the
        snapshot taken at that boundary. False when neither is possible."""
        b = self.backend
        if b.name == "mlx":
            have = b.offset(self.cache)
            if have >= length and b.consistent(self.cache, have) and b.can_trim(self.cache, have - length):
                b.trim(self.cache, have - length)
                return True
        if self._snap is not None and self._snap[0] == length:
            self.cache = b.restore(self.cache, self._snap[1])
            return True
        return False

    def _rollback_or_reset(self, length: int) -> Optional[str]:
        if self._rollback(length):
            self.cached_ids = self.cached_ids[:length]
            if self.backend.name == "mlx":
                self._snap = None  # MLX snapshots live for one turn only (memory)
            return None
        self._reset_cache()
        self.resets += 1
        return "the cache could not be rolled back and was cleared: the next turn re-encodes the conversation"

    def send(self, user_text: str, should_stop: Callable[[], bool] = lambda: False) -> Iterator[Any]:
        """One turn. Yields Prefill, then Draft/Commit/Summary, or ends with Interrupted."""
        msgs = self.conversation(check_text(user_text, "the message"))
        split = split_prompt(self.tokenizer, msgs)
        self._check_context(len(split.ids))
        gen = self.gen
        b = self.backend

        # 1. What the cache holds must be a prefix of the new render, else it is cut back
        #    to the common prefix (after an interrupted turn it still holds the dropped
        #    message, which is cut here), or cleared when it cannot be cut.
        note = None
        keep = _common_prefix_len(self.cached_ids, split.ids[: split.stable])
        rolled_back = 0
        if keep < len(self.cached_ids):
            held = len(self.cached_ids)
            if keep > 0 and self._rollback(keep):
                self.cached_ids = self.cached_ids[:keep]
                rolled_back = held - keep
            else:
                self._reset_cache()
                self.resets += 1
                keep = 0
                note = (
                    f"the cache no longer matches the conversation and cannot be cut back: "
                    f"cleared, re-encoding all {split.stable} tokens"
                )

        # 2. Encode only the new stable tokens, in chunks (bounded memory), stoppable
        #    between chunks; what was encoded before a stop stays (it is a prefix).
        new = split.ids[keep : split.stable]
        tic = time.perf_counter()
        try:
            for s in range(0, len(new), PREFILL_CHUNK):
                if should_stop():
                    self.interrupted += 1
                    yield Interrupted(0)
                    return
                b.encode(self.cache, new[s : s + PREFILL_CHUNK])
                self.cached_ids = split.ids[: keep + min(s + PREFILL_CHUNK, len(new))]
        except BaseException:
            self._reset_cache()  # an encoder call broke off midway: the cache is unknown
            self.resets += 1
            raise
        prefill_time = time.perf_counter() - tic
        self.cached_ids = split.ids[: split.stable]
        stable = split.stable

        # 3. Make sure the end of the turn can come back to the stable boundary: MLX trims
        #    when the sliding layers' slack covers the turn, otherwise take a snapshot.
        C = b.canvas_length
        extra = len(split.suffix) + (math.ceil(gen.max_new_tokens / C) - 1) * C
        if b.name != "mlx" or extra > b.slack:
            self._snap = (stable, b.snapshot(self.cache))
        yield Prefill(keep, len(new), len(split.suffix), prefill_time, note, rolled_back)

        # 4. Generate from the suffix; whatever happens, go back to the stable boundary.
        stats = TurnStats(keep, len(new), len(split.suffix), prefill_time, prefill_time, note=note)
        seed = None if self.seed is None else (self.seed + len(self.turns)) % (SEED_MAX + 1)
        events = b.stream_generate(self.tokenizer, split.suffix, self.cache, self.noise, seed, self.gen_kwargs)
        canvases = 0
        finished = False
        try:
            for ev in events:
                if isinstance(ev, Summary):
                    self.messages += [
                        {"role": "user", "content": user_text},
                        {"role": "assistant", "content": ev.text},
                    ]
                    stats.prompt_time += ev.prompt_time
                    stats.tokens = len(ev.tokens)
                    stats.canvases = ev.canvases
                    stats.steps_per_canvas = list(ev.steps_per_canvas)
                    stats.tokens_per_forward = ev.tokens_per_forward
                    stats.generation_time = ev.generation_time
                    stats.generation_tps = ev.generation_tps
                    stats.peak_memory_gb = ev.peak_memory_gb
                    stats.finish_reason = ev.finish_reason
                    self.turns.append(stats)
                    finished = True
                    yield ev
                    break
                if isinstance(ev, Commit):
                    canvases += 1
                yield ev
                if should_stop():
                    break
        finally:
            events.close()
            settle_note = self._rollback_or_reset(stable)
            if settle_note:
                stats.note = settle_note
        if not finished:
            self.interrupted += 1
            yield Interrupted(canvases)

    # -- reporting -----------------------------------------------------------------------

    def transcript(self) -> Dict[str, Any]:
        return {
            "model": self.model_name,
            "backend": self.backend.name,
            "settings": self.settings(),
            "system": self.system,
            "messages": self.conversation(),
            "turns": [asdict(t) for t in self.turns],
        }

    def save(self, path) -> Path:
        path = Path(path).expanduser()
        path.write_text(json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n")
        return path


# -- rendering --------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def summary_line(summary: Summary, prefill: Optional[Prefill], prompt_time: float) -> str:
    steps = summary.steps_per_canvas
    if len(steps) <= 8:
        steps_text = "+".join(str(s) for s in steps)
    else:
        steps_text = f"avg {sum(steps) / len(steps):.1f} (min {min(steps)}, max {max(steps)})"
    parts = [
        _plural(len(summary.tokens), "token"),
        _plural(summary.canvases, "canvas").replace("canvass", "canvases"),
        f"steps {steps_text}",
        f"{summary.tokens_per_forward:.2f} tok/forward",
        f"{summary.generation_tps:.1f} tok/s",
    ]
    if prefill is not None:
        parts.append(
            f"prompt {prefill.encoded + prefill.suffix} new + {prefill.reused} cached tokens "
            f"encoded in {prompt_time:.3f} s"
        )
    else:
        parts.append(f"prompt {summary.prompt_tokens} tokens encoded in {prompt_time:.3f} s")
    return " · ".join(parts)


class CanvasView:
    """The live picture of one canvas: settled tokens (same argmax as the previous step,
    or accepted this step) bright, still-noisy ones dim; a "canvas k · step n/N" header."""

    def __init__(self, tokenizer, steps: int, max_chars: int = 2000):
        self.tokenizer = tokenizer
        self.steps = steps
        self.max_chars = max_chars
        self._text: Dict[int, str] = {}
        self._prev: Optional[List[int]] = None
        self._canvas = -1

    def token_text(self, t: int) -> str:
        """How token `t` is drawn: special tokens (`<pad>`...) not at all, as in the reply."""
        s = self._text.get(t)
        if s is None:
            try:
                s = self.tokenizer.decode([t], skip_special_tokens=True)
                special = not s and self.tokenizer.decode([t])
            except Exception:
                s, special = f"<{t}>", False
            s = s.replace("\n", "↵").replace("\r", "↵").replace("\t", "⇥")
            s = s or ("" if special else "∅")
            self._text[t] = s
        return s

    def render(self, draft: Draft):
        from rich.text import Text

        if draft.canvas_index != self._canvas:
            self._canvas, self._prev = draft.canvas_index, None
        prev = self._prev
        settled = [
            bool(a) or (prev is not None and i < len(prev) and prev[i] == t)
            for i, (t, a) in enumerate(zip(draft.tokens, draft.accepted))
        ]
        self._prev = list(draft.tokens)
        n = self.steps - draft.step + 1
        header = Text(f"canvas {draft.canvas_index + 1} · step {n}/{self.steps}", style="bold cyan")
        header.append(f"  {sum(settled)}/{len(settled)} settled", style="dim")
        body = Text()
        used = 0
        for t, ok in zip(draft.tokens, settled):
            s = self.token_text(t)
            used += len(s)
            if used > self.max_chars:
                body.append("…", style="dim")
                break
            body.append(s, style="bold" if ok else "dim italic")
        return header, body


# -- the REPL ----------------------------------------------------------------------------

HELP = """\
Commands:
  /help                 this help
  /reset                forget the conversation (keeps the system prompt) and empty the cache
  /system TEXT          set the system prompt (/system alone clears it); the next turn re-encodes
  /set key=value ...    steps=N temp=a-b max_new_tokens=N seed=N|none entropy_bound=X
                        stability=N confidence=X t_min=X t_max=X eos=none|ID,ID,...
  /stats                settings, cache and the last reply's numbers
  /save FILE            write the transcript as JSON
  /exit                 quit (Ctrl-D too)
Ctrl-C while a reply is being generated stops it: the partial reply and your message
are dropped (the conversation is as before it) and you can type again."""


class StopFlag:
    """Set by Ctrl-C while a reply runs. `on_set` gives feedback at once: the flag is
    only read between prefill chunks and denoising steps, up to a second or two later."""

    def __init__(self):
        self._event = threading.Event()
        self.on_set: Optional[Callable[[], None]] = None

    def set(self) -> None:
        first = not self._event.is_set()
        self._event.set()
        if first and self.on_set is not None:
            self.on_set()

    def is_set(self) -> bool:
        return self._event.is_set()


@contextmanager
def _interrupt_flag():
    """While generating, Ctrl-C sets a flag (checked between denoising steps and prefill
    chunks) instead of raising in the middle of an encoder call."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def _stream_reply(session: ChatSession, console, text: str, flag) -> None:
    """One turn on screen: live canvas while it denoises, committed text above it."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    view = CanvasView(session.tokenizer, session.gen.max_denoising_steps)
    label = Text("model › ", style="bold magenta")
    pending = ""  # committed text not yet printed (no newline yet)
    label_done = False
    prefill = None
    last_draw = 0.0
    canvas_lines: Tuple = ()

    def tail():
        t = Text()
        if not label_done:
            t.append_text(label)
        t.append(pending)
        return t

    def frame():
        return Group(tail(), *canvas_lines)

    live = Live(console=console, auto_refresh=False, transient=True, vertical_overflow="visible")
    live.start()
    if hasattr(flag, "on_set"):
        flag.on_set = lambda: live.console.print(Text("stopping…", style="yellow"))
    summary = None
    try:
        for ev in session.send(text, should_stop=flag.is_set):
            if isinstance(ev, Prefill):
                prefill = ev
                if ev.note:
                    live.console.print(Text(f"({ev.note})", style="yellow"))
                canvas_lines = (Text(f"encoded {ev.encoded} new prompt tokens ({ev.reused} cached) in {ev.time:.3f} s", style="dim"),)
                live.update(frame(), refresh=True)
            elif isinstance(ev, Draft):
                now = time.perf_counter()
                canvas_lines = view.render(ev)
                if now - last_draw > 1 / 20 or ev.step == 1:
                    live.update(frame(), refresh=True)
                    last_draw = now
            elif isinstance(ev, Commit):
                pending += ev.text
                if "\n" in pending:
                    done, pending = pending.rsplit("\n", 1)
                    line = Text()
                    if not label_done:
                        line.append_text(label)
                        label_done = True
                    line.append(done)
                    live.console.print(line)
                canvas_lines = ()
                live.update(frame(), refresh=True)
            elif isinstance(ev, Summary):
                summary = ev
            elif isinstance(ev, Interrupted):
                pass
    finally:
        live.update(Text(""), refresh=True)
        live.stop()
    if summary is None:
        if pending or label_done:
            console.print(tail())
        console.print(
            Text(
                "⏹ interrupted: reply dropped (your message too); the conversation is as "
                "before it",
                style="yellow",
            )
        )
        return
    console.print(tail())
    turn = session.turns[-1]
    console.print(Text("  " + summary_line(summary, prefill, turn.prompt_time), style="dim"), soft_wrap=True)
    if turn.note and (prefill is None or turn.note != prefill.note):
        console.print(Text(f"  ({turn.note})", style="yellow"))


def format_memory(gb: float) -> str:
    """A peak-memory reading; 0 means the backend does not measure it (torch on CPU)."""
    if gb <= 0:
        return "unavailable"
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.1f} MB"


def _stats_text(session: ChatSession) -> str:
    lines = [
        f"model: {session.model_name} ({session.backend.name})",
        "settings: " + " ".join(f"{k}={v}" for k, v in session.settings().items()),
        f"conversation: {len(session.messages) // 2} turns, system prompt "
        + ("set" if session.system else "none"),
        f"cache: {session.cached_tokens} tokens held "
        f"({session.backend.cache_bytes(session.cache) / 1e6:.1f} MB), context limit {session.max_context}",
        f"interrupted replies: {session.interrupted}, cache resets: {session.resets}",
    ]
    if session.turns:
        t = session.turns[-1]
        lines.append(
            f"last reply: {t.tokens} tokens, {t.canvases} canvases, steps {t.steps_per_canvas}, "
            f"{t.tokens_per_forward:.2f} tok/forward, {t.generation_tps:.1f} tok/s, "
            f"prompt {t.encoded + t.suffix} new + {t.reused} cached tokens in {t.prompt_time:.3f} s, "
            f"peak memory {format_memory(t.peak_memory_gb)}, finish {t.finish_reason}"
        )
        lines.append(
            "prompt encode per turn: "
            + ", ".join(f"{x.prompt_time:.3f} s ({x.encoded + x.suffix} new)" for x in session.turns)
        )
    return "\n".join(lines)


def _command(session: ChatSession, console, line: str) -> bool:
    """Runs a slash command; False means exit."""
    from rich.text import Text

    cmd, _, rest = line[1:].partition(" ")
    cmd, rest = cmd.lower(), rest.strip()
    if cmd in ("exit", "quit", "q"):
        return False
    if cmd in ("help", "h", "?"):
        console.print(Text(HELP))
    elif cmd == "reset":
        session.reset()
        console.print(Text("conversation and cache cleared", style="green"))
    elif cmd == "system":
        session.set_system(rest)
        console.print(Text(f"system prompt {'set' if rest else 'cleared'}", style="green"))
    elif cmd == "set":
        if not rest:
            console.print(Text(" ".join(f"{k}={v}" for k, v in session.settings().items())))
            return True
        try:
            pairs = {}
            for item in rest.split():
                if "=" not in item:
                    raise ValueError(f"expected key=value, got {item!r}")
                k, v = item.split("=", 1)
                pairs[k.strip().lower()] = v.strip()
            session.update_settings(**pairs)
        except ValueError as e:
            console.print(Text(f"error: {e}", style="red"))
            return True
        console.print(Text(" ".join(f"{k}={v}" for k, v in session.settings().items()), style="green"))
    elif cmd == "stats":
        console.print(Text(_stats_text(session)))
    elif cmd == "save":
        if not rest:
            console.print(Text("usage: /save FILE", style="red"))
            return True
        try:
            path = session.save(rest)
        except OSError as e:
            console.print(Text(f"error: cannot write {rest}: {e}", style="red"))
            return True
        console.print(Text(f"transcript saved to {path}", style="green"))
    else:
        console.print(Text(f"unknown command /{cmd}; /help lists them", style="red"))
    return True


def run_repl(session: ChatSession, console=None, read: Optional[Callable[[], str]] = None) -> int:
    from rich.console import Console
    from rich.text import Text

    console = console or Console(highlight=False)
    if read is None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

        def read():
            return console.input("[bold green]you ›[/] ")

    ctx = session.max_context
    console.print(
        Text(
            f"mlx-diffgemma chat · {session.model_name} ({session.backend.name}) · "
            f"context {ctx:,} tokens · /help for commands, Ctrl-D to quit",
            style="bold",
        )
    )
    while True:
        try:
            line = check_text(read(), "the line").strip()
        except EOFError:
            console.print()
            console.print(Text("bye", style="dim"))
            return 0
        except KeyboardInterrupt:
            console.print()
            console.print(Text("(Ctrl-D or /exit to quit)", style="dim"))
            continue
        except ValueError as e:  # UnicodeDecodeError included: undecodable input bytes
            if isinstance(e, UnicodeDecodeError):
                e = ValueError("the line is not valid UTF-8 text; type or paste it again")
            _print_error(console, e)
            continue
        if not line:
            continue
        # Whatever goes wrong in one command or turn is reported and the chat goes on:
        # the session keeps its conversation (a failed turn leaves it as before).
        if line.startswith("/"):
            try:
                if not _command(session, console, line):
                    console.print(Text("bye", style="dim"))
                    return 0
            except Exception as e:
                _print_error(console, e)
            continue
        with _interrupt_flag() as flag:
            try:
                _stream_reply(session, console, line, flag)
            except Exception as e:
                _print_error(console, e)


def _print_error(console, e: Exception) -> None:
    """One red line: the message of an expected error (bad input), the type too otherwise."""
    from rich.text import Text

    text = " ".join(str(e).split()) or "(no message)"
    if not isinstance(e, (ValueError, OSError)):
        text = f"{type(e).__name__}: {text}"
    console.print(Text(f"error: {text}", style="red"), soft_wrap=True)


# -- command line --------------------------------------------------------------------------


def _flag_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError: argparse then prints
    `argument --flag: <the message>` and exits 2, instead of a traceback later."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def _setting_type(name: str, kind: type):
    """A flag for one GenerationConfig field, held to the same rules as /set and the API."""

    def parse(text: str):
        value = _parse_number(name, kind, text)
        GenerationConfig(**{name: value})
        return value

    return _flag_type(parse, name)


def _temp_arg(text: str) -> str:
    t_min, t_max = parse_temp(text)
    GenerationConfig(t_min=t_min, t_max=t_max)
    return text


def _positive_int(text: str) -> int:
    value = _parse_number("the value", int, text)
    if value < 1:
        raise ValueError(f"must be an integer >= 1 (got {text!r})")
    return value


def _seed_arg(text: str) -> int:
    seed = parse_seed(text)
    if seed is None:
        raise ValueError(f"seed must be an integer from 0 to {SEED_MAX} (got {text!r})")
    return seed


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model directory, Hugging Face id or LM Studio / packaged model name (default {DEFAULT_MODEL})",
    )
    p.add_argument("--backend", choices=("mlx", "torch"), default="mlx", help="mlx (default) or the torch reference path")
    p.add_argument("--max-new-tokens", type=_setting_type("max_new_tokens", int), default=None, help="tokens per reply (default: chat 1024, or the checkpoint's for small-context models; generate the checkpoint's)")
    p.add_argument("--steps", type=_setting_type("max_denoising_steps", int), default=None, help="denoising steps per canvas (default: the checkpoint's, 48)")
    p.add_argument("--temp", type=_flag_type(_temp_arg, "temp"), default=None, metavar="A-B", help="temperature range t_min-t_max (e.g. 0.4-0.8) or one value")
    p.add_argument("--entropy-bound", type=_setting_type("entropy_bound", float), default=None, help="acceptance entropy bound (default 0.1)")
    p.add_argument("--seed", type=_flag_type(_seed_arg, "seed"), default=None, help="random seed")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-context", type=_flag_type(_positive_int, "max_context"), default=None, help="context limit in tokens (default: the model's, 262,144)")


def add_chat_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common_args(p)
    p.add_argument(
        "--no-history",
        dest="history",
        action="store_false",
        help="send every message as a fresh conversation (for single-turn models such as toy-sudoku)",
    )
    return p


def add_generate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=True, help="apply the chat template (default)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="encode the prompt as is")
    p.add_argument("--verbose", "-v", action="store_true", help="live drafts and a summary on stderr (drafts only on a terminal)")
    return p


def _gen_kwargs(args, default_max_new: Optional[int] = None) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    max_new = args.max_new_tokens if args.max_new_tokens is not None else default_max_new
    if max_new is not None:
        out["max_new_tokens"] = max_new
    if args.steps is not None:
        out["steps"] = args.steps
    if args.temp is not None:
        out["temp"] = args.temp
    if args.entropy_bound is not None:
        out["entropy_bound"] = args.entropy_bound
    return out


def load_for(model_arg: str, backend: str):
    """(model, tokenizer, resolved path) for a --model value and backend."""
    path = resolve_model_path(model_arg, prefer="hf" if backend == "torch" else "mlx")
    if backend == "torch":
        try:
            from .torch_backend import load as torch_load
        except ImportError as e:
            raise ValueError(
                f"--backend torch needs PyTorch and transformers ({e}): pip install torch "
                "transformers, or use --backend mlx"
            ) from None

        model, tokenizer = torch_load(path)
    else:
        from .loader import load

        model, tokenizer = load(path)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return model, tokenizer, path


def _to_generation_overrides(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if k == "temp":
            out["t_min"], out["t_max"] = parse_temp(str(v))
        else:
            out[SETTING_ALIASES.get(k, k)] = v
    return out


CHAT_MAX_NEW_TOKENS = 1024


def _chat_max_new_tokens(path: Path) -> int:
    """Replies of up to 1024 tokens (the release's 256 is a single canvas), unless the
    model's context is small (the toy models): then the checkpoint's own default."""
    from .config import GenerationConfig, ModelArgs, load_config

    context = ModelArgs.from_dict(load_config(path)).max_position_embeddings
    if context >= 16 * CHAT_MAX_NEW_TOKENS:
        return CHAT_MAX_NEW_TOKENS
    return GenerationConfig.from_model_dir(path).max_new_tokens


def main_chat(args) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    with console.status(f"loading {args.model} ({args.backend}) …"):
        model, tokenizer, path = load_for(args.model, args.backend)
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        gen_kwargs=_gen_kwargs(args, default_max_new=_chat_max_new_tokens(path)),
        seed=args.seed,
        max_context=args.max_context,
        model_name=str(args.model if args.model == str(path) else f"{args.model} → {path}"),
        keep_history=args.history,
    )
    return run_repl(session, console)


def _read_stdin() -> str:
    """The prompt from stdin, which must be UTF-8 text."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return check_text(data, "stdin")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"stdin is not UTF-8 text ({e.reason} at byte {e.start}); pass UTF-8 text"
        ) from None


def main_generate(args) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    prompt = check_text(args.prompt, "--prompt") if args.prompt is not None else _read_stdin()
    if args.system:
        check_text(args.system, "--system")
    model, tokenizer, path = load_for(args.model, args.backend)
    overrides = _to_generation_overrides(_gen_kwargs(args))
    gen = GenerationConfig.from_model_dir(getattr(model, "model_path", path), **overrides)
    if args.chat:
        ensure_chat_template(tokenizer, path)
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        msgs.append({"role": "user", "content": prompt})
        ids = encode_text(tokenizer, render(tokenizer, msgs, add_generation_prompt=True))
    else:
        ids = [int(t) for t in tokenizer.encode(prompt)]
    backend = make_backend(model)
    limit = min(args.max_context or backend.max_context, backend.max_context)
    C = backend.canvas_length
    reserve = math.ceil(gen.max_new_tokens / C) * C
    if len(ids) + reserve > limit:
        raise ValueError(
            f"prompt too long: {len(ids)} prompt tokens + up to {reserve} generated exceed "
            f"the {limit}-token context; shorten the prompt or lower --max-new-tokens"
        )

    err = Console(stderr=True, highlight=False)
    show_drafts = args.verbose and sys.stderr.isatty()
    view = CanvasView(tokenizer, gen.max_denoising_steps)
    live = None
    if show_drafts:
        # No stdout redirection: the text goes to stdout, the drafts to the terminal.
        live = Live(console=err, auto_refresh=False, transient=True,
                    redirect_stdout=False, redirect_stderr=False)
        live.start()
    summary = None
    last = 0.0
    try:
        events = backend.stream_generate(tokenizer, ids, None, None, args.seed, overrides)
        for ev in events:
            if isinstance(ev, Draft) and live is not None:
                now = time.perf_counter()
                if now - last > 1 / 20:
                    from rich.console import Group

                    live.update(Group(*view.render(ev)), refresh=True)
                    last = now
            elif isinstance(ev, Commit):
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, Summary):
                summary = ev
    finally:
        if live is not None:
            live.update(Text(""), refresh=True)
            live.stop()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose and summary is not None:
        err.print(Text(summary_line(summary, None, summary.prompt_time), style="dim"), soft_wrap=True)
    return 0

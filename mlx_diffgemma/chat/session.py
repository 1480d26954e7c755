"""A conversation with the model, and no UI: `ChatSession` renders the chat template,
works out which tokens the encoder's KV cache already holds, encodes only the rest,
streams the drafter's events and rolls the cache back at the end of each turn. The REPL
(repl.py), `generate` (commands.py) and the server all run on it. Each backend (MLX, torch)
supplies the cache operations: encode, snapshot and one `rollback`.

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

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..models.config import SEED_MAX, GenerationConfig, check_seed
from .backends import make_backend
from ..generation.loop import (Commit, Summary, check_context, check_mode, context_limit, generation_config,
                      reserved_tokens)
from ..models.tokenizer import (  # noqa: F401  (re-exported: the session's callers use them)
    check_text,
    encode_text,
    ensure_chat_template,
    min_tokens,
    render,
)

# Tokens per encoder call while prefilling: bounds memory, and how long a Ctrl-C waits
# for the stop flag to be checked (about a second for the 26B model on CPU).
PREFILL_CHUNK = 512

_PLACEHOLDER = "MLXDGREPLYPLACEHOLDER"

# -- the prompt and its stable part ----------------------------------------------------


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class PromptSplit:
    ids: List[int]  # the full prompt, generation prompt included, images expanded
    stable: int  # ids[:stable] stay valid once this turn is history
    images: Any = None  # images.ImageInputs of the image blocks, in order
    blocks: List[Tuple[int, int]] = field(default_factory=list)  # [start, end) per image

    @property
    def suffix(self) -> List[int]:
        return self.ids[self.stable :]

    @property
    def keys(self) -> List[int]:
        """The ids as the cache remembers them: each image's tokens replaced by a
        negative number drawn from its pixels, so that a cached image is reused only
        for the same image (its token ids alone are the same for any image)."""
        if not self.blocks:
            return self.ids
        keys = list(self.ids)
        for (s, e), digest in zip(self.blocks, self.images.digests):
            keys[s:e] = [-1 - int(digest[:15], 16)] * (e - s)
        return keys

    def chunks(self, start: int, end: int, size: int) -> Iterator[Tuple[int, int, Any]]:
        """Encoder calls over ids[start:end]: (s, e, the images of ids[s:e] or None), of
        about `size` tokens, never cutting an image (its tokens attend to each other)."""
        s = start
        while s < end:
            e = min(s + size, end)
            for bs, be in self.blocks:
                if bs < e < be:
                    e = bs if bs > s else be
            inside = [k for k, (bs, be) in enumerate(self.blocks) if s <= bs and be <= e]
            yield s, e, self.images.select(inside) if inside else None
            s = e

    def block_start(self, i: int) -> int:
        """`i`, or the start of the image block it falls inside."""
        return next((bs for bs, be in self.blocks if bs < i < be), i)


def split_prompt(tokenizer, messages: Sequence[Dict[str, Any]],
                 tools: Optional[List[Dict[str, Any]]] = None, processor=None,
                 fits: Optional[Callable[[int], None]] = None) -> PromptSplit:
    """The generation prompt of `messages`, and how much of it is conversation-stable:
    the longest prefix that the next turn's rendering (this turn as history) repeats.
    Image content parts (`{"type": "image", "image": ...}`) are expanded by `processor`
    (images.Processor); the stable part holds them. `fits(n)`, when given, is called
    with a lower bound on the prompt's tokens before anything is tokenized (and raises
    when that is already too many: a huge prompt costs no tokenization)."""
    from ..images.processor import render_with_images, split_image_parts

    messages, sources = split_image_parts(messages)
    if sources and processor is None:
        raise ValueError("this conversation holds images but the model takes none")
    if sources:
        messages, full_text = render_with_images(tokenizer, messages, processor.tokens.image,
                                                 len(sources), tools=tools)
    else:
        full_text = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    if fits is not None:
        fits(min_tokens(tokenizer, full_text))
    history = list(messages) + [
        {"role": "assistant", "content": _PLACEHOLDER},
        {"role": "user", "content": "x"},
    ]
    try:
        hist_text = render(tokenizer, history, add_generation_prompt=False, tools=tools)
        cut = hist_text.find(_PLACEHOLDER)
    except Exception:  # a template that rejects the probe: no reuse of the model turn
        hist_text, cut = "", -1
    if cut < 0:
        hist_text = render(tokenizer, messages, add_generation_prompt=False, tools=tools)
        cut = len(hist_text)
    stable_text = full_text[: _common_prefix_len(full_text, hist_text[:cut])]
    ids = encode_text(tokenizer, full_text)
    stable = _common_prefix_len(ids, encode_text(tokenizer, stable_text))
    if not sources:
        return PromptSplit(ids, stable)
    prompt = processor(ids, sources)
    # Each placeholder before the boundary became its image's soft tokens plus two.
    placeholders = [i for i, t in enumerate(ids) if t == processor.tokens.image_id]
    stable += sum(n + 1 for i, n in zip(placeholders, prompt.images.num_soft_tokens) if i < stable)
    return PromptSplit(prompt.ids, stable, prompt.images, prompt.blocks)


# -- the session -----------------------------------------------------------------------


def _printable(message: Dict[str, Any]) -> Dict[str, Any]:
    """A message for the transcript: an image part keeps its name, not its pixels."""
    if not isinstance(message.get("content"), list):
        return message
    parts = [{"type": "image", "image": p.get("name")} if p.get("type") == "image" else p
             for p in message["content"]]
    return dict(message, content=parts)


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
class CacheState:
    """What a session's encoder cache holds: the cache, the exact tokens in it (a stable
    prefix of some rendered conversation) and the snapshot of a stable boundary, if one
    was kept. The server's prompt cache keeps several and swaps them in and out."""

    cache: Any
    ids: List[int]  # PromptSplit.keys: image tokens stand for their image
    snap: Optional[Tuple[int, Any]] = None


@dataclass
class TurnStats:
    reused: int
    encoded: int
    suffix: int
    prefill_time: float
    prompt_time: float  # prefill + the drafter's encode of the suffix
    tokens: int = 0  # the reply's tokens, pads left out (as tokens_per_forward counts)
    pad_tokens: int = 0
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


def parse_number(key: str, kind: type, value) -> Any:
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
        mode: str = "reference",
        backend=None,
    ):
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer: the model directory has none")
        self.model = model
        self.tokenizer = tokenizer
        # `backend`: another way to generate with this model (speculative.SpeculativeBackend).
        self.backend = backend if backend is not None else make_backend(model)
        self.model_path = getattr(model, "model_path", None)
        self.model_name = model_name or str(self.model_path)
        self.template_source = ensure_chat_template(tokenizer, self.model_path)
        self.system = check_text(system, "the system prompt") if system else None
        self.noise = noise
        # False: every message is sent as a fresh conversation (single-turn models such as
        # toy-sudoku); the transcript still keeps every turn.
        self.keep_history = keep_history
        # context_note: why the context is less than `max_context` asked for (or None)
        self.max_context, self.context_note = context_limit(max_context, self.backend.max_context)
        self.seed = check_seed(seed)
        self.mode = self._check_mode(mode)
        self.gen_kwargs: Dict[str, Any] = {}
        self.update_settings(**(gen_kwargs or {}))
        self.messages: List[Dict[str, str]] = []
        self.turns: List[TurnStats] = []
        self.interrupted = 0
        self.resets = 0
        self._processor = None
        self._reset_cache()

    # -- settings -------------------------------------------------------------------

    @property
    def gen(self) -> GenerationConfig:
        return generation_config(self.model, **self.gen_kwargs)

    def _check_mode(self, mode: str) -> str:
        if check_mode(mode) == "fast" and self.backend.name != "mlx":
            raise ValueError("fast mode runs on the MLX backend only")
        return mode

    def update_settings(self, **kwargs) -> None:
        """Validates and applies generation overrides (GenerationConfig names, plus
        `temp` as "a-b" and `seed`)."""
        new = dict(self.gen_kwargs)
        seed, mode = self.seed, self.mode
        for key, value in kwargs.items():
            if value is None:
                continue
            if key == "mode":
                mode = self._check_mode(str(value).strip().lower())
            elif key == "temp":
                new["t_min"], new["t_max"] = parse_temp(str(value))
            elif key == "seed":
                seed = parse_seed(value)
            elif key in ("eos", "eos_token_id"):
                new["eos_token_id"] = _parse_eos(value)
            elif key in SETTING_ALIASES:
                name = SETTING_ALIASES[key]
                new[name] = parse_number(key, type(getattr(GenerationConfig(), name)), value)
            else:
                known = ", ".join(sorted(set(SETTING_ALIASES) | {"temp", "seed", "eos", "mode"}))
                raise ValueError(f"unknown setting {key!r}; known: {known}")
        gen = generation_config(self.model, **new)  # ValueError when invalid
        if self._reserve(gen) >= self.max_context:
            raise ValueError(
                f"max_new_tokens={gen.max_new_tokens} reserves {self._reserve(gen)} tokens, "
                f"the whole {self.max_context}-token context; lower it"
            )
        self.gen_kwargs, self.seed, self.mode = new, seed, mode

    def denoising_steps(self, gen_kwargs: Optional[Dict[str, Any]] = None) -> int:
        """The most denoising steps a canvas of a turn takes (what a Draft's `step` counts
        down from): a speculative backend's draft steps, else max_denoising_steps with
        `gen_kwargs`' overrides."""
        steps = getattr(self.backend, "draft_steps", None)
        if steps is not None:
            return int(steps)
        return generation_config(self.model, **dict(self.gen_kwargs, **(gen_kwargs or {}))).max_denoising_steps

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
            "mode": self.mode,
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

    def swap_state(self, state: Optional[CacheState]) -> CacheState:
        """Installs `state` (None: a new, empty cache) and returns the one it replaces."""
        old = CacheState(self.cache, self.cached_ids, self._snap)
        if state is None:
            self._reset_cache()
        else:
            self.cache, self.cached_ids, self._snap = state.cache, list(state.ids), state.snap
        return old

    def fork_state(self, state: CacheState) -> CacheState:
        """A copy of `state` that can be cut and extended without touching it."""
        return CacheState(self.backend.fork(state.cache), list(state.ids), state.snap)

    def set_system(self, text: Optional[str]) -> None:
        # The conversation now renders differently from its start: the next turn cuts the
        # cache back to the common prefix (<bos><|turn>) or clears it (and says so).
        self.system = check_text(text, "the system prompt") if text else None

    @property
    def cached_tokens(self) -> int:
        return len(self.cached_ids)

    # -- images ------------------------------------------------------------------------

    @property
    def processor(self):
        """The model's images.Processor (built on first use); ImageError naming the fix
        when the model takes no images."""
        if self._processor is None:
            from ..images.processor import processor_for

            self._processor = processor_for(self.model, self.tokenizer)
        return self._processor

    def load_images(self, sources: Sequence[Any]) -> List[Any]:
        """Each image loaded and preprocessed now (a bad one is refused here, for what is
        wrong with it, before any turn): one images.ImageInputs per source, to pass to
        `send`."""
        from ..images.processor import ImageInputs, load_image

        loaded = [s if isinstance(s, ImageInputs) else load_image(s) for s in sources]
        return [self.processor.images([s]) for s in loaded]

    @staticmethod
    def user_message(text: str, images: Sequence[Any] = (), names: Sequence[str] = ()) -> Dict[str, Any]:
        """A user message; with images, content parts: the images, then the text."""
        from ..images.processor import user_message

        return user_message(text, images, names)

    def conversation(self, user_text: Optional[str] = None, images: Sequence[Any] = (),
                     names: Sequence[str] = ()) -> List[Dict[str, Any]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        if self.keep_history:
            msgs += self.messages
        if user_text is not None:
            msgs.append(self.user_message(user_text, images, names))
        return msgs

    def _reserve(self, gen: GenerationConfig) -> int:
        return reserved_tokens(gen, self.backend.canvas_length)

    def check_context(self, n_prompt: int, gen: Optional[GenerationConfig] = None,
                      fix: str = "/reset the conversation, shorten the message or lower "
                                 "max_new_tokens", at_least: bool = False) -> None:
        """Refuses a prompt of `n_prompt` tokens (`at_least`: a lower bound, counted
        before tokenizing) whose reply could outrun the context."""
        check_context(n_prompt, gen or self.gen, self.backend.canvas_length, self.max_context, fix,
                      at_least=at_least)

    def _rollback(self, length: int) -> bool:
        """Brings the cache back to its first `length` tokens (the backend trims or
        restores the snapshot taken there); False when it cannot."""
        cache = self.backend.rollback(self.cache, length, self._snap)
        if cache is None:
            return False
        self.cache = cache
        self.cached_ids = self.cached_ids[:length]
        return True

    def _clear_cache(self, note: Optional[str]) -> Optional[str]:
        self._reset_cache()
        self.resets += 1
        return note

    def _cut_to(self, split: "PromptSplit") -> Tuple[int, int, Optional[str]]:
        """What the cache holds must be a prefix of the new render, else it is cut back to
        the common prefix (after an interrupted turn it still holds the dropped message),
        or cleared when it cannot be cut. Returns (tokens kept, tokens cut, note)."""
        keep = split.block_start(_common_prefix_len(self.cached_ids, split.keys[: split.stable]))
        held = len(self.cached_ids)
        if keep == held:
            return keep, 0, None
        if keep > 0 and self._rollback(keep):
            return keep, held - keep, None
        # Without history every message starts a new conversation: a cleared cache is
        # what it expects, not news.
        note = (f"the cache no longer matches the conversation and cannot be cut back: cleared, "
                f"re-encoding all {split.stable} tokens") if self.keep_history else None
        return 0, 0, self._clear_cache(note)

    def _prefill(self, split: "PromptSplit", keep: int, should_stop) -> bool:
        """Encodes the new stable tokens in chunks (bounded memory; an image and its
        pixels go whole into one), stoppable between chunks; what was encoded before a
        stop stays (it is a prefix). False when stopped."""
        keys = split.keys
        try:
            for s, e, images in split.chunks(keep, split.stable, PREFILL_CHUNK):
                if should_stop():
                    return False
                # (text-only chunks call encode as it always was called)
                self.backend.encode(self.cache, split.ids[s:e], **({"images": images} if images else {}))
                self.cached_ids = keys[:e]
        except BaseException:
            self._clear_cache("")  # an encoder call broke off midway: the cache is unknown
            raise
        return True

    def send(self, user_text: str, should_stop: Callable[[], bool] = lambda: False,
             images: Sequence[Any] = (), names: Sequence[str] = ()) -> Iterator[Any]:
        """One turn. Yields Prefill, then Draft/Commit/Summary, or ends with Interrupted.
        `images` (sources, or `load_images`' results) go with this message, before its
        text; `names` label them in the transcript. They stay in the conversation: later
        turns reuse their encoded tokens from the cache."""
        from ..images.processor import describe

        names = list(names) or [describe(im) for im in images]
        images = self.load_images(images) if images else []
        message = self.user_message(check_text(user_text, "the message"), images, names)
        msgs = self.conversation() + [message]
        split = split_prompt(self.tokenizer, msgs, processor=self._processor,
                             fits=lambda n: self.check_context(n, at_least=True))
        seed = None if self.seed is None else (self.seed + len(self.turns)) % (SEED_MAX + 1)

        def finish(summary: Summary, stats: TurnStats) -> None:
            self._finish_turn(message, summary, stats)

        yield from self._turn(split, should_stop, self.gen_kwargs, seed, self.noise, finish, self.mode)

    def complete(self, split: "PromptSplit", should_stop: Callable[[], bool] = lambda: False,
                 *, gen_kwargs: Optional[Dict[str, Any]] = None, seed: Optional[int] = None,
                 noise=None, mode: Optional[str] = None) -> Iterator[Any]:
        """One turn of a conversation the caller keeps (the server renders each request's
        messages itself): the same cut, prefill, generation and rollback as `send`, on
        `split` (a `split_prompt`, or a raw prompt whose ids are all stable), with this
        request's generation overrides; the session's own conversation is left as is."""
        kw = dict(self.gen_kwargs, **(gen_kwargs or {}))
        mode = self.mode if mode is None else self._check_mode(mode)
        yield from self._turn(split, should_stop, kw, check_seed(seed), noise, None, mode)

    def _turn(self, split: "PromptSplit", should_stop, gen_kwargs: Dict[str, Any],
              seed: Optional[int], noise, on_finish, mode: str = "reference") -> Iterator[Any]:
        gen = generation_config(self.model, **gen_kwargs)
        self.check_context(len(split.ids), gen)

        keep, rolled_back, note = self._cut_to(split)
        tic = time.perf_counter()
        if not self._prefill(split, keep, should_stop):
            self.interrupted += 1
            yield Interrupted(0)
            return
        prefill_time = time.perf_counter() - tic
        self.cached_ids = split.keys[: split.stable]

        # Make sure the end of the turn can come back to the stable boundary.
        C = self.backend.canvas_length
        turn_tokens = len(split.suffix) + (math.ceil(gen.max_new_tokens / C) - 1) * C
        if self.backend.needs_snapshot(turn_tokens):
            self._snap = (split.stable, self.backend.snapshot(self.cache))
        encoded = split.stable - keep
        yield Prefill(keep, encoded, len(split.suffix), prefill_time, note, rolled_back)
        stats = TurnStats(keep, encoded, len(split.suffix), prefill_time, prefill_time, note=note)
        run_kwargs = gen_kwargs if mode == "reference" else dict(gen_kwargs, mode=mode)
        events = self.backend.stream_generate(
            self.tokenizer, split.suffix, self.cache, noise, seed, run_kwargs)
        yield from self._generate(events, split, stats, should_stop, on_finish)

    def _generate(self, events, split: "PromptSplit", stats: "TurnStats", should_stop, on_finish):
        """Runs the drafter's `events`; whatever happens, the cache goes back to the
        stable boundary."""
        canvases, finished = 0, False
        try:
            for ev in events:
                if isinstance(ev, Summary):
                    if on_finish is not None:
                        on_finish(ev, stats)
                    finished = True
                    yield ev
                    break
                canvases += isinstance(ev, Commit)
                yield ev
                if should_stop():
                    break
        finally:
            events.close()
            if self._rollback(split.stable):
                if not self.backend.keeps_snapshots:
                    self._snap = None
            else:
                stats.note = self._clear_cache(
                    "the cache could not be rolled back and was cleared: the next turn "
                    "re-encodes the conversation")
        if not finished:
            self.interrupted += 1
            yield Interrupted(canvases)

    def _finish_turn(self, message: Dict[str, Any], summary: Summary, stats: "TurnStats") -> None:
        """The reply joins the conversation and its numbers the turn's stats."""
        self.messages += [message, {"role": "assistant", "content": summary.text}]
        stats.prompt_time += summary.prompt_time
        stats.tokens, stats.pad_tokens = summary.valid_tokens, summary.pad_tokens
        stats.canvases = summary.canvases
        stats.steps_per_canvas = list(summary.steps_per_canvas)
        stats.tokens_per_forward = summary.tokens_per_forward
        stats.generation_time = summary.generation_time
        stats.generation_tps = summary.generation_tps
        stats.peak_memory_gb = summary.peak_memory_gb
        stats.finish_reason = summary.finish_reason
        self.turns.append(stats)

    # -- reporting -----------------------------------------------------------------------

    def transcript(self) -> Dict[str, Any]:
        """What the user saw: every exchange, also without history (`history` false: each
        message was sent alone), and each turn's numbers."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return {
            "model": self.model_name,
            "backend": self.backend.name,
            "settings": self.settings(),
            "system": self.system,
            "history": self.keep_history,
            "messages": [_printable(m) for m in system + self.messages],
            "turns": [asdict(t) for t in self.turns],
        }

    def save(self, path) -> Path:
        path = Path(path).expanduser()
        path.write_text(json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n")
        return path

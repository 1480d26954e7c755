"""A conversation with the model, and no UI: `ChatSession` renders the chat template
(prompt.py), cuts its encoder cache back to what the new render shares and encodes
only the rest (turn_cache.py), streams the drafter's events and rolls the cache back at
the end of each turn. The REPL (repl.py), `generate` (commands.py) and the server all
run on it, with `Settings` resolved where they take a request; each backend (MLX,
torch, speculative) supplies the cache operations.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..generation.events import Commit, Summary
from ..generation.settings import SEED_MAX, Settings, context_limit, defaults, parse_set, resolve
from ..images.load import describe, load_image
from ..images.processor import ImageInputs, processor_for, user_message
from ..models.tokenizer import check_text, ensure_chat_template
from .backends import make_backend
from .prompt import PromptSplit, split_prompt
from .turn_cache import CacheState, TurnCache

# -- the session -----------------------------------------------------------------------


def split_template(template: str) -> Tuple[str, str]:
    """(text before, text after) the one `{{}}` of an infill template."""
    n = template.count("{{}}")
    if n != 1:
        raise ValueError(f"an infill template needs exactly one {{{{}}}} where the middle goes (found {n})")
    head, tail = template.split("{{}}")
    return head, tail


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


class ChatSession:
    """A conversation with one model and its encoder cache; no UI.

    `send(text)` yields a `Prefill`, then the drafter's `Draft`/`Commit` events and its
    `Summary` (the reply joins the conversation), or ends with `Interrupted` when
    `should_stop()` turns true (checked between prefill chunks and denoising steps): the
    user message and the partial reply are dropped; the cache keeps only a prefix of the
    rendered conversation, which the next turn cuts back to what it shares.

    `settings` (default: the model's) with `changes` (`resolve`'s names) are checked
    against this backend and context; `update_settings` takes `/set`'s dialect.
    """

    def __init__(self, model, tokenizer, *, system: Optional[str] = None, settings: Optional[Settings] = None,
                 noise=None, max_context: Optional[int] = None, model_name: Optional[str] = None,
                 keep_history: bool = True, backend=None, **changes):
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer: the model directory has none")
        self.model = model
        self.tokenizer = tokenizer
        # `backend`: another way to generate with this model (backends.SpeculativeBackend).
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
        self.settings = self.resolve(settings or defaults(model), **changes)
        self.messages: List[Dict[str, Any]] = []
        self.turns: List[TurnStats] = []
        self.interrupted = 0
        self._processor = None
        self.kv = TurnCache(self.backend, lambda: self.settings.gen.max_new_tokens)

    # -- settings -------------------------------------------------------------------

    def resolve(self, base: Settings, **changes) -> Settings:
        """`base` with `changes`, checked for this backend and context."""
        return resolve(base, backend=self.backend.name, context=(self.backend.canvas_length, self.max_context),
                       **changes)

    def update_settings(self, **pairs) -> None:
        """Applies `/set key=value` pairs (settings.parse_set), all or none."""
        self.settings = self.resolve(self.settings, **parse_set(pairs))

    def check_context(self, n_prompt: int, settings: Optional[Settings] = None,
                      fix: str = "/reset the conversation, shorten the message or lower max_new_tokens",
                      at_least: bool = False) -> None:
        """Refuses a prompt of `n_prompt` tokens (`at_least`: a lower bound, counted
        before tokenizing) whose reply could outrun the context."""
        (settings or self.settings).check_context(n_prompt, self.backend.canvas_length, self.max_context, fix,
                                                  at_least=at_least)

    # -- the conversation and its cache ------------------------------------------------

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def cache(self):
        return self.kv.cache

    @property
    def cached_ids(self) -> List[int]:
        return self.kv.ids

    @property
    def cached_tokens(self) -> int:
        return len(self.kv.ids)

    @property
    def resets(self) -> int:
        return self.kv.resets

    def reset(self) -> None:
        """Forgets the conversation (the system prompt stays) and empties the cache."""
        self.messages = []
        self.kv.reset()

    def swap_state(self, state: Optional[CacheState]) -> CacheState:
        """Installs `state` (None: a new, empty cache) and returns the one it replaces."""
        return self.kv.swap(state)

    def fork_state(self, state: CacheState) -> CacheState:
        """A copy of `state` that can be cut and extended without touching it."""
        return self.kv.fork(state)

    def set_system(self, text: Optional[str]) -> None:
        # The conversation now renders differently from its start: the next turn cuts the
        # cache back to the common prefix (<bos><|turn>) or clears it (and says so).
        self.system = check_text(text, "the system prompt") if text else None

    @property
    def processor(self):
        """The model's images.Processor (built on first use); ImageError naming the fix
        when the model takes no images."""
        if self._processor is None:
            self._processor = processor_for(self.model, self.tokenizer)
        return self._processor

    def load_images(self, sources: Sequence[Any]) -> List[Any]:
        """Each image loaded and preprocessed now (a bad one is refused here, for what is
        wrong with it, before any turn): one images.ImageInputs per source, to pass to
        `send`."""
        loaded = [s if isinstance(s, ImageInputs) else load_image(s) for s in sources]
        return [self.processor.images([s]) for s in loaded]

    def conversation(self, user_text: Optional[str] = None, images: Sequence[Any] = (),
                     names: Sequence[str] = ()) -> List[Dict[str, Any]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        if self.keep_history:
            msgs += self.messages
        if user_text is not None:
            msgs.append(user_message(user_text, images, names))
        return msgs

    # -- turns ----------------------------------------------------------------------------

    def send(self, user_text: str, should_stop: Callable[[], bool] = lambda: False,
             images: Sequence[Any] = (), names: Sequence[str] = (),
             template: Optional[str] = None) -> Iterator[Any]:
        """One turn. Yields Prefill, then Draft/Commit/Summary, or ends with Interrupted.
        `images` (sources, or `load_images`' results) go with this message, before its
        text; `names` label them in the transcript. They stay in the conversation: later
        turns reuse their encoded tokens from the cache. `template` (text with one `{{}}`):
        the reply is that text with the model's middle in place of `{{}}`
        (generation/infilling.py); the Commit and the conversation hold the whole filled text."""
        if template is not None:
            yield from self._send_template(user_text, template, should_stop)
            return
        names = list(names) or [describe(im) for im in images]
        images = self.load_images(images) if images else []
        message = user_message(check_text(user_text, "the message"), images, names)
        split = self._split(message)

        def finish(summary: Summary, stats: TurnStats) -> None:
            self._finish_turn(message, summary, stats)

        yield from self._turn(split, should_stop, self._turn_settings(), self.noise, finish)

    def _send_template(self, user_text: str, template: str, should_stop) -> Iterator[Any]:
        head, tail = split_template(template)
        message = user_message(check_text(user_text, "the message"), [], [])
        split = self._split(message)

        def finish(summary: Summary, stats: TurnStats) -> None:
            self._finish_turn(message, replace(summary, text=head + summary.text + tail), stats)

        infill = {"suffix": tail, "reply_prefix": head}
        for ev in self._turn(split, should_stop, self._turn_settings(), self.noise, finish, infill):
            yield replace(ev, text=head + ev.text + tail) if isinstance(ev, Commit) else ev

    def _split(self, message: Dict[str, Any]) -> PromptSplit:
        """The conversation with `message` added, split at its stable boundary and checked
        against the context."""
        split = split_prompt(self.tokenizer, self.conversation() + [message], processor=self._processor,
                             fits=lambda n: self.check_context(n, at_least=True))
        self.check_context(len(split.ids))
        return split

    def _turn_settings(self) -> Settings:
        """The session's settings, its seed moved on by the turns so far (each reply draws
        anew, and a conversation replays)."""
        seed = self.settings.seed
        return replace(self.settings, seed=None if seed is None else (seed + len(self.turns)) % (SEED_MAX + 1))

    def complete(self, split: PromptSplit, should_stop: Callable[[], bool] = lambda: False,
                 settings: Optional[Settings] = None, noise=None,
                 infill: Optional[Dict[str, Any]] = None) -> Iterator[Any]:
        """One turn of a conversation the caller keeps (the server renders each request's
        messages itself and has checked their context): the same cut, prefill, generation
        and rollback as `send`, on `split` (a `split_prompt`, or a raw prompt whose ids are
        all stable), with this request's `settings`; the session's conversation is left
        as is. `infill`: the turn writes the middle before a suffix instead (the backend's
        `stream_infill` arguments: `suffix`, `lengths`, `truncate_suffix`, ...)."""
        yield from self._turn(split, should_stop, settings or self.settings, noise, None, infill)

    def _turn(self, split: PromptSplit, should_stop, settings: Settings, noise, on_finish,
              infill: Optional[Dict[str, Any]] = None) -> Iterator[Any]:
        keep, rolled_back, note = self.kv.cut_to(split, self.keep_history)
        tic = time.perf_counter()
        if not self.kv.prefill(split, keep, should_stop):
            self.interrupted += 1
            yield Interrupted(0)
            return
        prefill_time = time.perf_counter() - tic
        self.kv.hold_boundary(split, settings.gen.max_new_tokens)
        encoded = split.stable - keep
        yield Prefill(keep, encoded, len(split.suffix), prefill_time, note, rolled_back)
        stats = TurnStats(keep, encoded, len(split.suffix), prefill_time, prefill_time, note=note)
        if infill is None:
            events = self.backend.stream_generate(self.tokenizer, split.suffix, self.kv.cache, settings, noise)
        else:
            infill = dict(infill)
            events = self.backend.stream_infill(self.tokenizer, split.suffix, infill.pop("suffix"), self.kv.cache,
                                                settings, noise, **infill)
        yield from self._generate(events, split, stats, should_stop, on_finish)

    def _generate(self, events, split: PromptSplit, stats: "TurnStats", should_stop, on_finish):
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
            stats.note = self.kv.end_turn(split) or stats.note
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
            "settings": self.settings.describe(),
            "system": self.system,
            "history": self.keep_history,
            "messages": [_printable(m) for m in system + self.messages],
            "turns": [asdict(t) for t in self.turns],
        }

    def save(self, path) -> Path:
        path = Path(path).expanduser()
        path.write_text(json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n")
        return path

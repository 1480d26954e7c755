"""The drafter: block-diffusion generation, as the reference `generate()` does it.

Outer loop, one canvas at a time: encode what the cache does not hold yet, start a
canvas of uniform random tokens, then denoise it for up to N steps (decoder forward
with self-conditioning from the previous step, linear temperature schedule,
categorical sample, entropy-bound acceptance, renoising, stable-and-confident stop),
commit its argmax, pad after the first EOS and stop there.

The loop (`draft`) imports no array framework: it drives a *denoiser* object that owns
the network, the cache and the per-step array work. `denoiser.MLXDenoiser` is ours; the
torch reference path (`torch_backend`) supplies its own, so both products share one
loop, one context check, one event stream and one set of statistics (`stream`, `collect`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator, List, Optional, Protocol, Sequence, Tuple

from ..models.config import GenerationConfig
from .events import Commit, Draft, Event, Summary
from .fixed import Fixed, check_fixed
from .prompt import prompt_ids
from .settings import check_reserve, reserved_tokens


class Denoiser(Protocol):
    """What `draft` needs from a backend. Arrays stay the backend's own; `to_list`
    brings one canvas row to the host."""

    gen: GenerationConfig
    canvas_length: int
    vocab_size: int
    max_context: int  # the model's context, in tokens
    cached_tokens: int  # tokens its cache holds now

    def encode(self, token_ids: Sequence[int]) -> None: ...

    def start_canvas(self, canvas_index: int, fixed=None) -> Any:
        """A fresh canvas; `fixed` (a fixed.CanvasFixed) places and holds its tokens."""

    def step(self, canvas: Any, canvas_index: int, step: int) -> tuple:
        """-> (next_canvas, argmax_canvas, accepted_mask, stop: bool)"""

    def to_list(self, row: Any) -> list: ...

    def peak_memory_gb(self) -> float: ...


class Drafting:
    """One sequence's block diffusion as a resumable state machine: the loop of `draft`
    with the denoiser's forward left to the caller, so that a scheduler can run several
    sequences' steps together (generation/batch.py). The driver asks, in turn:

    - `pending_encode()`: ids to encode first (the prompt, then each committed canvas
      before the next one starts); `encode()` runs them through the denoiser;
    - `needs_start`: a canvas to start (`start()` draws it: `canvas`);
    - otherwise it runs one denoising step of `canvas` at (`canvas_index`, `step`) and
      hands its result to `stepped`, which returns the step's events (a Draft, and at the
      canvas's end its Commit, and at the run's end the Summary; then `done`).
    """

    def __init__(self, denoiser: Denoiser, prompt_ids: Sequence[int], gen: GenerationConfig,
                 decode_text=None, fixed: Optional[Fixed] = None):
        self.denoiser, self.gen, self.decode_text = denoiser, gen, decode_text
        self.fixed = fixed  # positions held at given tokens (fixed.py), checked
        self._mask: Optional[List[bool]] = None  # the current canvas's fixed positions
        self.prompt_ids = prompt_ids
        self.canvases = math.ceil(gen.max_new_tokens / denoiser.canvas_length)
        self.done = False
        self.canvas: Any = None  # the canvas being denoised; None before its start
        self.canvas_index = 0
        self.step = gen.max_denoising_steps  # the reference's counter, N..1
        self.generated: List[int] = []
        self.steps_per_canvas: List[int] = []
        self.text = ""
        self._steps = 0  # steps of the current canvas
        self._pending: Optional[Sequence[int]] = prompt_ids if len(prompt_ids) else None
        self._prompt_done = self._pending is None
        self.prompt_time = 0.0
        self._tic = time.perf_counter()

    def pending_encode(self) -> Optional[Sequence[int]]:
        return self._pending

    def encode(self) -> None:
        """Encodes the pending ids (the prompt's encode is timed as `prompt_time`)."""
        ids, self._pending = self._pending, None
        tic = time.perf_counter()
        self.denoiser.encode(ids)
        if not self._prompt_done:
            self._prompt_done = True
            self.prompt_time = time.perf_counter() - tic
            self._tic = time.perf_counter()

    @property
    def needs_start(self) -> bool:
        return not self.done and self._pending is None and self.canvas is None

    def start(self) -> List[Event]:
        """Starts the next canvas (`canvas`). A canvas whose every position is fixed is
        committed as it is, with no step: its events are returned and `canvas` stays None."""
        self.step = self.gen.max_denoising_steps
        self._steps = 0
        C = self.denoiser.canvas_length
        cf = self.fixed.canvas(self.canvas_index) if self.fixed is not None else None
        if cf is None:
            self._mask = None
            self.canvas = self.denoiser.start_canvas(self.canvas_index)
            return []
        if cf.all_fixed(C):
            return self._commit([int(t) for t in cf.tokens])
        self._mask = cf.mask(C).tolist()
        self.canvas = self.denoiser.start_canvas(self.canvas_index, cf)
        return []

    def stepped(self, canvas: Any, argmax: Any, accepted: Any, stop: bool) -> List[Event]:
        """The events of the step just run on `canvas` (its next canvas, argmax, accepted
        mask and stop flag); moves to the next step, canvas or the end."""
        denoiser = self.denoiser
        self._steps += 1
        events: List[Event] = [Draft(self.canvas_index, self.step, denoiser.to_list(argmax),
                                     [bool(a) for a in denoiser.to_list(accepted)], fixed=self._mask)]
        if not stop and self.step > 1:
            self.canvas, self.step = canvas, self.step - 1
            return events
        events.extend(self._commit(denoiser.to_list(argmax)))
        return events

    def _commit(self, argmax: List[int]) -> List[Event]:
        gen = self.gen
        committed, finished = pad_after_eos(argmax, gen.eos_token_id, gen.pad_token_id)
        self.steps_per_canvas.append(self._steps)
        kept = _strip_eos_padding(committed, finished, gen.pad_token_id)
        # The last canvas may run past max_new_tokens: the reply stops there, as the
        # server's does (the canvas itself, and so every token before the cut, is the
        # reference's; an EOS past the cut ends nothing: the reply ends by length).
        room = gen.max_new_tokens - len(self.generated)
        if len(kept) > room:
            kept, finished = kept[:room], False
        self.generated.extend(kept)
        new_text = ""
        if self.decode_text is not None:
            full = self.decode_text(_text_tokens(self.generated, gen.eos_token_id))
            new_text, self.text = full[len(self.text):], full
        events: List[Event] = [Commit(self.canvas_index, kept, new_text, self._steps, finished)]
        self.canvas = None
        self.canvas_index += 1
        if finished or self.canvas_index >= self.canvases:
            events.append(self._summary("eos" if finished else "length"))
            self.done = True
        else:
            # The committed canvas joins the context, as the reference encodes it.
            self._pending = committed
        return events

    def _summary(self, finish: str) -> Summary:
        gen_time = time.perf_counter() - self._tic
        # As the reference counts it: non-pad generated tokens over decoder forwards.
        valid = sum(1 for t in self.generated if t != self.gen.pad_token_id)
        n_prompt, prompt_time = len(self.prompt_ids), self.prompt_time
        return Summary(
            tokens=self.generated,
            text=self.text,
            prompt_tokens=n_prompt,
            canvases=len(self.steps_per_canvas),
            steps_per_canvas=self.steps_per_canvas,
            tokens_per_forward=valid / max(sum(self.steps_per_canvas), 1),
            prompt_time=prompt_time,
            prompt_tps=n_prompt / prompt_time if prompt_time > 0 else 0.0,
            generation_time=gen_time,
            generation_tps=valid / gen_time if gen_time > 0 else 0.0,
            peak_memory_gb=self.denoiser.peak_memory_gb(),
            finish_reason=finish,
            valid_tokens=valid,
        )


def draft(
    denoiser: Denoiser,
    prompt_ids: Sequence[int],
    gen: GenerationConfig,
    decode_text=None,
    fixed: Optional[Fixed] = None,
) -> Iterator[Event]:
    """Runs block diffusion for one sequence; yields Draft, Commit and a final Summary.
    `fixed`: positions held at given tokens (fixed.py); a canvas whose every position is
    fixed is committed as it is, without a step."""
    run = Drafting(denoiser, prompt_ids, gen, decode_text, fixed)
    while not run.done:
        if run.pending_encode() is not None:
            run.encode()
        elif run.needs_start:
            yield from run.start()
        else:
            yield from run.stepped(*denoiser.step(run.canvas, run.canvas_index, run.step))


def _strip_eos_padding(tokens: List[int], finished: bool, pad: int) -> List[int]:
    """Drops the pad tokens the EOS rule wrote after the first EOS (and only those)."""
    if not finished:
        return tokens
    end = len(tokens)
    while end > 0 and tokens[end - 1] == pad:
        end -= 1
    # The EOS itself is never pad, so this stops at it at the latest.
    return tokens[:end]


def text_decoder(tokenizer):
    """Ids -> reply text, or None without a tokenizer. Special tokens (`<pad>`, `<eos>`,
    the turn markers: whatever the tokenizer marks special) are left out of the text;
    the ids keep them."""
    if tokenizer is None:
        return None

    def decode(ids: List[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return decode


def _text_tokens(tokens: List[int], eos: Optional[Sequence[int]]) -> List[int]:
    if eos and tokens and tokens[-1] in set(eos):
        return tokens[:-1]
    return tokens


def pad_after_eos(
    tokens: Sequence[int], eos_token_ids: Optional[Sequence[int]], pad_token_id: int
) -> Tuple[list, bool]:
    """Committed canvas -> (tokens with everything after the first EOS set to pad, whether
    an EOS was found). Runs on the host: the canvas is committed once per canvas."""
    tokens = list(tokens)
    if not eos_token_ids:
        return tokens, False
    eos = set(int(e) for e in eos_token_ids)
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1] + [pad_token_id] * (len(tokens) - i - 1), True
    return tokens, False


# -- shared by every backend's stream_generate / generate ---------------------------------


def stream(denoiser: Denoiser, tokenizer, prompt, fixed=None) -> Iterator[Event]:
    """The body of every backend's `stream_generate`: the prompt's ids, the context
    check, then block diffusion on `denoiser` (`fixed`: {position: token_id}, fixed.py)."""
    gen = denoiser.gen
    checked = check_fixed(fixed, canvas_length=denoiser.canvas_length, max_new_tokens=gen.max_new_tokens,
                          vocab_size=denoiser.vocab_size, eos_token_id=gen.eos_token_id,
                          pad_token_id=gen.pad_token_id)
    ids = prompt_ids(tokenizer, prompt)
    reserve = reserved_tokens(gen, denoiser.canvas_length)
    check_reserve(denoiser.cached_tokens + len(ids), reserve, denoiser.max_context)
    yield from draft(denoiser, ids, gen, text_decoder(tokenizer), fixed=checked)


def run_to_summary(events: Iterator[Event], on_commit: Optional[Callable] = None) -> Summary:
    """Drains an event stream; returns its Summary (calling `on_commit` per Commit)."""
    summary = None
    for event in events:
        if on_commit is not None and isinstance(event, Commit):
            on_commit(event)
        if isinstance(event, Summary):
            summary = event
    return summary


def collect(events: Iterator[Event], verbose: bool = False) -> str:
    """The body of every backend's `generate`: the text of an event stream (printed as
    it commits, with a summary line, when `verbose`)."""
    show = (lambda e: print(e.text, end="", flush=True)) if verbose else None
    summary = run_to_summary(events, show)
    if verbose:
        print()
        print(
            f"{summary.canvases} canvases, {summary.tokens_per_forward:.2f} tokens/forward, "
            f"{summary.generation_tps:.1f} tok/s, peak {summary.peak_memory_gb:.2f} GB"
        )
    return summary.text

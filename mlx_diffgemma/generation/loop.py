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
    C = denoiser.canvas_length
    tic = time.perf_counter()
    if len(prompt_ids):
        denoiser.encode(prompt_ids)
    prompt_time = time.perf_counter() - tic

    tic = time.perf_counter()
    generated: List[int] = []
    steps_per_canvas: List[int] = []
    text = ""
    finish = "length"
    previous: Optional[List[int]] = None
    for canvas_index in range(math.ceil(gen.max_new_tokens / C)):
        if previous is not None:
            # The committed canvas joins the context, as the reference encodes it.
            denoiser.encode(previous)
        cf = fixed.canvas(canvas_index) if fixed is not None else None
        if cf is not None and cf.all_fixed(C):
            steps, final = 0, [int(t) for t in cf.tokens]
        else:
            steps, final = yield from _denoise(denoiser, gen, canvas_index, cf)
        committed, finished = pad_after_eos(final, gen.eos_token_id, gen.pad_token_id)
        previous = committed
        steps_per_canvas.append(steps)
        kept = _strip_eos_padding(committed, finished, gen.pad_token_id)
        # The last canvas may run past max_new_tokens: the reply stops there, as the
        # server's does (the canvas itself, and so every token before the cut, is the
        # reference's; an EOS past the cut ends nothing: the reply ends by length).
        room = gen.max_new_tokens - len(generated)
        if len(kept) > room:
            kept, finished = kept[:room], False
        generated.extend(kept)
        new_text = ""
        if decode_text is not None:
            full = decode_text(_text_tokens(generated, gen.eos_token_id))
            new_text, text = full[len(text) :], full
        yield Commit(canvas_index, kept, new_text, steps, finished)
        if finished:
            finish = "eos"
            break
    gen_time = time.perf_counter() - tic

    # As the reference counts it: non-pad generated tokens over decoder forwards.
    valid = sum(1 for t in generated if t != gen.pad_token_id)
    total_steps = sum(steps_per_canvas)
    yield Summary(
        tokens=generated,
        text=text,
        prompt_tokens=len(prompt_ids),
        canvases=len(steps_per_canvas),
        steps_per_canvas=steps_per_canvas,
        tokens_per_forward=valid / max(total_steps, 1),
        prompt_time=prompt_time,
        prompt_tps=len(prompt_ids) / prompt_time if prompt_time > 0 else 0.0,
        generation_time=gen_time,
        generation_tps=valid / gen_time if gen_time > 0 else 0.0,
        peak_memory_gb=denoiser.peak_memory_gb(),
        finish_reason=finish,
        valid_tokens=valid,
    )


def _denoise(denoiser: Denoiser, gen: GenerationConfig, canvas_index: int, cf=None):
    """Denoises one canvas, yielding a Draft per step; returns (steps, its final argmax)."""
    canvas = denoiser.start_canvas(canvas_index) if cf is None else denoiser.start_canvas(canvas_index, cf)
    mask = None if cf is None else cf.mask(denoiser.canvas_length).tolist()
    steps = 0
    argmax = None
    for step in range(gen.max_denoising_steps, 0, -1):
        canvas, argmax, accepted, stop = denoiser.step(canvas, canvas_index, step)
        steps += 1
        yield Draft(
            canvas_index,
            step,
            denoiser.to_list(argmax),
            [bool(a) for a in denoiser.to_list(accepted)],
            fixed=mask,
        )
        if stop:
            break
    return steps, denoiser.to_list(argmax)


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

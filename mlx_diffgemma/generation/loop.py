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
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from ..models.config import GenerationConfig

# -- events -------------------------------------------------------------------------


@dataclass
class Draft:
    """One denoising step of one canvas (batch row 0)."""

    canvas_index: int
    step: int  # the reference's counter: N at the first step, 1 at the last
    tokens: List[int]  # the argmax canvas
    accepted: List[bool]  # positions that took the denoiser's sample this step
    kind: str = "draft"


@dataclass
class Commit:
    """A canvas committed to the output."""

    canvas_index: int
    tokens: List[int]  # committed ids, EOS kept, padding after it removed
    text: str  # new text this canvas adds
    steps: int  # denoising steps it took
    finished: bool  # it held an EOS: generation ends here
    kind: str = "commit"


@dataclass
class Summary:
    tokens: List[int]  # all generated ids, EOS padding removed, at most max_new_tokens
    text: str
    prompt_tokens: int
    canvases: int
    steps_per_canvas: List[int]
    tokens_per_forward: float
    prompt_time: float
    prompt_tps: float
    generation_time: float
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str  # "eos" or "length"
    # `tokens` that are not pad: what tokens_per_forward and generation_tps count (a
    # canvas may hold pads before its EOS, or everywhere without one)
    valid_tokens: int = -1
    kind: str = "summary"

    def __post_init__(self):
        if self.valid_tokens < 0:
            self.valid_tokens = len(self.tokens)

    @property
    def pad_tokens(self) -> int:
        return len(self.tokens) - self.valid_tokens


@dataclass
class SpeculativeSummary(Summary):
    """A speculative run's summary (speculative.py): each "canvas" is one draft-and-verify
    round, `steps_per_canvas` the drafter's denoising steps in it, `tokens_per_forward`
    the tokens kept per target forward."""

    block_size: int = 0  # k: draft tokens proposed per round
    acceptance_length: float = 0.0  # tokens kept per round: accepted drafts + the target's own
    target_forwards: int = 0  # verify forwards (the prompt's prefill not counted)
    drafter_forwards: int = 0  # denoising steps plus encodes of the kept tokens
    kind: str = "summary"


Event = Union[Draft, Commit, Summary]


# -- the framework-neutral loop -------------------------------------------------------


class Denoiser(Protocol):
    """What `draft` needs from a backend. Arrays stay the backend's own; `to_list`
    brings one canvas row to the host."""

    gen: GenerationConfig
    canvas_length: int
    vocab_size: int
    max_context: int  # the model's context, in tokens
    cached_tokens: int  # tokens its cache holds now

    def encode(self, token_ids: Sequence[int]) -> None: ...

    def start_canvas(self, canvas_index: int) -> Any: ...

    def step(self, canvas: Any, canvas_index: int, step: int) -> tuple:
        """-> (next_canvas, argmax_canvas, accepted_mask, stop: bool)"""

    def to_list(self, row: Any) -> list: ...

    def peak_memory_gb(self) -> float: ...


def draft(
    denoiser: Denoiser,
    prompt_ids: Sequence[int],
    gen: GenerationConfig,
    decode_text=None,
) -> Iterator[Event]:
    """Runs block diffusion for one sequence; yields Draft, Commit and a final Summary."""
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
        canvas = denoiser.start_canvas(canvas_index)
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
            )
            if stop:
                break
        committed, finished = pad_after_eos(
            denoiser.to_list(argmax), gen.eos_token_id, gen.pad_token_id
        )
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


# -- shared by both backends' stream_generate / generate ------------------------------

# reference: the released sampler, token-exact to transformers; fast: fast.py (MLX only).
MODES = ("reference", "fast")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    return mode


def generation_config(model, **overrides) -> GenerationConfig:
    """The model's generation defaults (read from its directory once, at load, into
    `model.generation_defaults`) with per-call overrides under the reference's names."""
    defaults = getattr(model, "generation_defaults", None)
    if defaults is None:
        return GenerationConfig.from_model_dir(getattr(model, "model_path", None), **overrides)
    return defaults.with_overrides(**overrides)


def prompt_ids(tokenizer, prompt) -> List[int]:
    """Token ids of a prompt given as text (encoded as is, no chat template) or as ids (a
    list, or any array with `tolist`: NumPy, MLX, torch)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
        return [int(t) for t in tokenizer.encode(prompt)]
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    return [int(t) for t in np.asarray(prompt).reshape(-1).tolist()]


def context_limit(requested: Optional[int], model_limit: int) -> Tuple[int, Optional[str]]:
    """(the context a run enforces, a note or None): `requested` (--max-context), but never
    more than the model's own, and then the note says so instead of clamping in silence."""
    if requested is not None and requested < 1:
        raise ValueError(f"max_context must be a positive number of tokens (got {requested})")
    if requested is None or requested == model_limit:
        return model_limit, None
    if requested < model_limit:
        return requested, None
    return model_limit, (f"a {requested:,}-token context was asked for, but the model's is "
                         f"{model_limit:,} tokens: using {model_limit:,}")


def reserved_tokens(gen: GenerationConfig, canvas_length: int) -> int:
    """Context tokens a reply may take: every canvas `max_new_tokens` may need, whole."""
    return math.ceil(gen.max_new_tokens / canvas_length) * canvas_length


def check_context(context_tokens: int, gen: GenerationConfig, canvas_length: int, limit: int,
                  fix: str = "shorten the prompt or lower max_new_tokens", at_least: bool = False) -> None:
    """Refuses a generation that could run past `limit`: the context it starts from (what
    a cache holds plus the new prompt) and every canvas it may generate. `at_least`: the
    count is a lower bound (templates.min_tokens), taken before the prompt is tokenized."""
    check_reserve(context_tokens, reserved_tokens(gen, canvas_length), limit, fix, at_least=at_least)


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


def stream(denoiser: Denoiser, tokenizer, prompt) -> Iterator[Event]:
    """The body of every backend's `stream_generate`: the prompt's ids, the context
    check, then block diffusion on `denoiser`."""
    ids = prompt_ids(tokenizer, prompt)
    check_context(denoiser.cached_tokens + len(ids), denoiser.gen, denoiser.canvas_length,
                  denoiser.max_context)
    yield from draft(denoiser, ids, denoiser.gen, text_decoder(tokenizer))


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

"""Infill: the middle between a prefix and a suffix, written in one canvas.

The prefix goes through the encoder as the prompt (raw), or, after a chat conversation
rendered with its generation prompt, starts the reply at the canvas's first positions
(chat: held fixed there, whole canvases of it encoded with the prompt). The canvas is
`[reply start fixed][L open: the middle][suffix fixed][tail open]`; fixed positions
(fixed.py) hold the given tokens from the first step, and no EOS may come before the
suffix. Every candidate is one canvas (`max_new_tokens` = the canvas), so the loop never
encodes a committed canvas: the encoder cache after a candidate is the cache before it,
and the candidates share the encoded prefix.

The middle's length is chosen, not guessed (a wrong hole length is what costs diffusion
infilling most): candidate lengths are run one by one and each committed canvas is
scored by the model itself, the mean log-probability (temperature 1, one decoder pass
without self-conditioning) of its middle and suffix tokens; the best wins, ties to the
shorter. The suffix term says how well the suffix follows the middle: a wrong length
leaves a seam the model does not believe. A mean, not a sum, so that short middles are
not favoured.

Why one canvas: the middle's queries attend only to the encoded context and to their own
canvas, so suffix tokens placed in a later canvas would never reach it. A suffix that
does not fit beside the longest candidate is refused in one line, or with
`truncate_suffix=True` cut to its head (the same cut for every candidate).

This module imports no array framework; `stream_infill` / `infill` run on MLX and
`torch_backend.stream_infill` on torch, both through `run_infill`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Union

from ..images.processor import is_messages
from ..models.tokenizer import encode_text
from .events import Commit, Draft, Event, Summary
from .fixed import check_fixed
from .loop import draft, run_to_summary, text_decoder
from .prompt import prepare_prompt, prompt_ids
from .settings import Settings, check_reserve, defaults, resolve

DEFAULT_LENGTHS = (4, 8, 16, 32, 64, 128, 192)
SCORES = ("mean", "sum", "suffix")


@dataclass
class Scored:
    """One candidate length, run and scored by the model."""

    length: int
    score: float
    steps: int
    tokens: List[int]  # its middle
    logprobs: List[float] = field(default_factory=list)  # of its middle and suffix tokens, in order
    kind: str = "scored"


@dataclass
class InfillSummary(Summary):
    """An infill's summary: `tokens`/`text` are the chosen middle."""

    length: int = 0  # the chosen middle's length
    scores: Dict[int, float] = field(default_factory=dict)  # length -> score
    candidate_steps: Dict[int, int] = field(default_factory=dict)  # length -> denoising steps
    forwards: int = 0  # decoder forwards, the score passes included
    suffix_dropped: int = 0  # suffix tokens cut by truncate_suffix
    kind: str = "summary"


@dataclass(frozen=True)
class Layout:
    """Where an infill puts its tokens."""

    prompt: List[int]  # encoded before the canvas
    head: List[int]  # the reply's start, fixed at [0, len(head))
    suffix: List[int]  # fixed right after the middle
    lengths: List[int]  # the candidate middle lengths, ascending
    refine: bool  # default lengths: one more round around the best
    limit: int  # the longest middle allowed: max_new_tokens, and what the canvas holds
    suffix_dropped: int = 0
    old: Optional[List[int]] = None  # an edit's old middle: the canvas starts from it (editing.py)
    strength: float = 1.0  # the fraction of it that starts as noise

    def fixed(self, length: int) -> Dict[int, int]:
        start = len(self.head) + length
        return {**dict(enumerate(self.head)), **{start + i: t for i, t in enumerate(self.suffix)}}

    def scored(self, length: int) -> List[int]:
        """The canvas positions whose log-probabilities a candidate's score reads: its
        middle's and the suffix's."""
        P, S = len(self.head), len(self.suffix)
        return list(range(P, P + length + S))


def check_lengths(lengths) -> Optional[List[int]]:
    if lengths is None:
        return None
    values = [lengths] if isinstance(lengths, int) else list(lengths)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"infill lengths must be positive token counts (got {lengths!r})")
    return sorted(set(values))


def plan(prompt: Sequence[int], head: Sequence[int], suffix: Sequence[int], *, canvas_length: int,
         cap: int, lengths=None, truncate_suffix: bool = False) -> Layout:
    """The layout of an infill: whole canvases of the reply's start join the prompt, the
    candidate lengths are capped by `cap` (max_new_tokens), and the suffix is checked
    against the longest one."""
    C = canvas_length
    whole = len(head) // C * C
    prompt, head, suffix = list(prompt) + list(head[:whole]), list(head[whole:]), list(suffix)
    P, S = len(head), len(suffix)
    asked = check_lengths(lengths)
    if asked is None:
        room = C - P - S if C - P - S >= 1 else (C - P) // 2
        top = min(cap, room)
        candidates = [n for n in DEFAULT_LENGTHS if n <= top] or [top]
    else:
        candidates = sorted(set(min(n, cap) for n in asked))
    longest = max(candidates)
    keep = C - P - longest
    if keep < 0 or (keep == 0 and S > 0 and not truncate_suffix) or longest < 1:
        raise ValueError(f"a middle of up to {longest} tokens does not fit a {C}-token canvas beside "
                         f"the reply's first {P} tokens: lower the lengths")
    dropped = max(0, S - keep)
    if dropped and not truncate_suffix:
        beside = f"the reply's first {P} tokens and " if P else ""
        raise ValueError(
            f"the suffix is {S} tokens; a {C}-token canvas holds at most {keep} beside {beside}a middle "
            f"of up to {longest}: shorten it, lower the lengths, or pass truncate_suffix=True to "
            f"keep its first {keep} tokens (the model never sees the rest)")
    return Layout(prompt, head, suffix[: S - dropped], candidates, asked is None,
                  min(cap, C - P - (S - dropped)), dropped)


def run_infill(denoiser, tokenizer, layout: Layout, score: str = "mean") -> Iterator[Event]:
    """Runs an infill on `denoiser` (its `gen` the run's settings): every candidate's
    Drafts (with `candidate` set when there are several), a `Scored` per candidate, then
    one Commit and an `InfillSummary` holding the chosen middle."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)} (got {score!r})")
    C, gen = denoiser.canvas_length, denoiser.gen
    one = gen.with_overrides(max_new_tokens=C)
    check_reserve(denoiser.cached_tokens + len(layout.prompt), C, denoiser.max_context)
    tic = time.perf_counter()
    if layout.prompt:
        denoiser.encode(layout.prompt)
    prompt_time, tic = time.perf_counter() - tic, time.perf_counter()
    tag = len(layout.lengths) > 1 or layout.refine
    runs: Dict[int, Scored] = {}
    for length in layout.lengths:
        runs[length] = yield from _candidate(denoiser, layout, one, length, score, tag)
    for length in _refinement(layout, runs) if layout.refine else []:
        runs[length] = yield from _candidate(denoiser, layout, one, length, score, tag)
    best = _best(runs)
    decode = text_decoder(tokenizer)
    text = decode(best.tokens) if decode is not None else ""
    yield Commit(0, best.tokens, text, best.steps, True)
    forwards = sum(r.steps + 1 for r in runs.values())
    gen_time = time.perf_counter() - tic
    yield InfillSummary(
        tokens=best.tokens, text=text, prompt_tokens=len(layout.prompt), canvases=1,
        steps_per_canvas=[best.steps], tokens_per_forward=len(best.tokens) / max(forwards, 1),
        prompt_time=prompt_time, prompt_tps=len(layout.prompt) / prompt_time if prompt_time > 0 else 0.0,
        generation_time=gen_time, generation_tps=len(best.tokens) / gen_time if gen_time > 0 else 0.0,
        peak_memory_gb=denoiser.peak_memory_gb(), finish_reason="eos", length=best.length,
        scores={n: r.score for n, r in sorted(runs.items())},
        candidate_steps={n: r.steps for n, r in sorted(runs.items())}, forwards=forwards,
        suffix_dropped=layout.suffix_dropped)


def _candidate(denoiser, layout: Layout, gen, length: int, score: str, tag: bool):
    """Runs one candidate length (yielding its Drafts); returns its `Scored`."""
    C = denoiser.canvas_length
    fixed = check_fixed(layout.fixed(length), canvas_length=C, max_new_tokens=C,
                        vocab_size=denoiser.vocab_size, eos_token_id=gen.eos_token_id,
                        pad_token_id=gen.pad_token_id)
    if layout.old is not None:  # an edit: the middle starts from the old span, cut to `length`
        start = len(layout.head)
        fixed = replace(fixed, start={start + i: t for i, t in enumerate(layout.old[:length])},
                        strength=layout.strength)
    canvas, steps = None, 0
    for ev in draft(denoiser, [], gen, None, fixed=fixed):
        if isinstance(ev, Draft):
            if tag:
                ev.candidate = length
            yield ev
        elif isinstance(ev, Commit):
            canvas = ev.tokens + [gen.pad_token_id] * (C - len(ev.tokens))  # the committed canvas
            steps = ev.steps
    logps = denoiser.score(canvas, layout.scored(length))
    start = len(layout.head)
    scored = Scored(length, score_of(logps, length, score), steps, canvas[start:start + length], logps)
    yield scored
    return scored


def score_of(logprobs: Sequence[float], length: int, rule: str = "mean") -> float:
    """A candidate's score from its middle's and suffix's log-probabilities: their mean,
    their sum, or the suffix's mean alone."""
    picked = logprobs[length:] if rule == "suffix" else logprobs
    if not picked:  # no suffix: the suffix rule has nothing to read
        return 0.0
    return float(sum(picked) if rule == "sum" else sum(picked) / len(picked))


def _best(runs: Dict[int, Scored]) -> Scored:
    """The best-scored candidate; ties go to the shorter."""
    return min(runs.values(), key=lambda r: (-r.score, r.length))


def _refinement(layout: Layout, runs: Dict[int, Scored]) -> List[int]:
    """Default lengths: one more round at 0.75x and 1.25x the best so far."""
    best = _best(runs).length
    near = {round(0.75 * best), round(1.25 * best)}
    return sorted(n for n in near if 1 <= n <= layout.limit and n not in runs)


# -- the prompt side, shared by both backends -------------------------------------------------


def infill_layout(model, tokenizer, prefix, suffix, *, messages=None, lengths=None,
                  truncate_suffix: bool = False, cap: int, canvas_length: int) -> Layout:
    """The layout of `stream_infill`'s arguments: raw (the prefix is the prompt) or chat
    (the conversation's rendered prompt, the prefix starting the reply). Text is encoded
    without special tokens for the suffix and the reply's start (no BOS in mid-text)."""

    def ids(x) -> List[int]:
        return encode_text(tokenizer, x) if isinstance(x, str) else prompt_ids(tokenizer, x)

    if tokenizer is None and (isinstance(prefix, str) or isinstance(suffix, str) or messages):
        raise ValueError("text (or chat messages) needs a tokenizer; pass token ids instead")
    if messages is None:
        prompt, head = prompt_ids(tokenizer, prefix), []
    else:  # chat messages, or the ids of a conversation rendered with its generation prompt
        messages = list(messages)
        prompt = prepare_prompt(model, tokenizer, messages)[0] if messages and is_messages(messages) \
            else prompt_ids(tokenizer, messages)
        head = ids(prefix)
    return plan(prompt, head, ids(suffix), canvas_length=canvas_length, cap=cap, lengths=lengths,
                truncate_suffix=truncate_suffix)


def stream_infill(model, tokenizer, prefix: Union[str, Sequence[int]], suffix: Union[str, Sequence[int]], *,
                  messages: Optional[Sequence[dict]] = None, lengths=None, truncate_suffix: bool = False,
                  score: str = "mean", cache=None, noise=None, seed: Optional[int] = None,
                  mode: str = "reference", fast=None, **generation_kwargs) -> Iterator[Event]:
    """Writes the middle between `prefix` and `suffix` (text or ids) on MLX, streaming each
    candidate's Drafts, a `Scored` per candidate, one Commit and an `InfillSummary`.

    Raw (`messages=None`): the prefix is the prompt, encoded as is. Chat: `messages` are
    the conversation (rendered with the chat template and its generation prompt; or the
    ids of one so rendered) and `prefix` is the start of the reply. `lengths`: the
    middle's length (int), candidates
    (list), or None for {4, 8, 16, ..., 192} up to what fits, then 0.75x and 1.25x the
    best. `max_new_tokens` caps the middle. Other arguments as `stream_generate`'s."""
    settings = resolve(defaults(model), mode=mode, fast=fast, seed=seed, **generation_kwargs)
    yield from run(model, tokenizer, prefix, suffix, settings, messages=messages, lengths=lengths,
                   truncate_suffix=truncate_suffix, score=score, cache=cache, noise=noise)


def run(model, tokenizer, prefix, suffix, settings: Settings, *, messages=None, lengths=None,
        truncate_suffix: bool = False, score: str = "mean", cache=None, noise=None) -> Iterator[Event]:
    """`stream_infill` with its settings resolved: what the chat backends call."""
    layout = infill_layout(model, tokenizer, prefix, suffix, messages=messages, lengths=lengths,
                           truncate_suffix=truncate_suffix, cap=settings.gen.max_new_tokens,
                           canvas_length=model.canvas_length)
    yield from run_on_mlx(model, tokenizer, layout, settings, score, cache, noise)


def run_on_mlx(model, tokenizer, layout: Layout, settings: Settings, score: str = "mean", cache=None,
               noise=None) -> Iterator[Event]:
    """An infill's layout run on MLX, seeded and on device as `api.run` runs a generation
    (MLX is imported here, so the torch path loads this module without it)."""
    from .api import on_device, seeded_denoiser

    denoiser = seeded_denoiser(model, settings, cache=cache, noise=noise)
    with on_device(model):
        yield from run_infill(denoiser, tokenizer, layout, score)


def infill(model, tokenizer, prefix, suffix, **kwargs) -> str:
    """The middle's text (`stream_infill`'s Summary holds its ids and the scores)."""
    return run_to_summary(stream_infill(model, tokenizer, prefix, suffix, **kwargs)).text

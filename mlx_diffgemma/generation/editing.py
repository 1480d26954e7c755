"""In-line editing: rewrite a span of a text, the text around it held in place.

An edit is an infill (infilling.py) whose middle starts from the old span: `strength` in
[0, 1] is the fraction of the span's positions that start as noise, the others start as
their old token and are anchored (when the reference sampler renoises them, they go back
to their old token, so they change only where the model's sample is accepted there).
`strength=1` is an infill; `strength=0` keeps each old token unless the model is sure.
In fast mode the open positions carry their argmax and are not renoised, so the strength
acts through the start canvas only.

Without an instruction the text before the span is the prompt (raw) and the text after it
the suffix; the span keeps its token count. With one, the user message is the
instruction and the whole text, and the reply is the text with the span rewritten: it
starts with the text before the span (held at the canvas's first positions) and ends with
the text after it; the span's length is searched over 0.5x to 1.5x the old one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional, Sequence, Tuple

from ..models.tokenizer import encode_text
from .events import Event
from .infilling import infill_layout, run_on_mlx
from .loop import run_to_summary
from .settings import defaults, resolve

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def find_span(text: str, span: Optional[Tuple[int, int]], old: Optional[str]) -> Tuple[int, int]:
    """The (start, end) character offsets of the span to rewrite: `span`, or where `old`
    occurs (exactly once)."""
    if (span is None) == (old is None):
        raise ValueError("give the span to rewrite as span=(start, end) or as old=\"its text\"")
    if old is not None:
        n = text.count(old) if old else 0
        if n != 1:
            raise ValueError(f"{old!r} occurs {n} times in the text; an edit needs it exactly once "
                             "(or pass span=(start, end))")
        start = text.index(old)
        return start, start + len(old)
    start, end = span
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(text)):
        raise ValueError(f"span {span!r} must be character offsets 0 <= start <= end <= {len(text)}")
    return start, end


def edit_plan(model, tokenizer, text: str, span, *, old=None, instruction: Optional[str] = None,
              strength: float = 0.5, lengths=None, truncate_suffix: bool = False, cap: int,
              canvas_length: int):
    """(layout, text before the span, text after it) of an edit."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1] (got {strength})")
    if tokenizer is None:
        raise ValueError("an edit works on text and needs a tokenizer")
    s, e = find_span(text, span, old)
    before, middle, after = text[:s], text[s:e], text[e:]
    old_ids = encode_text(tokenizer, middle)
    n = max(len(old_ids), 1)
    if instruction is None:
        if not before:
            raise ValueError("an edit without an instruction reads the text before the span as its "
                             "prompt: the span starts the text; give an instruction")
        lengths = lengths if lengths is not None else n
        layout = infill_layout(model, tokenizer, before, after, lengths=lengths, cap=cap,
                               truncate_suffix=truncate_suffix, canvas_length=canvas_length)
    else:
        if lengths is None:
            lengths = sorted({max(1, round(f * n)) for f in SCALES})
        messages = [{"role": "user", "content": f"{instruction}\n\n{text}"}]
        layout = infill_layout(model, tokenizer, before, after, messages=messages, lengths=lengths, cap=cap,
                               truncate_suffix=truncate_suffix, canvas_length=canvas_length)
    return replace(layout, old=old_ids, strength=strength), before, after


def stream_edit(model, tokenizer, text: str, span: Optional[Tuple[int, int]] = None, *,
                old: Optional[str] = None, instruction: Optional[str] = None, strength: float = 0.5,
                lengths=None, truncate_suffix: bool = False, score: str = "mean", cache=None, noise=None,
                seed: Optional[int] = None, mode: str = "reference", fast=None,
                **generation_kwargs) -> Iterator[Event]:
    """Rewrites `text[span[0]:span[1]]` (or the one occurrence of `old`) on MLX; streams as
    `stream_infill` (the Commit and the InfillSummary hold the new span)."""
    settings = resolve(defaults(model), mode=mode, fast=fast, seed=seed, **generation_kwargs)
    layout, _, _ = edit_plan(model, tokenizer, text, span, old=old, instruction=instruction, strength=strength,
                             lengths=lengths, truncate_suffix=truncate_suffix, cap=settings.gen.max_new_tokens,
                             canvas_length=model.canvas_length)
    yield from run_on_mlx(model, tokenizer, layout, settings, score, cache, noise)


def edit(model, tokenizer, text: str, span: Optional[Sequence[int]] = None, **kwargs) -> str:
    """The whole text with the span rewritten."""
    s, e = find_span(text, None if span is None else tuple(span), kwargs.get("old"))
    summary = run_to_summary(stream_edit(model, tokenizer, text, None if span is None else tuple(span), **kwargs))
    return text[:s] + summary.text + text[e:]

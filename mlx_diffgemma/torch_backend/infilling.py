"""Infill and edits on the torch path: infilling.py's driver with the torch denoiser."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

from ..generation.editing import edit_plan
from ..generation.events import Event
from ..generation.infilling import infill_layout, run_infill
from ..generation.loop import run_to_summary
from ..generation.noise import NoiseSource
from ..generation.settings import Settings, defaults, resolve
from .drafter import seeded_denoiser


def stream_infill(model, tokenizer, prefix: Union[str, Sequence[int]], suffix: Union[str, Sequence[int]], *,
                  messages: Optional[Sequence[dict]] = None, lengths=None, truncate_suffix: bool = False,
                  score: str = "mean", cache=None, noise: Optional[NoiseSource] = None,
                  seed: Optional[int] = None, **generation_kwargs) -> Iterator[Event]:
    """As `mlx_diffgemma.stream_infill`, on torch."""
    settings = resolve(defaults(model), backend="torch", seed=seed, **generation_kwargs)
    yield from run(model, tokenizer, prefix, suffix, settings, messages=messages, lengths=lengths,
                   truncate_suffix=truncate_suffix, score=score, cache=cache, noise=noise)


def run(model, tokenizer, prefix, suffix, settings: Settings, *, messages=None, lengths=None,
        truncate_suffix: bool = False, score: str = "mean", cache=None,
        noise: Optional[NoiseSource] = None) -> Iterator[Event]:
    """`stream_infill` with its settings resolved: what the chat backend calls."""
    layout = infill_layout(model, tokenizer, prefix, suffix, messages=messages, lengths=lengths,
                           truncate_suffix=truncate_suffix, cap=settings.gen.max_new_tokens,
                           canvas_length=int(model.config.canvas_length))
    yield from run_infill(seeded_denoiser(model, settings, cache=cache, noise=noise), tokenizer, layout, score)


def stream_edit(model, tokenizer, text: str, span=None, *, old: Optional[str] = None,
                instruction: Optional[str] = None, strength: float = 0.5, lengths=None,
                truncate_suffix: bool = False, score: str = "mean", cache=None,
                noise: Optional[NoiseSource] = None, seed: Optional[int] = None,
                **generation_kwargs) -> Iterator[Event]:
    """As `mlx_diffgemma.stream_edit`, on torch."""
    settings = resolve(defaults(model), backend="torch", seed=seed, **generation_kwargs)
    layout, _, _ = edit_plan(model, tokenizer, text, span, old=old, instruction=instruction, strength=strength,
                             lengths=lengths, truncate_suffix=truncate_suffix, cap=settings.gen.max_new_tokens,
                             canvas_length=int(model.config.canvas_length))
    yield from run_infill(seeded_denoiser(model, settings, cache=cache, noise=noise), tokenizer, layout, score)


def infill(model, tokenizer, prefix, suffix, **kwargs) -> str:
    return run_to_summary(stream_infill(model, tokenizer, prefix, suffix, **kwargs)).text

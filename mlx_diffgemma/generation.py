"""The public API on MLX: `stream_generate` and `generate`, in reference mode (the
default, token-exact to the reference) or fast mode (fast.py)."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx

from .cache import EncoderCache
from .config import check_seed
from .denoiser import MLXDenoiser
from .distributed import checked, shared_seed
from .drafter import Event, check_mode, collect, generation_config, stream
from .fast import FastDenoiser, FastOptions
from .images import prepare_prompt
from .noise import NoiseSource

def make_denoiser(model, gen, *, cache=None, noise=None, mode: str = "reference",
                  fast: Optional[FastOptions] = None) -> MLXDenoiser:
    """The denoiser of `mode`; for a split model (`Model.shard`), checked across its ranks
    at every step (distributed.CheckedDenoiser)."""
    if check_mode(mode) == "fast":
        return checked(FastDenoiser(model, gen, cache=cache, noise=noise, options=fast), model)
    if fast is not None:
        raise ValueError("fast options need mode='fast'")
    return checked(MLXDenoiser(model, gen, cache=cache, noise=noise), model)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array, Sequence[dict]],
    *,
    images: Optional[Sequence] = None,
    cache: Optional[EncoderCache] = None,
    noise: Optional[NoiseSource] = None,
    seed: Optional[int] = None,
    mode: str = "reference",
    fast: Optional[FastOptions] = None,
    chat: bool = False,
    **generation_kwargs,
) -> Iterator[Event]:
    """Generates with block diffusion, yielding a `Draft` per denoising step, a `Commit`
    per canvas and a final `Summary`.

    `prompt` is chat messages (rendered with the chat template, generation prompt added:
    what an instruction-tuned model such as the released one expects), text (encoded
    with `tokenizer` as is, no chat template: a base-model prompt, or one you templated
    yourself; `chat=True` sends it as one user message instead), or token ids.
    `images` (paths, data URLs, bytes, PIL images; images.py) go where the prompt holds
    the image placeholder `<|image|>`, one per image; chat messages carry theirs as
    content parts `{"type": "image", "image": ...}`. The prompt is expanded and the
    images encoded with it (images.Processor).
    With `cache`, only the tokens it does not hold yet are passed as `prompt`.
    Generation parameters (`max_new_tokens`, `max_denoising_steps`, `entropy_bound`,
    `t_min`, `t_max`, `stability_threshold`, `confidence_threshold`, `eos_token_id`,
    `pad_token_id`) default to the checkpoint's generation_config.json.
    `mode="fast"` runs fast.py's denoiser (`fast`: its options, default FastOptions()).
    """
    gen = generation_config(model, **generation_kwargs)
    prompt, image_inputs = prepare_prompt(model, tokenizer, prompt, images, chat=chat)
    if check_seed(seed) is None and noise is None and getattr(model, "group", None) is not None:
        seed = shared_seed(model.group)  # the ranks of a split model must draw alike
    if check_seed(seed) is not None:
        mx.random.seed(seed)
    denoiser = make_denoiser(model, gen, cache=cache, noise=noise, mode=mode, fast=fast)
    denoiser.images = image_inputs  # encoded with the prompt
    yield from stream(denoiser, tokenizer, prompt)


def generate(model, tokenizer, prompt, *, verbose: bool = False, **kwargs) -> str:
    """Generates and returns the text (the token ids are in `stream_generate`'s Summary)."""
    return collect(stream_generate(model, tokenizer, prompt, **kwargs), verbose)

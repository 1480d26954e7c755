"""The public API on MLX: `stream_generate` and `generate`, in reference mode (the
default, token-exact to the reference) or fast mode (fast.py)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Sequence, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from ..models.cache import EncoderCache
from ..models.distributed import shared_seed
from .denoiser import MLXDenoiser, checked
from .events import Event
from .fast import FastDenoiser, FastOptions
from .loop import collect, stream
from .noise import NoiseSource
from .prompt import prepare_prompt
from .settings import Settings, defaults, resolve


def make_denoiser(model, settings: Settings, *, cache=None, noise=None, keys=None) -> MLXDenoiser:
    """The denoiser of `settings.mode` (`keys`: its own noise.KeyStream); for a split model
    (`Model.shard`), checked across its ranks at every step (denoiser.CheckedDenoiser)."""
    if settings.mode == "fast":
        return checked(FastDenoiser(model, settings.gen, cache=cache, noise=noise, options=settings.fast,
                                    keys=keys), model)
    return checked(MLXDenoiser(model, settings.gen, cache=cache, noise=noise, keys=keys), model)


def seeded_denoiser(model, settings: Settings, *, cache=None, noise=None) -> MLXDenoiser:
    """`make_denoiser` after seeding MLX's generator with `settings.seed` (a split model's
    ranks, unseeded and without a noise source, agree on one)."""
    seed = settings.seed
    if seed is None and noise is None and getattr(model, "group", None) is not None:
        seed = shared_seed(model.group)  # the ranks of a split model must draw alike
    if seed is not None:
        mx.random.seed(seed)
    return make_denoiser(model, settings, cache=cache, noise=noise)


_generation_streams: dict = {}


def generation_stream():
    """The stream a generation's work goes to on Metal, one per thread (mlx-lm keeps the
    same), so that it does not queue behind other work on the default stream."""
    device = mx.default_device()
    if device not in _generation_streams:
        _generation_streams[device] = mx.new_thread_local_stream(device)
    return _generation_streams[device]


@contextmanager
def wired_limit(model, stream):
    """Wires the device's recommended working set while a generation runs, so that the
    weights stay resident between steps instead of being paged out (a model over 90% of
    it is said to page). The previous limit comes back once the stream's work is done:
    the limit must not change under running work."""
    limit = mx.device_info().get("max_recommended_working_set_size")
    if limit is None:
        yield
        return
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if weights > 0.9 * limit:
        warnings.warn(f"the weights take {weights >> 20} MB of the {limit >> 20} MB this Mac keeps resident: "
                      "generation will page and run slowly; a smaller quantization recipe fits (README)")
    previous = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize(stream)
        mx.set_wired_limit(previous)


@contextmanager
def on_device(model):
    """The wired limit and the generation stream around a generation on Metal. Nothing
    elsewhere: on the CPU the forward already runs on lanes of their own streams
    (lanes.py), and CUDA has no wired memory to set."""
    if not mx.metal.is_available():
        yield
        return
    stream = generation_stream()
    with wired_limit(model, stream), mx.stream(stream):
        yield


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
    fixed: Optional[Mapping[int, int]] = None,
    **generation_kwargs,
) -> Iterator[Event]:
    """Generates with block diffusion, yielding a `Draft` per denoising step, a `Commit`
    per canvas and a final `Summary`.

    `prompt` is chat messages (rendered with the chat template, generation prompt added:
    what an instruction-tuned model such as the released one expects), text (encoded
    with `tokenizer` as is, no chat template: a base-model prompt, or one you templated
    yourself; `chat=True` sends it as one user message instead), or token ids.
    `images` (paths, data URLs, bytes, PIL images; images/load.py) go where the prompt
    holds the image placeholder `<|image|>`, one per image; chat messages carry theirs
    as content parts `{"type": "image", "image": ...}`. The prompt is expanded and the
    images encoded with it (images.processor.Processor).
    With `cache`, only the tokens it does not hold yet are passed as `prompt`.
    Generation parameters (`max_new_tokens`, `max_denoising_steps`, `entropy_bound`,
    `t_min`, `t_max`, `stability_threshold`, `confidence_threshold`, `eos_token_id`,
    `pad_token_id`) default to the checkpoint's generation_config.json.
    `mode="fast"` runs fast.py's denoiser (`fast`: its options, default FastOptions()).
    `fixed` ({position: token_id}, positions counted from the first generated token)
    holds those tokens in their canvases from the first step (fixed.py): never resampled,
    shown as accepted, committed as given; no EOS before the last of them.
    """
    settings = resolve(defaults(model), mode=mode, fast=fast, seed=seed, **generation_kwargs)
    yield from run(model, tokenizer, prompt, settings, images=images, cache=cache, noise=noise, chat=chat,
                   fixed=fixed)


def run(model, tokenizer, prompt, settings: Settings, *, images=None, cache: Optional[EncoderCache] = None,
        noise: Optional[NoiseSource] = None, chat: bool = False,
        fixed: Optional[Mapping[int, int]] = None) -> Iterator[Event]:
    """`stream_generate` with its settings resolved: what the chat backends call."""
    prompt, image_inputs = prepare_prompt(model, tokenizer, prompt, images, chat=chat)
    denoiser = seeded_denoiser(model, settings, cache=cache, noise=noise)
    denoiser.images = image_inputs  # encoded with the prompt
    with on_device(model):
        yield from stream(denoiser, tokenizer, prompt, fixed=fixed)


def generate(model, tokenizer, prompt, *, verbose: bool = False, **kwargs) -> str:
    """Generates and returns the text (the token ids are in `stream_generate`'s Summary)."""
    return collect(stream_generate(model, tokenizer, prompt, **kwargs), verbose)

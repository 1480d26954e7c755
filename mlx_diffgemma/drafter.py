"""The drafter: block-diffusion generation, as the reference `generate()` does it.

Outer loop, one canvas at a time: encode what the cache does not hold yet, start a
canvas of uniform random tokens, then denoise it for up to N steps (decoder forward
with self-conditioning from the previous step, linear temperature schedule,
categorical sample, entropy-bound acceptance, renoising, stable-and-confident stop),
commit its argmax, pad after the first EOS and stop there.

The loop (`draft`) is framework-neutral: it drives a *denoiser* object that owns the
network, the cache and the per-step array work. `MLXDenoiser` is ours; the torch
reference path (`torch_backend`) supplies its own, so both products share one loop,
one event stream and one set of statistics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Protocol, Sequence, Union

import mlx.core as mx
import numpy as np

from .cache import EncoderCache
from .config import GenerationConfig, check_seed
from .noise import NoiseSource
from .sampler import (
    entropy_bound_accept,
    pad_after_eos,
    stable_and_confident,
    token_entropy,
)

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
    tokens: List[int]  # all generated ids, EOS padding removed
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
    kind: str = "summary"


Event = Union[Draft, Commit, Summary]


# -- the framework-neutral loop -------------------------------------------------------


class Denoiser(Protocol):
    """What `draft` needs from a backend. Arrays stay the backend's own; `to_list`
    brings one canvas row to the host."""

    canvas_length: int
    vocab_size: int

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
        generation_tps=len(generated) / gen_time if gen_time > 0 else 0.0,
        peak_memory_gb=denoiser.peak_memory_gb(),
        finish_reason=finish,
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


# -- MLX ---------------------------------------------------------------------------


class MLXDenoiser:
    """The MLX model, its encoder cache and the sampler, one step at a time on device.

    Randomness comes from `noise` when given (NumPy arrays, see noise.py; the sample is
    the Gumbel-max argmax(logits / t + g)), otherwise from `mx.random` (seeded by the
    caller), whose categorical draw is the same Gumbel-max.
    """

    def __init__(
        self,
        model,
        gen: GenerationConfig,
        cache: Optional[EncoderCache] = None,
        noise: Optional[NoiseSource] = None,
        batch_size: int = 1,
    ):
        self.model = model
        self.gen = gen
        self.noise = noise
        self.cache = cache if cache is not None else model.make_cache()
        self.batch_size = batch_size
        self.canvas_length = model.canvas_length
        self.vocab_size = model.vocab_size
        self._sc_logits = None
        self._history = None
        mx.reset_peak_memory()

    def encode(self, token_ids: Sequence[int]) -> None:
        ids = mx.array(np.asarray(token_ids, dtype=np.int32).reshape(self.batch_size, -1))
        self.model.encode(ids, self.cache)

    def start_canvas(self, canvas_index: int) -> mx.array:
        self._sc_logits = None
        self._history = None
        shape = (self.batch_size, self.canvas_length)
        if self.noise is not None:
            return mx.array(self.noise.init_canvas(canvas_index, shape, self.vocab_size).astype(np.int32))
        return mx.random.randint(0, self.vocab_size, shape, dtype=mx.int32)

    def step(self, canvas: mx.array, canvas_index: int, step: int):
        logits = self.model.decode(canvas, self.cache, self._sc_logits)
        processed = logits / self.gen.temperature(step)
        # Hold no reference to the raw logits: `processed` can then take their buffer
        # ([canvas x vocab] float32, 268 MB at the real shapes) instead of a second one.
        del logits
        return self.sample(processed, canvas, canvas_index, step)

    def sample(self, processed: mx.array, canvas: mx.array, canvas_index: int, step: int):
        """The reference sampler on one step's processed (temperature-scaled) logits
        (split from `step` so the bench can time it alone)."""
        gen = self.gen
        argmax = mx.argmax(processed, axis=-1).astype(mx.int32)
        if self.noise is not None:
            g = mx.array(self.noise.gumbel(canvas_index, step, processed.shape))
            sample = mx.argmax(processed + g, axis=-1).astype(mx.int32)
            fresh = mx.array(
                self.noise.renoise(canvas_index, step, canvas.shape, self.vocab_size).astype(np.int32)
            )
        else:
            sample = mx.random.categorical(processed, axis=-1).astype(mx.int32)
            fresh = mx.random.randint(0, self.vocab_size, canvas.shape, dtype=mx.int32)
        entropy = token_entropy(processed)
        accepted = entropy_bound_accept(entropy, gen.entropy_bound)
        # Accepted positions take the sample; every other position is renoised.
        next_canvas = mx.where(accepted, sample, fresh)
        stop, self._history = stable_and_confident(
            argmax, self._history, entropy, gen.stability_threshold, gen.confidence_threshold
        )
        # The reference feeds the processed logits back, cast to the embedding dtype.
        self._sc_logits = processed.astype(self.model.dtype)
        mx.eval(next_canvas, argmax, accepted, stop, self._sc_logits, self._history)
        return next_canvas, argmax[0], accepted[0], bool(stop.all().item())

    def to_list(self, row) -> list:
        return row.tolist()

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9


# -- public API ---------------------------------------------------------------------


def _prompt_ids(tokenizer, prompt: Union[str, Sequence[int], mx.array]) -> List[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, mx.array):
        prompt = prompt.tolist()
    ids = list(np.asarray(prompt).reshape(-1).tolist())
    return [int(t) for t in ids]


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    *,
    cache: Optional[EncoderCache] = None,
    noise: Optional[NoiseSource] = None,
    seed: Optional[int] = None,
    **generation_kwargs,
) -> Iterator[Event]:
    """Generates with block diffusion, yielding a `Draft` per denoising step, a `Commit`
    per canvas and a final `Summary`.

    `prompt` is text (encoded with `tokenizer` as is, no chat template) or token ids.
    With `cache`, only the tokens it does not hold yet are passed as `prompt`.
    Generation parameters (`max_new_tokens`, `max_denoising_steps`, `entropy_bound`,
    `t_min`, `t_max`, `stability_threshold`, `confidence_threshold`, `eos_token_id`,
    `pad_token_id`) default to the checkpoint's generation_config.json.
    """
    gen = GenerationConfig.from_model_dir(getattr(model, "model_path", None), **generation_kwargs)
    ids = _prompt_ids(tokenizer, prompt)
    _check_context(model, cache, len(ids), gen)
    if check_seed(seed) is not None:
        mx.random.seed(seed)
    denoiser = MLXDenoiser(model, gen, cache=cache, noise=noise)
    yield from draft(denoiser, ids, gen, text_decoder(tokenizer))


def run_to_summary(events: Iterator[Event], on_commit=None) -> Summary:
    """Drains an event stream; returns its Summary (calling `on_commit` per Commit)."""
    summary = None
    for event in events:
        if on_commit is not None and isinstance(event, Commit):
            on_commit(event)
        if isinstance(event, Summary):
            summary = event
    return summary


def generate(model, tokenizer, prompt, *, verbose: bool = False, **kwargs) -> str:
    """Generates and returns the text (the token ids are in `stream_generate`'s Summary)."""
    show = (lambda e: print(e.text, end="", flush=True)) if verbose else None
    summary = run_to_summary(stream_generate(model, tokenizer, prompt, **kwargs), show)
    if verbose:
        print()
        print(
            f"{summary.canvases} canvases, {summary.tokens_per_forward:.2f} tokens/forward, "
            f"{summary.generation_tps:.1f} tok/s, peak {summary.peak_memory_gb:.2f} GB"
        )
    return summary.text


def _check_context(model, cache, n_prompt: int, gen: GenerationConfig) -> None:
    held = cache.offset if cache is not None else 0
    C = model.canvas_length
    needed = held + n_prompt + math.ceil(gen.max_new_tokens / C) * C
    limit = model.args.max_position_embeddings
    if needed > limit:
        raise ValueError(
            f"prompt too long: {held + n_prompt} context tokens + up to "
            f"{math.ceil(gen.max_new_tokens / C) * C} generated exceed the model's "
            f"{limit}-token context; shorten the prompt or lower max_new_tokens"
        )

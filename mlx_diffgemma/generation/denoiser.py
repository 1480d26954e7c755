"""The MLX denoiser the drafter loop drives in reference mode: one step of the
reference sampler at a time, on device (fast.py's denoiser builds on it)."""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..models.cache import EncoderCache
from ..models.config import GenerationConfig
from .noise import NoiseSource
from .sampler import entropy_bound_accept, stable_and_confident, token_entropy


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
    ):
        self.model = model
        self.gen = gen
        self.noise = noise
        self.cache = cache if cache is not None else model.make_cache()
        self.canvas_length = model.canvas_length
        self.vocab_size = model.vocab_size
        self.max_context = int(model.args.max_position_embeddings)
        self._sc_logits = None
        self._history = None
        self.images = None  # images.ImageInputs of the prompt: the next encode takes them
        mx.reset_peak_memory()

    @property
    def cached_tokens(self) -> int:
        return self.cache.offset

    def encode(self, token_ids: Sequence[int]) -> None:
        images, self.images = self.images, None
        kw = {} if images is None else images.encoder_kwargs()
        self.model.encode(mx.array(np.asarray(token_ids, dtype=np.int32).reshape(1, -1)), self.cache, **kw)

    def start_canvas(self, canvas_index: int) -> mx.array:
        self._sc_logits = None
        self._history = None
        shape = (1, self.canvas_length)
        if self.noise is not None:
            return mx.array(self.noise.init_canvas(canvas_index, shape, self.vocab_size).astype(np.int32))
        return mx.random.randint(0, self.vocab_size, shape, dtype=mx.int32)

    # Speculative drafting (speculative.py) reads the last step's raw logits
    # (`last_logits`); off otherwise, so the scaled logits can take their buffer.
    keep_logits = False

    def step(self, canvas: mx.array, canvas_index: int, step: int):
        logits = self.model.decode(canvas, self.cache, self._sc_logits)
        if self.keep_logits:
            self.last_logits = logits
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

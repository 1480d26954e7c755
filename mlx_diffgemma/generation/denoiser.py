"""The MLX denoiser the drafter loop drives in reference mode: one step of the
reference sampler at a time, on device (fast.py's denoiser builds on it); and, for a
model split over ranks, the check that every rank decided the same."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..models.cache import EncoderCache
from ..models.config import GenerationConfig
from ..models.distributed import agree, checksum, watch
from .fixed import CanvasFixed
from .fixed_sampling import DeviceFixed, ban_eos, sample_fixed
from .noise import KeyStream, NoiseSource
from .sampler import entropy_bound_accept, stable_and_confident, token_entropy


class MLXDenoiser:
    """The MLX model, its encoder cache and the sampler, one step at a time on device.

    Randomness comes from `noise` when given (NumPy arrays, see noise.py; the sample is
    the Gumbel-max argmax(logits / t + g)), otherwise from `mx.random`, whose categorical
    draw is the same Gumbel-max: with this sequence's `keys` (noise.KeyStream) when
    given, else the thread's generator (seeded by the caller).
    """

    def __init__(
        self,
        model,
        gen: GenerationConfig,
        cache: Optional[EncoderCache] = None,
        noise: Optional[NoiseSource] = None,
        keys: Optional[KeyStream] = None,
    ):
        self.model = model
        self.gen = gen
        self.noise = noise
        self.keys = keys
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

    _fixed: Optional[DeviceFixed] = None  # this canvas's fixed positions (fixed.py)

    def start_canvas(self, canvas_index: int, fixed: Optional[CanvasFixed] = None) -> mx.array:
        self._sc_logits = None
        self._history = None
        shape = (1, self.canvas_length)
        if self.noise is not None:
            canvas = mx.array(self.noise.init_canvas(canvas_index, shape, self.vocab_size).astype(np.int32))
        else:
            canvas = mx.random.randint(0, self.vocab_size, shape, dtype=mx.int32, key=self.key())
        # Drawn as without fixed positions, so the noise stream does not shift.
        self._fixed = None if fixed is None else DeviceFixed(fixed, self.canvas_length)
        return canvas if fixed is None else self._fixed.start(canvas)

    def key(self) -> Optional[mx.array]:
        """The key of the next `mx.random` draw: this sequence's own (`keys`), or None for
        the thread's global generator."""
        return None if self.keys is None else self.keys.next()

    # Speculative drafting (speculative.py) reads the last step's raw logits
    # (`last_logits`); off otherwise, so the scaled logits can take their buffer.
    keep_logits = False

    def step(self, canvas: mx.array, canvas_index: int, step: int):
        logits = self.model.decode(canvas, self.cache, self._sc_logits)
        processed = self.scaled(logits, step)
        # Hold no reference to the raw logits: `processed` can then take their buffer
        # ([canvas x vocab] float32, 268 MB at the real shapes) instead of a second one.
        del logits
        return self.decide(processed, canvas, canvas_index, step)

    # A step in two halves, for a caller that runs the decoder itself (generation/batch.py
    # runs several sequences' canvases in one forward): the forward's input, then the
    # decisions on its temperature-scaled logits. `step` is the two around `model.decode`.

    # Whether a step's forward is the whole canvas's `model.decode` (fast mode's active
    # set computes fewer positions and keeps keys and values of its own between steps).
    batchable = True

    def decoder_input(self, canvas: mx.array) -> mx.array:
        """The decoder's input [1, C, hidden] for this step: embeddings with
        self-conditioning from the previous step."""
        return self.model.decoder_input(canvas, self._sc_logits)

    def scaled(self, logits: mx.array, step: int) -> mx.array:
        """The step's logits over its temperature (kept as `last_logits` when asked)."""
        if self.keep_logits:
            self.last_logits = logits
        return logits / self.gen.temperature(step)

    def decide(self, processed: mx.array, canvas: mx.array, canvas_index: int, step: int):
        """-> (next_canvas, argmax_canvas, accepted_mask, stop) from `processed` [1, C, V]."""
        return self.sample(processed, canvas, canvas_index, step)

    def sample(self, processed: mx.array, canvas: mx.array, canvas_index: int, step: int):
        """The reference sampler on one step's processed (temperature-scaled) logits
        (split from `step` so the bench can time it alone)."""
        gen = self.gen
        if self._fixed is not None:
            processed = ban_eos(processed, self._fixed)
        argmax = mx.argmax(processed, axis=-1).astype(mx.int32)
        if self.noise is not None:
            g = mx.array(self.noise.gumbel(canvas_index, step, processed.shape))
            sample = mx.argmax(processed + g, axis=-1).astype(mx.int32)
            fresh = mx.array(
                self.noise.renoise(canvas_index, step, canvas.shape, self.vocab_size).astype(np.int32)
            )
        else:
            sample = mx.random.categorical(processed, axis=-1, key=self.key()).astype(mx.int32)
            fresh = mx.random.randint(0, self.vocab_size, canvas.shape, dtype=mx.int32, key=self.key())
        if self._fixed is not None:
            next_canvas, argmax, accepted, stop, self._history = sample_fixed(
                processed, argmax, sample, fresh, self._fixed, gen, self._history)
        else:
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

    def score(self, canvas: Sequence[int], positions: Sequence[int]) -> list:
        """Log-probabilities (temperature 1, no self-conditioning) of `canvas`'s own tokens
        at `positions` under one decoder pass on the cached context; the cache is only read."""
        ids = mx.array(np.asarray(canvas, dtype=np.int32)[None])
        logits = self.model.decode(ids, self.cache, None)[0].astype(mx.float32)
        idx = mx.array(np.asarray(positions, dtype=np.int32))
        rows = logits[idx]
        own = mx.take_along_axis(rows, ids[0][idx][:, None], axis=-1)[:, 0]
        return (own - mx.logsumexp(rows, axis=-1)).tolist()

    def to_list(self, row) -> list:
        return row.tolist()

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9


class CheckedDenoiser:
    """A split model's denoiser (reference or fast mode) whose every rank checks, each
    step, that all ranks decided the same: the next canvas, its argmax, the accepted
    positions and the stop. It also checks that they encode the same tokens. A cheap
    collective of a few KB per step; the steps themselves run under the watchdog."""

    def __init__(self, inner, group):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_group", group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def encode(self, token_ids: Sequence[int]) -> None:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        with watch(f"encoding {len(ids)} tokens"):
            agree(self._group, [len(ids), checksum(ids)], "the tokens to encode")
            self._inner.encode(token_ids)

    def step(self, canvas, canvas_index: int, step: int):
        with watch(f"denoising canvas {canvas_index} (step counter {step})"):
            out = self._inner.step(canvas, canvas_index, step)
            nxt, argmax, accepted, stop = out
            values = np.concatenate([np.array(nxt).reshape(-1), np.array(argmax).reshape(-1),
                                     np.array(accepted).reshape(-1).astype(np.int64), [int(stop)]])
            agree(self._group, values, f"canvas {canvas_index}, step counter {step}")
        return out


def checked(denoiser, model):
    """`denoiser` checked across ranks when `model` is split, else as it is."""
    group = getattr(model, "group", None)
    return denoiser if group is None else CheckedDenoiser(denoiser, group)

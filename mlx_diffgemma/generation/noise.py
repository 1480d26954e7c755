"""Where the drafter's randomness comes from.

The reference draws its randomness from `torch.randint` (canvas init and renoise)
and `torch.multinomial` (the denoiser sample). Our drafters draw it from a noise
source instead, so that two implementations fed the same source must emit the same
tokens. A noise source is any object with the three methods of `NoiseSource`; the
arrays it returns are NumPy arrays, so one source serves the MLX and torch drafters.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .settings import check_seed

# Stream ids mixed into the seed, one per kind of draw.
_INIT, _RENOISE, _GUMBEL = 0, 1, 2


class NoiseSource(Protocol):
    def init_canvas(
        self, canvas_index: int, shape: Sequence[int], vocab_size: int
    ) -> np.ndarray:
        """Token ids in [0, vocab_size) of `shape` = (batch, canvas) for a fresh canvas."""

    def renoise(
        self, canvas_index: int, step: int, shape: Sequence[int], vocab_size: int
    ) -> np.ndarray:
        """Token ids in [0, vocab_size) of `shape` for the non-accepted positions at `step`."""

    def gumbel(self, canvas_index: int, step: int, shape: Sequence[int]) -> np.ndarray:
        """float32 Gumbel(0, 1) noise of `shape` = (batch, canvas, vocab) for the categorical draw."""


class SeededNoise:
    """A noise source whose every draw is a pure function of (seed, kind, canvas, step).

    Because no draw depends on how many draws came before, a run that stops a canvas
    early never shifts the stream of the next one, and any implementation that asks for
    the same (kind, canvas, step) gets the same numbers.
    """

    def __init__(self, seed: int = 0):
        # Checked here, not at the first draw: NumPy would refuse a negative seed late.
        seed = int(seed) if isinstance(seed, np.integer) else seed
        if seed is None or check_seed(seed) is None:
            raise ValueError("SeededNoise needs an integer seed from 0 to 2**64-1")
        self.seed = seed

    def _rng(self, kind: int, canvas_index: int, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, kind, int(canvas_index), int(step)])

    def init_canvas(self, canvas_index, shape, vocab_size):
        return self._rng(_INIT, canvas_index, 0).integers(
            0, vocab_size, size=tuple(shape), dtype=np.int64
        )

    def renoise(self, canvas_index, step, shape, vocab_size):
        return self._rng(_RENOISE, canvas_index, step).integers(
            0, vocab_size, size=tuple(shape), dtype=np.int64
        )

    def gumbel(self, canvas_index, step, shape):
        return self._rng(_GUMBEL, canvas_index, step).gumbel(size=tuple(shape)).astype(
            np.float32
        )


class KeyStream:
    """One sequence's own `mx.random` keys: `next()` splits the stream's key as the
    global generator splits its own at each draw, so a denoiser drawing with these keys
    (`key=`) gets, draw for draw, what `mx.random.seed(seed)` would give it, whatever
    other sequences draw meanwhile (a batch's rows each hold one)."""

    def __init__(self, seed: int):
        import mlx.core as mx  # here, not at the top: the torch path imports this module

        self._mx = mx
        self._key = mx.random.key(check_seed(seed))

    def next(self):
        self._key, sub = self._mx.random.split(self._key)
        return sub


"""The encoder's KV cache.

The encoder (causal) appends to it; the decoder (bidirectional denoiser) only reads
it. mlx-lm's KVCache/RotatingKVCache are not used because the decoder needs a
read-only view with the reference's exact window (a sliding layer shows the decoder
the last `sliding_window - 1` encoded tokens, as transformers' DynamicSlidingWindowLayer
keeps them), and chat needs snapshot/restore and trimming of sliding layers, which a
rotating buffer cannot give back once it has wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

_STEP = 256


@dataclass(frozen=True)
class CacheSnapshot:
    """What `EncoderCache.snapshot()` returns: immutable per-layer state to restore later."""

    offset: int
    layers: Tuple[Tuple[Optional[mx.array], Optional[mx.array], int], ...]


class LayerCache:
    """One layer's encoded keys and values, [batch, kv_heads, tokens, head_dim].

    Full-attention layers keep everything (in a buffer that grows geometrically, so a long
    chunked prefill copies O(n) rather than O(n^2)). Sliding layers keep the last
    `window - 1 + slack` tokens: `window - 1` is what attention can see, `slack` lets a
    chat trim back over a recent turn without re-encoding the whole conversation.
    """

    def __init__(self, window: Optional[int] = None, slack: int = 0):
        self.window = window
        self.keep = None if window is None else window - 1 + slack
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # tokens encoded so far
        self._len = 0  # valid entries in the buffer

    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    @property
    def retained(self) -> int:
        return self._len

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Appends new keys/values; returns retained + new for the encoder's attention."""
        n = keys.shape[2]
        if self.is_sliding:
            if self.keys is None:
                k, v = keys, values
            else:
                k = mx.concatenate([self.keys[:, :, : self._len], keys], axis=2)
                v = mx.concatenate([self.values[:, :, : self._len], values], axis=2)
            self.offset += n
            drop = max(0, k.shape[2] - self.keep)
            self.keys, self.values = k[:, :, drop:], v[:, :, drop:]
            self._len = self.keys.shape[2]
            return k, v

        needed = self._len + n
        if self.keys is None or needed > self.keys.shape[2]:
            capacity = max(needed, 2 * self._len)
            capacity = ((capacity + _STEP - 1) // _STEP) * _STEP
            B, H, _, D = keys.shape
            new_k = mx.zeros((B, H, capacity, D), keys.dtype)
            new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
            if self.keys is not None and self._len:
                new_k[:, :, : self._len] = self.keys[:, :, : self._len]
                new_v[:, :, : self._len] = self.values[:, :, : self._len]
            self.keys, self.values = new_k, new_v
        self.keys[:, :, self._len : needed] = keys
        self.values[:, :, self._len : needed] = values
        self._len = needed
        self.offset += n
        return self.keys[:, :, :needed], self.values[:, :, :needed]

    def view(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        """What the decoder reads: all of a full layer, the last window-1 of a sliding one."""
        if self.keys is None or self._len == 0:
            return None, None
        first = 0
        if self.is_sliding:
            first = max(0, self._len - (self.window - 1))
        return self.keys[:, :, first : self._len], self.values[:, :, first : self._len]

    def trim(self, n: int) -> None:
        if n <= 0:
            return
        if n > self.offset:
            raise ValueError(f"cannot trim {n} tokens from a cache holding {self.offset}")
        new_offset = self.offset - n
        if self.is_sliding:
            # After trimming, attention must still see min(new_offset, window-1) tokens.
            need = min(new_offset, self.window - 1)
            have = self._len - n
            if have < need:
                raise ValueError(
                    f"cannot trim {n} tokens: the sliding-window layers keep only "
                    f"{self._len - min(self._len, self.window - 1)} tokens beyond their window; "
                    "restore a snapshot or re-encode instead"
                )
            self._len = max(0, have)
            if self.keys is not None:
                self.keys = self.keys[:, :, : self._len]
                self.values = self.values[:, :, : self._len]
        else:
            self._len = new_offset
        self.offset = new_offset

    def state(self):
        if self.keys is None:
            return None, None, self.offset
        # Slices are new arrays: later in-place writes to the buffer do not reach them.
        return self.keys[:, :, : self._len], self.values[:, :, : self._len], self.offset

    def set_state(self, keys, values, offset) -> None:
        self.keys, self.values, self.offset = keys, values, offset
        self._len = 0 if keys is None else keys.shape[2]


class EncoderCache:
    """The per-layer caches of one sequence batch, plus the bookkeeping the drafter and
    chat need: how many tokens were encoded, trimming and snapshot/restore."""

    def __init__(self, layer_types: Sequence[str], sliding_window: int, slack: int = 0):
        self.layers: List[LayerCache] = [
            LayerCache(sliding_window if t == "sliding_attention" else None, slack)
            for t in layer_types
        ]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def offset(self) -> int:
        """Number of tokens encoded so far; the next canvas starts at this position."""
        return self.layers[0].offset if self.layers else 0

    def trim(self, n: int) -> int:
        """Forgets the last `n` encoded tokens; returns how many were trimmed."""
        n = min(n, self.offset)
        for c in self.layers:
            c.trim(n)
        return n

    def can_trim(self, n: int) -> bool:
        if n > self.offset:
            return False
        for c in self.layers:
            if c.is_sliding and c.retained - n < min(c.offset - n, c.window - 1):
                return False
        return True

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(self.offset, tuple(c.state() for c in self.layers))

    def restore(self, snap: CacheSnapshot) -> None:
        for c, s in zip(self.layers, snap.layers):
            c.set_state(*s)

    def state_arrays(self) -> List[mx.array]:
        """The arrays to evaluate after an encode."""
        out = []
        for c in self.layers:
            if c.keys is not None:
                out.extend([c.keys, c.values])
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state_arrays())

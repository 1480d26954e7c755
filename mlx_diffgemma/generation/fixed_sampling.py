"""The reference sampler's step with fixed canvas positions, in MLX (fixed.py says what
a fixed position is; `MLXDenoiser.sample` runs this instead of its own body only when
the canvas holds one)."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from .fixed import LOGIT_FLOOR, CanvasFixed
from .sampler import entropy_bound_accept, stable_and_confident, token_entropy


class DeviceFixed:
    """A canvas's fixed positions as device arrays: `mask` [1, C] bool, `tokens` [1, C]
    int32 (0 where open), `ban` [1, C] bool (open positions that may not take an EOS id,
    None when none may not) and the EOS ids `eos` [E]."""

    def __init__(self, cf: CanvasFixed, length: int):
        self.host = cf
        self.host_mask = cf.mask(length)
        self.mask = mx.array(self.host_mask[None])
        self.tokens = mx.array(cf.full_tokens(length)[None].astype(np.int32))
        ban = cf.ban_mask(length)
        self.ban = mx.array(ban[None]) if ban.any() else None
        self.eos = mx.array(np.array(cf.eos, dtype=np.int32))
        self.anchor: Optional[mx.array] = None  # an edit's renoise targets, -1: random

    def place(self, canvas: mx.array) -> mx.array:
        """`canvas` [1, C] with the fixed tokens at their places."""
        return mx.where(self.mask, self.tokens, canvas)

    def start(self, canvas: mx.array) -> mx.array:
        """The first canvas from the drawn one: fixed tokens placed, and for an edit its
        old tokens and anchors (CanvasFixed.begin)."""
        if self.host.start is None:
            return self.place(canvas)
        begun, anchor = self.host.begin(np.array(canvas)[0])
        self.anchor = mx.array(anchor[None].astype(np.int32))
        return mx.array(begun[None].astype(np.int32))


def ban_eos(processed: mx.array, f: DeviceFixed, idx: Optional[mx.array] = None) -> mx.array:
    """`processed` [1, A, V] with the EOS logits of the banned positions floored (`idx`:
    the canvas positions of its rows, when not the whole canvas). Touches only the EOS
    columns: [A, E], not a pass over the vocabulary."""
    if f.ban is None:
        return processed
    ban = f.ban if idx is None else f.ban[:, idx]
    cols = processed[:, :, f.eos]
    processed[:, :, f.eos] = mx.where(ban[..., None], mx.array(LOGIT_FLOOR, processed.dtype), cols)
    return processed


def sample_fixed(processed: mx.array, argmax: mx.array, sample: mx.array, fresh: mx.array,
                 f: DeviceFixed, gen, history):
    """The reference step's decisions with fixed positions, from the banned processed
    logits, their `argmax`, the categorical `sample` and the renoise ids `fresh`: fixed positions show and
    keep their token, sort last in acceptance (entropy inf), count as accepted, and the
    stop reads the open positions' mean entropy. Returns (next canvas, argmax, accepted
    or fixed, stop, history)."""
    argmax = f.place(argmax)
    if f.anchor is not None:
        fresh = mx.where(f.anchor >= 0, f.anchor, fresh)
    entropy = token_entropy(processed)
    open_entropy = mx.where(f.mask, mx.array(np.inf, dtype=mx.float32), entropy)
    accepted = entropy_bound_accept(open_entropy, gen.entropy_bound) & ~f.mask
    next_canvas = f.place(mx.where(accepted, sample, fresh))
    stop, history = stable_and_confident(argmax, history, entropy, gen.stability_threshold,
                                         gen.confidence_threshold, open=~f.mask)
    return next_canvas, argmax, accepted | f.mask, stop, history

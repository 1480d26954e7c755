"""Fixed canvas positions: tokens a generation holds at given places of its canvases.

`fixed={position: token_id}` counts positions from the first token of the first canvas
(position C is canvas 1's first). A fixed token sits in its canvas from the first step;
it is never resampled or renoised, counts as accepted, and is left out of acceptance and
out of the stop rule's mean entropy. Open positions before the last fixed position may
not take an EOS id: the EOS rule pads everything after the first EOS, which would write
over the fixed tokens after it.

This module imports no array framework: the MLX and torch denoisers read the same
checked, host-side description (`Fixed`, `CanvasFixed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

# What a banned logit is set to. Not -inf: the entropy's exp(l) * l would be 0 * -inf =
# NaN. Logits are soft-capped to +-30, so at the schedule's lowest temperature they stay
# within +-75: exp(-1e4 - logsumexp) is exactly 0 in float32 and no Gumbel draw lifts it.
LOGIT_FLOOR = -1e4


@dataclass(frozen=True)
class CanvasFixed:
    """What one canvas holds fixed, at canvas-local positions."""

    positions: np.ndarray  # int64 [F], sorted, in [0, C)
    tokens: np.ndarray  # int64 [F]
    eos_ban_until: int  # open positions before this may not take an EOS id (0: none)
    eos: tuple = ()  # the EOS ids the ban covers
    # An edit's old tokens (int64 [C], -1 where none): the canvas starts from them, but for
    # the `strength` fraction that starts as noise; the rest are anchored (see `begin`).
    start: Optional[np.ndarray] = None
    strength: float = 1.0

    def mask(self, length: int) -> np.ndarray:
        m = np.zeros(length, dtype=bool)
        m[self.positions] = True
        return m

    def full_tokens(self, length: int) -> np.ndarray:
        """int64 [length]: the fixed tokens at their places, 0 where open."""
        t = np.zeros(length, dtype=np.int64)
        t[self.positions] = self.tokens
        return t

    def ban_mask(self, length: int) -> np.ndarray:
        """bool [length]: the open positions that may not take an EOS id."""
        if not self.eos:
            return np.zeros(length, dtype=bool)
        return (np.arange(length) < self.eos_ban_until) & ~self.mask(length)

    def all_fixed(self, length: int) -> bool:
        return len(self.positions) == length

    def begin(self, init: np.ndarray):
        """(start canvas, anchors or None) from the drawn init canvas `init` [C]: fixed
        tokens in place and, for an edit, the old tokens at the positions that do not start
        as noise. Those are the round(strength x n) old positions whose init ids are the
        smallest (a choice made from the same draw, so every backend makes it alike under
        a shared noise source). Anchored positions, when renoised, go back to their old
        token instead of a random one: the reference renoises every unaccepted position at
        every step, so a start alone would be forgotten after the first step."""
        canvas = np.array(init, dtype=np.int64).reshape(-1)
        anchor = None
        if self.start is not None:
            old = np.nonzero(self.start >= 0)[0]
            noised = old[np.argsort(canvas[old], kind="stable")[: int(round(self.strength * len(old)))]]
            keep = np.setdiff1d(old, noised)
            anchor = np.full(len(canvas), -1, dtype=np.int64)
            anchor[keep] = self.start[keep]
            canvas[keep] = self.start[keep]
        canvas[self.positions] = self.tokens
        return canvas, anchor


@dataclass(frozen=True)
class Fixed:
    """Checked fixed positions of one generation, counted from its first canvas."""

    tokens: Dict[int, int]
    canvas_length: int
    eos: tuple = ()
    start: Optional[Dict[int, int]] = None  # an edit's old tokens by position (see CanvasFixed)
    strength: float = 1.0

    @property
    def last(self) -> int:
        return max(self.tokens) if self.tokens else -1

    def canvases(self) -> int:
        """Canvases up to the one holding the last fixed position."""
        return self.last // self.canvas_length + 1 if self.tokens else 0

    def canvas(self, k: int) -> Optional[CanvasFixed]:
        """Canvas `k`'s part, or None when it is unconstrained (no fixed position in it
        or after it)."""
        C = self.canvas_length
        starts = {p - k * C: t for p, t in (self.start or {}).items() if k * C <= p < (k + 1) * C}
        if (not self.tokens or k * C > self.last) and not starts:
            return None
        local = sorted((p - k * C, t) for p, t in self.tokens.items() if k * C <= p < (k + 1) * C)
        positions = np.array([p for p, _ in local], dtype=np.int64)
        tokens = np.array([t for _, t in local], dtype=np.int64)
        ban_until = C if self.last >= (k + 1) * C else int(positions[-1]) if len(positions) else 0
        start = None
        if starts:
            start = np.full(C, -1, dtype=np.int64)
            start[list(starts)] = list(starts.values())
        return CanvasFixed(positions, tokens, ban_until, self.eos, start, self.strength)


def check_fixed(fixed, *, canvas_length: int, max_new_tokens: int, vocab_size: int,
                eos_token_id: Optional[Sequence[int]], pad_token_id: int) -> Optional[Fixed]:
    """`fixed` ({position: token_id}) checked against the generation it belongs to; None
    when nothing is fixed (the loop then runs exactly as without the argument)."""
    if fixed is None:
        return None
    if not isinstance(fixed, Mapping):
        raise ValueError("fixed positions need a map {position: token_id} of token ids "
                         f"(got {type(fixed).__name__})")
    tokens: Dict[int, int] = {}
    for p, t in fixed.items():
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p < max_new_tokens:
            raise ValueError(
                f"fixed position {p!r} is outside the {max_new_tokens} positions "
                f"max_new_tokens={max_new_tokens} allows (counted from 0 at the first canvas); "
                "raise max_new_tokens or move the position")
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size:
            raise ValueError(f"fixed token {t!r} at position {p} is outside the vocabulary "
                             f"(0..{vocab_size - 1})")
        tokens[int(p)] = int(t)
    eos = tuple(sorted(set(int(e) for e in (eos_token_id or []))))
    fixed_eos = sorted(p for p, t in tokens.items() if t in eos)
    if fixed_eos:
        after = [p for p in sorted(tokens) if p > fixed_eos[0] and tokens[p] != pad_token_id]
        if after:
            raise ValueError(
                f"fixed position {fixed_eos[0]} holds an EOS id ({tokens[fixed_eos[0]]}) but "
                f"position {after[0]} after it holds {tokens[after[0]]}: the EOS rule pads "
                f"everything after the first EOS; fix only pad ({pad_token_id}) after an EOS")
    return Fixed(tokens, canvas_length, eos)

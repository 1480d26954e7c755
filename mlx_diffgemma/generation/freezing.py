"""Fast mode's freezing policy: which canvas positions stop changing, and when a frozen
one is re-opened (fast.py's denoiser asks it once per step).

Freezing is what saves the steps, and what gives up the reference sampler's
self-correction: the reference renoises every unaccepted position at every step, so a
wrong early guess is undone, while a frozen position kept its token for good. Here a
frozen position is re-opened when the model turns against it, as remasking samplers for
diffusion LMs do (ReMDM; RemeDi; "Remask, Don't Replace"; WINO's wide-in, narrow-out
verification). Without the active set the decoder computes every position at every step,
so a frozen token's current probability costs nothing to read. The rules (`FastOptions`
switches, each measured alone in the benchmarks):

- `revoke_floor`: a frozen position whose token's probability falls below the floor
  re-opens.
- `revoke_margin`: a frozen position whose argmax is now another token, more probable
  than its own by at least the margin, re-opens.
- `reopen_noise`: a re-opened position restarts from a fresh random token, as the
  reference renoises what it rejects ("remask, don't replace"): fed its own token or its
  argmax, the model mostly copies it back.
- `hold`: a position freezes only once its argmax has been the same for `hold` steps.
- `adapt`: per canvas, every re-open multiplies the gap between the confidence threshold
  and 1 by this factor: a canvas that proved its early freezes wrong freezes more
  cautiously for the rest of it.
- `final_pass`: when every position is frozen, the positions frozen with less confidence
  than this re-open to fresh noise once, and the step after commits (a last pass before
  the commit).
- `floor_decay`: each re-open of a position multiplies the gap between its floor and 1 by
  this, so a position the model keeps just under the floor stops churning.
- `max_reopens`: a position re-opens at most this many times per canvas.
- `verify_noise`: a position frozen while others are still open is fed fresh noise at
  the next step and stays frozen only if the model, no longer shown it, predicts it again
  with at least this probability (WINO's verify step).
- `doubt`: when nothing open is confident enough, the positions frozen below the floor
  re-open to noise instead of a forced guess, once per canvas.

The state is host-side NumPy (one entry per canvas position): the decisions are per
position and cheap, and the drafter reads the canvas each step anyway.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


class Freezing:
    """Which positions of one canvas are frozen, with what tokens, and why they may
    re-open. `options` is a `FastOptions` with a freeze rule."""

    def __init__(self, options, length: int, eos: np.ndarray, pad: int):
        self.o = options
        self.length = length
        self._eos, self._pad = eos, pad
        self.frozen = np.zeros(length, dtype=bool)
        self.tokens = np.zeros(length, dtype=np.int64)  # the frozen positions' tokens
        self.threshold = options.confidence  # this canvas's, raised by `adapt`
        self.reopened = np.zeros(length, dtype=bool)  # re-opened by the last update
        self.noised = np.zeros(length, dtype=bool)  # of those, the ones to restart from noise
        self.reopens = 0  # re-opens in this canvas
        self._reopens = np.zeros(length, dtype=np.int64)  # per position
        self._confidence = np.zeros(length)  # each frozen position's confidence when frozen
        self._held = np.zeros(length, dtype=np.int64)  # steps the argmax has held
        self._last = np.full(length, -1, dtype=np.int64)
        self._as_pad = np.zeros(length, dtype=bool)  # frozen as pad after a frozen EOS
        self.probation = np.zeros(length, dtype=bool)  # frozen last step, fed noise this one
        self.verified = np.zeros(length, dtype=bool)  # passed that check in the last update
        self._doubted = False
        self._final = "due" if options.final_pass > 0 else "done"  # due -> running -> done
        self.fixed = np.zeros(length, dtype=bool)  # given tokens (fixed.py): never re-opened

    def hold_fixed(self, mask: np.ndarray, tokens: np.ndarray) -> None:
        """Freezes the fixed positions `mask` with their `tokens` (canvas-long), for good."""
        self.fixed = mask.copy()
        self.frozen |= mask
        self.tokens[mask] = tokens[mask]

    # -- one step -----------------------------------------------------------------------

    def update(self, computed: np.ndarray, argmax: np.ndarray, confidence: np.ndarray,
               token_prob: Optional[np.ndarray], step: int, accepted: Optional[np.ndarray] = None,
               sample: Optional[np.ndarray] = None) -> np.ndarray:
        """One step's decisions from the positions `computed` (bool over the canvas):
        their `argmax`, its probability `confidence` and each frozen token's probability
        `token_prob` (canvas-long; only computed entries are read; None when no rule
        reads it). The entropy rule freezes the `accepted` positions with their `sample`.
        Re-opens, then freezes; on the last step (`step == 1`, or the step after the
        final pass) everything freezes. Returns the positions frozen by this call."""
        before = self.frozen.copy()
        self._track(computed, argmax)
        self.reopened = np.zeros(self.length, dtype=bool)
        self.noised = np.zeros(self.length, dtype=bool)
        last = step == 1 or self._final == "running"
        on_probation, self.probation = self.probation & computed, np.zeros(self.length, dtype=bool)
        if token_prob is not None:
            self._revoke(computed & ~on_probation, argmax, confidence, token_prob)
            if on_probation.any():
                failed = on_probation & self.frozen & ((argmax != self.tokens) | (token_prob < self.o.verify_noise))
                if failed.any():
                    self._reopen(failed, noise=self.o.reopen_noise)
        self.verified = on_probation & self.frozen
        if self.o.freeze == "entropy":
            pick = accepted & ~self.frozen & (self._held >= self.o.hold)
            self.tokens[pick] = sample[pick]
        else:
            pick = self._confident(computed, confidence, last)
            self.tokens[pick] = argmax[pick]
        if last:
            rest = ~self.frozen & ~pick
            self.tokens[rest] = argmax[rest]
            pick |= rest
            self._final = "done"
        self.frozen |= pick
        self._confidence[pick] = confidence[pick]
        if self.o.verify_noise is not None and not last:
            self.probation = pick.copy()
        self._pad_after_frozen_eos()
        if self.frozen.all() and self._final == "due":
            self._final_pass(computed)
        return self.frozen & ~before

    def _track(self, computed: np.ndarray, argmax: np.ndarray) -> None:
        """How many steps in a row each computed position's argmax has been the same."""
        same = computed & (argmax == self._last)
        self._held = np.where(computed, np.where(same, self._held + 1, 1), self._held)
        self._last = np.where(computed, argmax, self._last)

    def _revoke(self, computed, argmax, confidence, token_prob) -> None:
        o = self.o
        bad = np.zeros(self.length, dtype=bool)
        if o.revoke_floor > 0:
            floor = 1 - (1 - o.revoke_floor) * o.floor_decay ** self._reopens
            bad |= token_prob < floor
        if o.revoke_margin is not None:
            bad |= (argmax != self.tokens) & (confidence - token_prob >= o.revoke_margin)
        bad &= self.frozen & computed & ~self._padded() & ~self.fixed
        if o.max_reopens:
            bad &= self._reopens < o.max_reopens
        if bad.any():
            self._reopen(bad, noise=o.reopen_noise)

    def _reopen(self, which: np.ndarray, noise: bool) -> None:
        which = which & ~self.fixed  # whatever the rule, a given token stays
        if (which & self.frozen & np.isin(self.tokens, self._eos)).any():
            which = which | self._as_pad  # the pad an EOS brought goes with it
            self._as_pad[:] = False
        self.frozen &= ~which
        self.reopened |= which
        if noise:
            self.noised |= which
        self._held[which] = 0  # it earns its `hold` again
        self._reopens[which] += 1
        n = int(which.sum())
        self.reopens += n
        if self.o.adapt < 1:
            self.threshold = 1 - (1 - self.threshold) * self.o.adapt ** n

    def _confident(self, computed: np.ndarray, confidence: np.ndarray, last: bool = False) -> np.ndarray:
        """Open positions confident enough (and held long enough) to freeze; at least the
        most confident one of those that held, so every step makes progress."""
        ready = computed & ~self.frozen & (self._held >= self.o.hold)  # a re-opened one: 0
        conf = np.where(ready, confidence, -1.0)
        pick = conf >= self.threshold
        if not pick.any() and ready.any():
            if self.o.doubt and not last and not self._doubted and conf.max() < self.o.doubt:
                floor = max(self.o.revoke_floor, self.o.confidence)
                unsure = self.frozen & (self._confidence < floor) & ~self._padded() & ~self.fixed
                self._doubted = True
                if unsure.any():
                    self._reopen(unsure, noise=True)
                    return pick
            pick[int(conf.argmax())] = True
        return pick

    def _final_pass(self, computed: np.ndarray) -> None:
        """Once per canvas, before the commit: the positions frozen with the least
        confidence re-open to fresh noise, and the next step commits."""
        which = computed & (self._confidence < self.o.final_pass) & ~self._padded() & ~self.fixed
        if not which.any():
            self._final = "done"
            return
        self._reopen(which, noise=True)
        self._final = "running"

    # -- EOS ----------------------------------------------------------------------------

    def _padded(self) -> np.ndarray:
        """Positions after the first frozen EOS: the EOS rule pads them at the commit, so
        they are never re-opened (unless their EOS is)."""
        hits = np.nonzero(self.frozen & np.isin(self.tokens, self._eos))[0] if len(self._eos) else []
        if not len(hits):
            return np.zeros(self.length, dtype=bool)
        return np.arange(self.length) > hits[0]

    def _pad_after_frozen_eos(self) -> None:
        """With `skip_after_eos`: every open position after a frozen EOS is frozen as pad
        (and re-opens with its EOS)."""
        if not self.o.skip_after_eos:
            return
        after = self._padded() & ~self.frozen
        self.tokens[after] = self._pad
        self.frozen |= after
        self._as_pad |= after

"""Fast mode: the same drafter loop with a denoiser that does less work per step.

Each approximation is a switch of `FastOptions`, measured alone in the benchmarks; with
every switch off (`FastOptions.off()`) the fast denoiser runs the reference's operations
and gives reference mode's tokens.

- `freeze`: positions that settle stop changing. "confidence" (Fast-dLLM, Diffusers'
  BlockRefinement, mlx-vlm's default): open positions whose argmax has probability at
  least `confidence` (at temperature 1 unless `confidence_at_t1` is off) are frozen with
  it, at least the most confident one per step, every one at the last step; "entropy":
  the positions the entropy bound accepts keep their sampled token. Open positions carry
  their argmax to the next step (`renoise=True`: they are sampled, accepted and renoised
  as the reference does). A canvas whose positions are all frozen is committed:
  the last forward's argmax wherever it computed (`commit_argmax`), the frozen tokens
  being its input, else the frozen tokens.
- Self-correction (freezing.py): a frozen position re-opens when the model turns
  against it (`revoke_floor`, `revoke_margin`), restarting from noise (`reopen_noise`);
  `hold`, `adapt` and `final_pass` are further rules, off by default.
  `FastOptions.irrevocable()` turns them all off (frozen for good).
- `active_set` (with freezing): the decoder runs only the open positions and those frozen
  at the previous step (once more, so their keys and values reflect their final token);
  every other frozen position keeps, per layer, the keys and values of the last step
  that computed it. The number of computed positions is rounded up to a bucket so a
  Metal kernel cache sees few shapes. Exactness returns at the commit: the encoder
  re-encodes the committed canvas. `refresh_every` N: after N active-set steps, one step
  computes every position again, refreshing the stale keys and values.
- `top_k`: sampling, argmax and entropy over the exact top-K logits (renormalised);
  the confidence rule still uses the full softmax.
- `sc_top_k`: self-conditioning from the top-K probabilities of the full softmax times
  the gathered embedding rows (a quantized table is dequantized row by row), NOT
  renormalised: the soft embedding then differs from the dense product by at most the
  dropped probability mass times the largest embedding row norm (times sqrt(hidden)),
  which `sparse_soft_embedding_bound` gives and the tests hold.
- `skip_after_eos`: once an EOS is frozen, every position after it is frozen as pad (the
  EOS rule pads them at the commit anyway) and never computed again.
- `repair`: one full, fresh forward of the final canvas before the commit, whose argmax
  is committed.
- `self_conditioning=False`: the decoder never sees the previous step's logits (as
  mlx-vlm's confidence sampler runs).

Work is counted per step (`FastDenoiser.work`): positions run through the layers, LM-head
rows, and self-conditioning rows times the vocabulary entries they read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..models.config import GenerationConfig
from .denoiser import MLXDenoiser
from .fixed_sampling import ban_eos
from .freezing import Freezing
from .noise import KeyStream, NoiseSource
from .sampler import entropy_bound_accept, stable_and_confident, token_entropy

FREEZE_RULES = (None, "entropy", "confidence")


@dataclass(frozen=True)
class FastOptions:
    # Freezing 0.9-confident argmaxes (temperature 1), open positions carrying their
    # argmax, is what saves the steps (BENCHMARKS.md, "Fast mode").
    freeze: Optional[str] = "confidence"
    confidence: float = 0.9
    # Off by default (not in the tuning grid; its cost in accuracy and its saving at
    # 26B-A4B are in BENCHMARKS.md, "Fast mode"); the lever for a 256-token canvas, where
    # most positions freeze early.
    active_set: bool = False
    # With the active set: after this many active-set steps one step computes every
    # position again, refreshing frozen positions' stale keys and values (0: never; the
    # periodic refresh of dLLM-Cache).
    refresh_every: int = 0
    top_k: int = 64
    sc_top_k: int = 64
    skip_after_eos: bool = True
    repair: bool = False
    # Self-correction (freezing.py): a frozen position re-opens when the model turns
    # against it. Defaults picked on the toys' tuning split (scripts/tune_fast.py): the
    # 0.99 floor with re-opening to noise bought toy-sudoku-open's accuracy back for a
    # few more steps per canvas (BENCHMARKS.md, "Fast mode"); the other rules did not
    # add accuracy there. The newer rules (floor_decay .. forget_sc) stay off: the best
    # of them on the tuning split did worse on held-out puzzles (BENCHMARKS.md).
    revoke_floor: float = 0.99  # re-open a frozen token whose probability falls below this (0: never)
    revoke_margin: Optional[float] = None  # re-open one whose argmax beats it by this probability (None: never)
    reopen_noise: bool = True  # a re-opened position restarts from a random token, not its argmax
    hold: int = 1  # freeze only once the argmax has held this many steps in a row
    adapt: float = 1.0  # per canvas, each re-open multiplies (1 - confidence) by this (1: fixed)
    final_pass: float = 0.0  # all frozen: those frozen below this confidence re-open once (0: never)
    floor_decay: float = 1.0  # each re-open of a position multiplies its (1 - revoke_floor) by this
    max_reopens: int = 0  # a position re-opens at most this many times per canvas (0: no cap)
    verify_noise: Optional[float] = None  # a new freeze is fed noise next step; kept if re-predicted at >= this
    doubt: float = 0.0  # a forced freeze below this confidence re-opens the unsure freezes instead, once
    forget_sc: bool = False  # a position restarted from noise also loses its self-conditioning
    renoise: bool = False  # True: open positions are sampled or renoised as the reference does
    self_conditioning: bool = True  # False: the decoder never sees the previous step
    confidence_at_t1: bool = True  # the confidence rule at temperature 1, not the schedule's
    commit_argmax: bool = True  # commit the last forward's argmax where it was computed
    buckets: Tuple[int, ...] = (8, 16, 32, 64, 128, 256)  # capped at the canvas length

    def __post_init__(self):
        if self.freeze not in FREEZE_RULES:
            raise ValueError(f"freeze must be one of {FREEZE_RULES} (got {self.freeze!r})")
        if self.active_set and self.freeze is None:
            raise ValueError("the active set needs a freeze rule: without one no position settles")
        if not 0 < self.confidence <= 1:
            raise ValueError(f"confidence must be in (0, 1] (got {self.confidence})")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (got {self.refresh_every})")
        if self.top_k < 0 or self.sc_top_k < 0:
            raise ValueError("top_k and sc_top_k must be >= 0 (0: the whole vocabulary)")
        if self.hold < 1:
            raise ValueError(f"hold must be >= 1 step (got {self.hold})")
        if not 0 <= self.revoke_floor < 1 or not 0 <= self.final_pass <= 1:
            raise ValueError("revoke_floor must be in [0, 1) and final_pass in [0, 1] "
                             f"(got {self.revoke_floor}, {self.final_pass})")
        if self.revoke_margin is not None and not 0 <= self.revoke_margin <= 1:
            raise ValueError(f"revoke_margin must be in [0, 1] or None (got {self.revoke_margin})")
        if self.forget_sc and not self.sc_top_k:
            raise ValueError("forget_sc needs sparse self-conditioning (sc_top_k > 0)")
        if not 0 < self.adapt <= 1:
            raise ValueError(f"adapt must be in (0, 1] (got {self.adapt})")
        if self.floor_decay < 1 or self.max_reopens < 0 or not 0 <= self.doubt <= 1:
            raise ValueError("floor_decay must be >= 1, max_reopens >= 0 and doubt in [0, 1] "
                             f"(got {self.floor_decay}, {self.max_reopens}, {self.doubt})")
        if self.verify_noise is not None and not 0 <= self.verify_noise <= 1:
            raise ValueError(f"verify_noise must be in [0, 1] or None (got {self.verify_noise})")

    @classmethod
    def off(cls) -> "FastOptions":
        """Every approximation off: reference mode's operations."""
        return cls(freeze=None, active_set=False, top_k=0, sc_top_k=0, skip_after_eos=False,
                   commit_argmax=False, renoise=True, **IRREVOCABLE)

    def irrevocable(self) -> "FastOptions":
        """These options with every self-correction rule off: a frozen position keeps its
        token for good (fast mode as it was before re-opening)."""
        return replace(self, **IRREVOCABLE)

    @property
    def revocable(self) -> bool:
        return self.revoke_floor > 0 or self.revoke_margin is not None or self.verify_noise is not None


# The self-correction switches, off.
IRREVOCABLE = dict(revoke_floor=0.0, revoke_margin=None, reopen_noise=False, hold=1, adapt=1.0,
                   final_pass=0.0, floor_decay=1.0, max_reopens=0, verify_noise=None, doubt=0.0,
                   forget_sc=False)


@dataclass
class Work:
    """What the decoder computed, summed over steps."""

    steps: int = 0
    positions: int = 0  # canvas positions run through the layers
    lm_head_rows: int = 0  # rows of the [hidden x vocab] LM head
    sc_rows: int = 0  # positions whose input carried self-conditioning
    sc_entries: int = 0  # probabilities x embedding rows in self-conditioning
    per_step: List[int] = field(default_factory=list)  # positions computed at each step


def bucket(n: int, buckets: Tuple[int, ...], limit: int) -> int:
    """`n` rounded up to the first bucket that holds it (never past `limit`)."""
    for b in buckets:
        if n <= b:
            return min(b, limit)
    return limit


def sample_top_k(processed: mx.array, g: mx.array, k: int):
    """(argmax, Gumbel-max sample with noise `g`, entropy, largest logit) over the exact
    top-`k` of the processed logits (renormalised there); the whole vocabulary when `k`
    is 0 or covers it."""
    if not k or k >= processed.shape[-1]:
        argmax = mx.argmax(processed, axis=-1).astype(mx.int32)
        sample = mx.argmax(processed + g, axis=-1).astype(mx.int32)
        return argmax, sample, token_entropy(processed), processed.max(axis=-1)
    ids = mx.argpartition(-processed, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(processed, ids, axis=-1)
    argmax = mx.take_along_axis(ids, mx.argmax(vals, axis=-1)[..., None], axis=-1)[..., 0]
    gk = mx.take_along_axis(g, ids, axis=-1)
    sample = mx.take_along_axis(ids, mx.argmax(vals + gk, axis=-1)[..., None], axis=-1)[..., 0]
    return argmax.astype(mx.int32), sample.astype(mx.int32), token_entropy(vals), vals.max(axis=-1)


def top_k_probabilities(processed: mx.array, k: int) -> Tuple[mx.array, mx.array]:
    """(probabilities, ids) of the top `k` tokens of the full softmax: sparse
    self-conditioning's input (not renormalised)."""
    probs = mx.softmax(processed.astype(mx.float32), axis=-1)
    ids = mx.argpartition(-probs, kth=min(k, probs.shape[-1]) - 1, axis=-1)[..., :k]
    return mx.take_along_axis(probs, ids, axis=-1), ids


def sparse_soft_embedding_bound(embed_weight: mx.array, probs: mx.array, ids: mx.array,
                                scale: float) -> mx.array:
    """Per position, the bound on |dense - sparse| (L2): the dropped probability mass
    times the largest embedding row norm times `scale`."""
    dropped = 1.0 - probs.astype(mx.float32).sum(axis=-1)
    max_norm = mx.sqrt((embed_weight.astype(mx.float32) ** 2).sum(axis=-1)).max()
    return mx.maximum(dropped, 0.0) * max_norm * scale


class FastDenoiser(MLXDenoiser):
    """`MLXDenoiser` with the approximations of `FastOptions`; the drafter loop drives it
    unchanged (`stream_generate(..., mode="fast")`)."""

    def __init__(self, model, gen: GenerationConfig, cache=None,
                 noise: Optional[NoiseSource] = None, options: Optional[FastOptions] = None,
                 keys: Optional[KeyStream] = None):
        super().__init__(model, gen, cache=cache, noise=noise, keys=keys)
        self.options = options if options is not None else FastOptions()
        self.work = Work()
        eos = gen.eos_token_id or []
        self._eos = np.array(sorted(set(int(e) for e in eos)), dtype=np.int64)

    # -- per canvas -----------------------------------------------------------------

    def start_canvas(self, canvas_index: int, fixed=None) -> mx.array:
        canvas = super().start_canvas(canvas_index, fixed)
        C = self.canvas_length
        # Host-side: which positions are frozen, with what tokens, and when they re-open.
        self.freezing = Freezing(self.options, C, self._eos, self.gen.pad_token_id)
        if fixed is not None:  # frozen from the start, for good (never re-opened)
            self.freezing.hold_fixed(fixed.mask(C), fixed.full_tokens(C))
        self._refresh = np.zeros(C, dtype=bool)  # frozen last step: computed once more
        self._kv: Optional[List[Tuple[mx.array, mx.array]]] = None
        self._since_full = 0  # steps since the last step that computed every position
        self._sc_sparse: Optional[Tuple[mx.array, mx.array]] = None  # ([1,C,K] probs, ids)
        self._argmax_all = mx.zeros((1, C), dtype=mx.int32)
        self._entropy_all = mx.zeros((1, C), dtype=mx.float32)
        return canvas

    def _positions(self) -> np.ndarray:
        """Canvas positions this step computes (sorted), padded to a bucket with frozen
        positions (harmless: their decisions stay frozen)."""
        C = self.canvas_length
        o = self.options
        if not o.active_set or self._kv is None or (o.refresh_every and self._since_full >= o.refresh_every):
            return np.arange(C)
        need = np.nonzero(~self.freezing.frozen | self._refresh)[0]
        size = bucket(max(len(need), 1), o.buckets, C)
        if size > len(need):
            spare = np.setdiff1d(np.arange(C), need)[: size - len(need)]
            need = np.sort(np.concatenate([need, spare]))
        return need

    # -- the step ---------------------------------------------------------------------

    def step(self, canvas: mx.array, canvas_index: int, step: int):
        pos = self._positions()
        idx = mx.array(pos.astype(np.int32))
        logits = self._logits(canvas, pos, idx)
        processed = self.scaled(logits, step)
        del logits
        return self.decide(processed, canvas, canvas_index, step, pos, idx)

    @property
    def batchable(self) -> bool:
        # The active set computes a few positions against key and value buffers of its own.
        return not self.options.active_set

    def decoder_input(self, canvas: mx.array) -> mx.array:
        sparse = bool(self.options.sc_top_k)
        return self.model.decoder_input(canvas, None if sparse else self._sc_logits,
                                        self._sc_sparse if sparse else None)

    def decide(self, processed: mx.array, canvas: mx.array, canvas_index: int, step: int,
               pos: Optional[np.ndarray] = None, idx: Optional[mx.array] = None):
        """The step's decisions on the processed logits of the positions `pos` (default:
        the whole canvas, as a batched forward computes it)."""
        if pos is None:
            pos = np.arange(self.canvas_length)
            idx = mx.array(pos.astype(np.int32))
        self._since_full = 0 if len(pos) == self.canvas_length else self._since_full + 1
        if self._fixed is not None:  # before the top-K, which a banned EOS could enter
            processed = ban_eos(processed, self._fixed, None if len(pos) == self.canvas_length else idx)
        self._count(len(pos))
        return self._decide(processed, canvas, pos, idx, canvas_index, step)

    def _logits(self, canvas: mx.array, pos: np.ndarray, idx: mx.array) -> mx.array:
        """Float32 logits [1, A, V] of the positions `pos`."""
        o = self.options
        full = len(pos) == self.canvas_length
        if not o.active_set and not o.sc_top_k:
            return self.model.decode(canvas, self.cache, self._sc_logits)
        ids = canvas if full else canvas[:, idx]
        return self.model.forward_positions(ids, idx, self.canvas_length, self.cache, self._kv_buffers(),
                                            sc_logits=self._sc_rows(idx, full), sc_sparse=self._sc_sparse_rows(idx))

    def _kv_buffers(self) -> List[Tuple[mx.array, mx.array]]:
        if self._kv is None:
            self._kv = [None] * len(self.model.layers)
        return self._kv

    def _sc_rows(self, idx: mx.array, full: bool):
        if self.options.sc_top_k or self._sc_logits is None:
            return None
        return self._sc_logits if full else self._sc_logits[:, idx]

    def _sc_sparse_rows(self, idx: mx.array):
        if not self.options.sc_top_k or self._sc_sparse is None:
            return None
        probs, ids = self._sc_sparse
        return probs[:, idx], ids[:, idx]

    def _count(self, n: int) -> None:
        w = self.work
        w.steps += 1
        w.positions += n
        w.lm_head_rows += n
        if self._sc_logits is not None or self._sc_sparse is not None:
            w.sc_rows += n
            w.sc_entries += n * (self.options.sc_top_k or self.vocab_size)
        w.per_step.append(n)

    def _decide(self, processed: mx.array, canvas: mx.array, pos: np.ndarray, idx: mx.array,
                canvas_index: int, step: int):
        """The sampler on the computed positions, then freezing, renoising and the stop."""
        o, gen, fz = self.options, self.gen, self.freezing
        argmax, sample, entropy, confidence, token_prob = self._sample(processed, idx, canvas_index, step)
        full = len(pos) == self.canvas_length
        self._argmax_all = argmax if full else _put(self._argmax_all, idx, argmax)
        self._entropy_all = entropy if full else _put(self._entropy_all, idx, entropy)
        self._keep_self_conditioning(processed, idx, full)

        # Acceptance over the open positions only (frozen ones sort last).
        frozen = mx.array(fz.frozen[None])
        open_entropy = mx.where(frozen, mx.array(np.inf, dtype=mx.float32), self._entropy_all)
        accepted = entropy_bound_accept(open_entropy, gen.entropy_bound) & ~frozen
        sample_all = sample if full else _put(canvas, idx, sample)
        fresh = self._fresh(canvas, canvas_index, step) if o.renoise else None
        next_canvas = mx.where(accepted, sample_all, fresh) if o.renoise else self._argmax_all

        newly = self._freeze(pos, accepted, sample_all, confidence, token_prob, step)
        if fz.noised.any() or fz.probation.any():  # noise, as the reference renoises what it rejects
            fresh = fresh if fresh is not None else self._fresh(canvas, canvas_index, step)
            next_canvas = mx.where(mx.array(fz.noised[None]), fresh, next_canvas)
        tokens = mx.array(fz.tokens[None].astype(np.int32))
        frozen_now = mx.array(fz.frozen[None])
        next_canvas = mx.where(frozen_now, tokens, next_canvas)
        if fz.probation.any():  # verified under noise: the model re-predicts them unseen
            next_canvas = mx.where(mx.array(fz.probation[None]), fresh, next_canvas)
        if o.forget_sc and self._sc_sparse is not None and (fz.noised | fz.probation).any():
            keep_sc = mx.array(~(fz.noised | fz.probation)[None, :, None])
            self._sc_sparse = (self._sc_sparse[0] * keep_sc, self._sc_sparse[1])
        # The canvas shown and committed: the model's argmax wherever this step computed it
        # (the frozen tokens are its input, as in Fast-dLLM); frozen tokens elsewhere.
        keep = fz.frozen.copy()
        if o.commit_argmax:
            keep[pos] = False
        keep |= fz.fixed
        argmax_out = mx.where(mx.array(keep[None]), tokens, self._argmax_all)
        if o.freeze is not None and fz.frozen.all():
            stop = mx.array([True])
        else:
            stop, self._history = stable_and_confident(
                argmax_out, self._history, self._entropy_all, gen.stability_threshold,
                gen.confidence_threshold, open=None if self._fixed is None else ~self._fixed.mask)
        # Computed once more: the new freezes, and (verify_noise) those that passed their
        # check, whose keys and values so far come from the noise they were fed.
        self._refresh = newly | fz.verified
        stop_now = bool(stop.all().item()) or step == 1
        if o.repair and stop_now:
            argmax_out = self._repair(argmax_out)
            if self._fixed is not None:
                argmax_out = self._fixed.place(argmax_out)
        mx.eval(next_canvas, argmax_out, accepted)
        shown = accepted | frozen_now
        return next_canvas, argmax_out[0], shown[0], bool(stop.all().item())

    def _sample(self, processed: mx.array, idx: mx.array, canvas_index: int, step: int):
        """(argmax, sample, entropy, top probability, each frozen token's probability or
        None) of the computed positions."""
        g = self._gumbel(processed.shape, idx, canvas_index, step)
        argmax, sample, entropy, top = sample_top_k(processed, g, self.options.top_k)
        # The confidence rule reads the model's own probability (temperature 1): at the
        # schedule's 0.4-0.8 every position looks surer than the model is.
        scale = self.gen.temperature(step) if self.options.confidence_at_t1 else 1.0
        peak = processed.max(axis=-1)
        lse = mx.logsumexp((processed - peak[..., None]) * scale, axis=-1)
        confidence = mx.exp((top - peak) * scale - lse)
        token_prob = None
        if self.options.revocable and self.freezing.frozen.any():
            # Free to read: the decoder computed these rows anyway.
            tok = mx.array(self.freezing.tokens[np.array(idx)].astype(np.int32))[None, :, None]
            own = mx.take_along_axis(processed, tok, axis=-1)[..., 0]
            token_prob = mx.exp((own - peak) * scale - lse)
        return argmax, sample, entropy, confidence, token_prob

    def _gumbel(self, shape, idx: mx.array, canvas_index: int, step: int) -> mx.array:
        if self.noise is not None:
            C, V = self.canvas_length, self.vocab_size
            g = mx.array(self.noise.gumbel(canvas_index, step, (1, C, V)))
            return g if shape[1] == C else g[:, idx]
        return mx.random.gumbel(shape=shape, key=self.key())

    def _fresh(self, canvas: mx.array, canvas_index: int, step: int) -> mx.array:
        if self.noise is not None:
            return mx.array(self.noise.renoise(canvas_index, step, canvas.shape, self.vocab_size).astype(np.int32))
        return mx.random.randint(0, self.vocab_size, canvas.shape, dtype=mx.int32, key=self.key())

    def _keep_self_conditioning(self, processed: mx.array, idx: mx.array, full: bool) -> None:
        """What the next step's self-conditioning reads: the processed logits (cast to the
        embedding dtype, as the reference feeds them back), or their top-K probabilities."""
        if not self.options.self_conditioning:
            return
        k = self.options.sc_top_k
        if k:
            p, ids = top_k_probabilities(processed, k)
            if full or self._sc_sparse is None:
                self._sc_sparse = (p, ids)
            else:
                self._sc_sparse = (_put(self._sc_sparse[0], idx, p), _put(self._sc_sparse[1], idx, ids))
            mx.eval(*self._sc_sparse)
            return
        sc = processed.astype(self.model.dtype)
        self._sc_logits = sc if full or self._sc_logits is None else _put(self._sc_logits, idx, sc)
        mx.eval(self._sc_logits)

    def _freeze(self, pos: np.ndarray, accepted: mx.array, sample: mx.array, confidence: mx.array,
                token_prob: Optional[mx.array], step: int) -> np.ndarray:
        """The freezing policy's step (freezing.py) on host copies of the computed
        positions' decisions; returns the newly frozen positions."""
        if self.options.freeze is None:
            return np.zeros(self.canvas_length, dtype=bool)
        C = self.canvas_length
        computed = np.zeros(C, dtype=bool)
        computed[pos] = True
        conf = np.zeros(C)
        conf[pos] = np.array(confidence[0])
        tp = None
        if token_prob is not None:
            tp = np.ones(C)
            tp[pos] = np.array(token_prob[0])
        return self.freezing.update(computed, np.array(self._argmax_all[0]).astype(np.int64), conf, tp,
                                    step, np.array(accepted[0]), np.array(sample[0]).astype(np.int64))

    def _repair(self, canvas: mx.array) -> mx.array:
        """One full forward of the final canvas with fresh keys and values; its argmax."""
        logits = self.model.decode(canvas, self.cache, None)
        if self._fixed is not None:
            logits = ban_eos(logits, self._fixed)
        self.work.positions += self.canvas_length
        self.work.lm_head_rows += self.canvas_length
        return mx.argmax(logits, axis=-1).astype(mx.int32)


def _put(buffer: mx.array, idx: mx.array, rows: mx.array) -> mx.array:
    """`buffer` [1, C, ...] with the positions `idx` set to `rows` [1, A, ...]."""
    out = mx.array(buffer)
    out[:, idx] = rows.astype(buffer.dtype)
    return out


def work_per_token(work: Work, tokens: int, layers: int, vocab: int) -> Dict[str, float]:
    """Decoder work per generated token: positions x layers, LM-head rows x vocab, and
    self-conditioning entries (each a row of the embedding read)."""
    t = max(tokens, 1)
    return {
        "positions_x_layers": work.positions * layers / t,
        "lm_head": work.lm_head_rows * vocab / t,
        "self_conditioning": work.sc_entries / t,
        "self_conditioning_rows": work.sc_rows / t,
        "mean_active": work.positions / max(work.steps, 1),
    }

"""Holding one drafter run to another when their floats differ in the last bits.

Token-for-token equality of two whole runs is only a fair assertion when both sides
compute the same floats by construction (same library, same ops, the prompt encoded in
the same pieces). Between a reused and a fresh cache, a chunked and a whole prefill,
MLX and torch, or one CPU's kernels and another's, the logits differ by ~1e-5, and a
sampler decision whose margin is smaller than that can go either way; self-conditioning
then carries the difference into every later step.

So run A is recorded step by step (what the denoiser encoded; each step's canvas,
self-conditioning logits and stop history in; its logits and decisions out), and run B
replays A's inputs on its own model and cache (teacher forcing: no divergence can
compound). B must give raw logits within `atol` of A's, and every decision that A's margins
make certain under the measured difference `d` must be A's:

- argmax and the Gumbel-max sample, where A's top-2 gap exceeds 2d (the gap of B is then
  positive too: this is a bound, not a heuristic);
- entropy-bound acceptance, where A's sorted-prefix entropy sum is further from the bound
  than the entropy differences can move it (positions whose entropies are within that
  difference of each other may swap order, so they count as possibly before);
- the next canvas where acceptance and the sample are both certain; the stop where every
  argmax and the mean entropy's side of the confidence threshold are certain.

The report also says how many decisions were uncertain, so a test can require that the
comparison kept its teeth.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import numpy as np


def to_numpy(x) -> Optional[np.ndarray]:
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    return np.array(x)


@dataclass
class Encode:
    ids: List[int]


@dataclass
class Step:
    canvas_index: int
    step: int
    temperature: float
    canvas_in: np.ndarray  # [B, C]
    sc_in: Optional[np.ndarray]  # [B, C, V] or None
    history_in: Optional[np.ndarray]  # [threshold, B, C] or None
    processed: np.ndarray  # [B, C, V] float: logits / temperature
    argmax: np.ndarray  # [C] (row 0)
    accepted: np.ndarray  # [C] bool (row 0)
    next_canvas: np.ndarray  # [B, C]
    stop: bool


@dataclass
class Start:
    """A canvas started with fixed positions (fixed.CanvasFixed); replay starts its own
    canvas with them, and the comparison treats them as fixed."""

    canvas_index: int
    fixed: Any


Record = List[Any]  # Encode | Start | Step, in execution order


@contextmanager
def recording(monkeypatch, denoiser_cls) -> Record:
    """Records every `encode` and `step` of `denoiser_cls` (MLXDenoiser, TorchDenoiser)
    while the block runs."""
    log: Record = []
    encode, step, start = denoiser_cls.encode, denoiser_cls.step, denoiser_cls.start_canvas

    def rec_start(self, canvas_index, fixed=None):
        if fixed is not None:
            log.append(Start(canvas_index, fixed))
        return start(self, canvas_index, fixed)

    def rec_encode(self, token_ids):
        log.append(Encode([int(t) for t in np.asarray(token_ids).reshape(-1)]))
        return encode(self, token_ids)

    def rec_step(self, canvas, canvas_index, s):
        ins = (to_numpy(canvas), to_numpy(self._sc_logits), to_numpy(self._history))
        out = step(self, canvas, canvas_index, s)
        log.append(Step(canvas_index, s, float(self.gen.temperature(s)), *ins,
                        processed=to_numpy(self._sc_logits).astype(np.float64),
                        argmax=to_numpy(out[1]), accepted=to_numpy(out[2]),
                        next_canvas=to_numpy(out[0]), stop=bool(out[3])))
        return out

    with monkeypatch.context() as m:
        m.setattr(denoiser_cls, "encode", rec_encode)
        m.setattr(denoiser_cls, "step", rec_step)
        m.setattr(denoiser_cls, "start_canvas", rec_start)
        yield log


def record_rows(m, denoiser_cls, logs: dict) -> None:
    """Records, per denoiser instance (`logs[id(denoiser)]`, a list), every `encode`, every
    canvas started with fixed positions and every decision of `denoiser_cls`
    (MLXDenoiser), patched through the monkeypatch `m`.
    Taken at `decide`, not `step`: a batched step (generation/batch.py) runs the forward
    for several denoisers and hands each its logits."""
    encode, decide, start = denoiser_cls.encode, denoiser_cls.decide, denoiser_cls.start_canvas

    def rec_start(self, canvas_index, fixed=None):
        if fixed is not None:
            logs.setdefault(id(self), []).append(Start(canvas_index, fixed))
        return start(self, canvas_index, fixed)

    def rec_encode(self, token_ids):
        logs.setdefault(id(self), []).append(Encode([int(t) for t in np.asarray(token_ids).reshape(-1)]))
        return encode(self, token_ids)

    def rec_decide(self, processed, canvas, canvas_index, s):
        ins = (to_numpy(canvas), to_numpy(self._sc_logits), to_numpy(self._history))
        out = decide(self, processed, canvas, canvas_index, s)
        logs.setdefault(id(self), []).append(
            Step(canvas_index, s, float(self.gen.temperature(s)), *ins,
                 processed=to_numpy(self._sc_logits).astype(np.float64), argmax=to_numpy(out[1]),
                 accepted=to_numpy(out[2]), next_canvas=to_numpy(out[0]), stop=bool(out[3])))
        return out

    m.setattr(denoiser_cls, "encode", rec_encode)
    m.setattr(denoiser_cls, "decide", rec_decide)
    m.setattr(denoiser_cls, "start_canvas", rec_start)


def check_batched_forwards(m, fast_cls, checked: list, atol: float = 1e-4) -> None:
    """Before each batched decision of `fast_cls` (FastDenoiser: its decisions keep host
    state that a replay cannot feed), the denoiser's own solo forward on the same canvas
    and state: its logits must be the batched ones within `atol`, argmax equal wherever
    certain. Appends each step checked to `checked`."""
    import mlx.core as mx

    decide = fast_cls.decide

    def forced(self, processed, canvas, canvas_index, step, pos=None, idx=None):
        if pos is None:  # batched (a solo step passes its positions)
            C = self.canvas_length
            solo = np.array(self._logits(canvas, np.arange(C), mx.arange(C)) / self.gen.temperature(step))
            got = np.array(processed)
            np.testing.assert_allclose(got, solo, atol=atol, rtol=0)
            assert_argmax_where_certain(got[0], solo[0], f"canvas {canvas_index} step {step}", 0.9)
            checked.append((canvas_index, step))
        return decide(self, processed, canvas, canvas_index, step, pos, idx)

    m.setattr(fast_cls, "decide", forced)


def from_reference(result, prompt: Sequence[int], canvas_length: int,
                   stability_threshold: int) -> Record:
    """The record of a `hooked_generate(..., record=True)` run of transformers' own
    generate() (batch row 0), in the form `replay` takes."""
    log: Record = [Encode([int(t) for t in prompt])]
    for ci in range(result.n_canvases):
        if ci:
            log.append(Encode(result.committed(ci - 1, canvas_length)[0].tolist()))
        seen: list = []  # argmax canvases of this canvas's earlier steps, row 0
        for r in result.canvas_steps(ci):
            history = None
            if stability_threshold and seen:
                pad = [np.full_like(seen[0], -1)] * max(0, stability_threshold - len(seen))
                history = np.stack(pad + seen[-stability_threshold:])
            log.append(Step(ci, r.step, float(r.temperature), r.canvas_in[:1],
                            None if r.sc_logits_in is None else r.sc_logits_in[:1],
                            history, r.processed_logits[:1].astype(np.float64),
                            r.argmax_canvas[0], r.accepted_mask[0], r.next_canvas[:1],
                            bool(r.stop_fired[0])))
            seen.append(r.argmax_canvas[:1])
    return log


@dataclass
class Report:
    max_logit_diff: float = 0.0  # over every step, of the raw logits (processed x temperature)
    decisions: int = 0  # decisions compared
    uncertain: int = 0  # decisions too close to call under the measured difference
    mismatches: List[str] = field(default_factory=list)  # certain decisions B got wrong
    steps: int = 0

    def check(self, atol: float, max_uncertain: float = 0.05) -> None:
        assert self.steps > 0, "nothing was replayed"
        assert self.max_logit_diff <= atol, (
            f"max |logit diff| {self.max_logit_diff:.3g} > {atol} over {self.steps} steps")
        assert not self.mismatches, (
            f"{len(self.mismatches)} certain decision(s) differ: {self.mismatches[:5]}")
        assert self.uncertain <= max_uncertain * self.decisions, (
            f"{self.uncertain} of {self.decisions} decisions too close to call: the "
            "comparison has lost its teeth")


def top2_gap(x: np.ndarray) -> np.ndarray:
    part = np.partition(x, -2, axis=-1)
    return part[..., -1] - part[..., -2]


def assert_argmax_where_certain(ours: np.ndarray, ref: np.ndarray, name: str = "",
                                min_certain: float = 0.95) -> None:
    """Two logit arrays' argmaxes agree wherever the reference's top-2 gap exceeds twice
    their largest difference (there the other cannot have a different argmax); closer
    calls are rounding, which differs from CPU to CPU."""
    diff = float(np.abs(ours.astype(np.float64) - ref).max())
    sure = top2_gap(ref.astype(np.float64)) > 2 * diff
    assert (ours.argmax(-1) == ref.argmax(-1))[sure].all(), f"{name}: argmax differs"
    assert sure.mean() >= min_certain, f"{name}: too many near-ties to compare ({sure.mean():.2f})"


def entropy(logits: np.ndarray) -> np.ndarray:
    """Per-position entropy of softmax(logits) over the last axis (float64)."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def certain_acceptance(h: np.ndarray, dh: float, bound: float) -> tuple:
    """(accepted, certain) for the entropy-bound rule on entropies `h` [C] known to
    within `dh` each: position i is accepted iff the entropies sorted before it sum to at
    most `bound`."""
    accepted = np.zeros(h.shape, bool)
    certain = np.zeros(h.shape, bool)
    slack = len(h) * dh
    for i, hi in enumerate(h):
        others = np.delete(h, i)
        surely_before = others[others < hi - 2 * dh].sum()
        maybe_before = others[others <= hi + 2 * dh].sum()
        if maybe_before + slack < bound:
            accepted[i], certain[i] = True, True
        elif surely_before - slack > bound:
            certain[i] = True
    return accepted, certain


def replay(denoiser, record: Record, noise, *, from_numpy: Callable) -> Report:
    """Feeds `record`'s inputs to `denoiser` (fresh or holding a context of its own) and
    compares what it computes; `from_numpy(a)` makes a backend array."""
    gen = denoiser.gen
    rep = Report()
    fixed = None  # the fixed mask of the canvas being replayed
    for ev in record:
        if isinstance(ev, Encode):
            denoiser.encode(ev.ids)
            continue
        if isinstance(ev, Start):
            denoiser.start_canvas(ev.canvas_index, ev.fixed)
            fixed = (ev.canvas_index, ev.fixed.mask(denoiser.canvas_length))
            continue
        denoiser._sc_logits = None if ev.sc_in is None else from_numpy(ev.sc_in)
        denoiser._history = None if ev.history_in is None else from_numpy(ev.history_in)
        nxt, argmax, accepted, stop = denoiser.step(from_numpy(ev.canvas_in), ev.canvas_index, ev.step)
        got = to_numpy(denoiser._sc_logits).astype(np.float64)
        d = float(np.abs(got - ev.processed).max())
        rep.max_logit_diff = max(rep.max_logit_diff, d * ev.temperature)
        rep.steps += 1
        mask = fixed[1] if fixed is not None and fixed[0] == ev.canvas_index else None
        _compare_step(rep, ev, got, d, to_numpy(argmax), to_numpy(accepted), to_numpy(nxt), stop,
                      noise, gen, mask)
    return rep


def _compare_step(rep, ev: Step, got, d, argmax, accepted, nxt, stop, noise, gen,
                  fixed: Optional[np.ndarray] = None) -> None:
    a = ev.processed[0]  # row 0, [C, V]
    where = f"canvas {ev.canvas_index} step {ev.step}"
    margin = 2 * d + 1e-6
    # Fixed positions show, keep and count as accepted their token on both sides: their
    # decisions are certain; they sort last in acceptance and the stop reads the others.
    fixed = np.zeros(a.shape[0], bool) if fixed is None else fixed

    sure_argmax = (top2_gap(a) > margin) | fixed
    g = noise.gumbel(ev.canvas_index, ev.step, ev.processed.shape)[0].astype(np.float64)
    sure_sample = (top2_gap(a + g) > margin) | fixed
    sample_a = (a + g).argmax(-1)

    h_a, h_b = entropy(a), entropy(got[0])
    dh = float(np.abs(h_a - h_b)[~fixed].max()) + 1e-5  # + the backends' float32 entropy rounding
    acc_a, sure_acc = certain_acceptance(np.where(fixed, np.inf, h_a), dh, gen.entropy_bound)
    acc_a, sure_acc = acc_a | fixed, sure_acc | fixed
    sure_next = sure_acc & np.where(acc_a, sure_sample, True)

    for name, sure, mine, theirs in (
        ("argmax", sure_argmax, argmax, ev.argmax),
        ("acceptance", sure_acc, accepted, ev.accepted),
        ("next canvas", sure_next, nxt[0], ev.next_canvas[0]),
    ):
        rep.decisions += sure.size
        rep.uncertain += int((~sure).sum())
        bad = np.nonzero(sure & (np.asarray(mine) != np.asarray(theirs)))[0]
        if bad.size:
            rep.mismatches.append(f"{where}: {name} at positions {bad.tolist()}")
    # A's record agrees with its own logits wherever they are decisive (checks the record).
    assert (acc_a[sure_acc] == ev.accepted[sure_acc]).all(), f"{where}: record inconsistent"
    took = ev.accepted & sure_sample & ~fixed
    assert (ev.next_canvas[0][took] == sample_a[took]).all(), f"{where}: record inconsistent"

    stable_sure = gen.stability_threshold == 0 or bool(sure_argmax.all())
    confident_sure = abs(h_a[~fixed].mean() - gen.confidence_threshold) > dh
    rep.decisions += 1
    if stable_sure and confident_sure:
        if stop != ev.stop:
            rep.mismatches.append(f"{where}: stop {stop} vs {ev.stop}")
    else:
        rep.uncertain += 1

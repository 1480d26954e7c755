"""Fixed canvas positions (fixed.py): checked with errors that name the fix; nothing fixed
is today's run event for event; fixed tokens never change in any event of any mode or
backend, and no open position before the last of them takes an EOS; a canvas fixed
whole runs no step; the stop reads the open positions; MLX holds to the torch path
with fixed positions under shared noise (teacher-forced, as test_drafter_parity.py)."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from teacher_forcing import recording, replay
from tiny_checkpoints import random_prompt

import mlx_diffgemma as md
from mlx_diffgemma import torch_backend as tb
from mlx_diffgemma.generation.denoiser import MLXDenoiser
from mlx_diffgemma.generation.events import Commit, Draft, Summary
from mlx_diffgemma.generation.fast import FastOptions
from mlx_diffgemma.generation.fixed import check_fixed
from mlx_diffgemma.generation.sampler import stable_and_confident
from mlx_diffgemma.models.config import GenerationConfig

ATOL = 1e-3


@pytest.fixture(scope="module")
def mixed(ckpt_factory):
    path = ckpt_factory("mixed")
    model, _ = md.load(path)
    tmodel, _ = tb.load(path, device="cpu")
    return model, tmodel


def _check(fixed, **kw):
    args = dict(canvas_length=16, max_new_tokens=24, vocab_size=64, eos_token_id=[5], pad_token_id=0)
    return check_fixed(fixed, **dict(args, **kw))


# -- checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("fixed, message", [
    ({30: 7}, "fixed position 30 is outside the 24 positions max_new_tokens=24 allows"),
    ({-1: 7}, "fixed position -1 is outside the 24 positions"),
    ({"3": 7}, "fixed position '3' is outside the 24 positions"),
    ({3: 70000}, r"fixed token 70000 at position 3 is outside the vocabulary \(0..63\)"),
    ({3: -2}, r"fixed token -2 at position 3 is outside the vocabulary"),
    ({12: 5, 14: 17}, r"fixed position 12 holds an EOS id \(5\) but position 14 after it holds 17"),
    ([(3, 7)], r"fixed positions need a map \{position: token_id\}"),
])
def test_bad_fixed_positions_are_refused_by_message(fixed, message):
    with pytest.raises(ValueError, match=message):
        _check(fixed)


def test_fixed_positions_split_into_canvases():
    f = _check({0: 7, 15: 8, 20: 9})
    c0, c1 = f.canvas(0), f.canvas(1)
    assert c0.positions.tolist() == [0, 15] and c0.tokens.tolist() == [7, 8]
    assert c0.eos_ban_until == 16  # a later canvas holds a fixed position
    assert c1.positions.tolist() == [4] and c1.eos_ban_until == 4
    assert c1.ban_mask(16).tolist() == [True] * 4 + [False] * 12
    assert f.canvas(2) is None and f.canvases() == 2
    assert _check({}).canvas(0) is None and _check(None) is None
    assert _check({12: 5, 14: 0}).tokens == {12: 5, 14: 0}  # pad after a fixed EOS is fine


def test_a_stream_refuses_bad_fixed_positions(mixed):
    model, tmodel = mixed
    for run in (md.stream_generate, tb.stream_generate):
        m = model if run is md.stream_generate else tmodel
        with pytest.raises(ValueError, match="outside the 16 positions max_new_tokens=16 allows"):
            next(run(m, None, [5, 6, 7], max_new_tokens=16, fixed={16: 3}))
        with pytest.raises(ValueError, match=r"outside the vocabulary \(0..383\)"):
            next(run(m, None, [5, 6, 7], max_new_tokens=16, fixed={1: 384}))


# -- nothing fixed is today -----------------------------------------------------------

# Every re-opening rule on at once: none may touch a fixed position.
EVERY_RULE = FastOptions(revoke_margin=0.2, hold=2, adapt=0.5, final_pass=0.9, floor_decay=2.0, max_reopens=2,
                         verify_noise=0.9, doubt=0.8, forget_sc=True)
RUNNERS = {
    "reference": lambda m, t: (m, lambda *a, **k: md.stream_generate(*a, **k)),
    "fast": lambda m, t: (m, lambda *a, **k: md.stream_generate(*a, mode="fast", **k)),
    "fast-active-repair": lambda m, t: (m, lambda *a, **k: md.stream_generate(
        *a, mode="fast", fast=FastOptions(active_set=True, repair=True), **k)),
    "fast-every-rule": lambda m, t: (m, lambda *a, **k: md.stream_generate(*a, mode="fast", fast=EVERY_RULE, **k)),
    "fast-off": lambda m, t: (m, lambda *a, **k: md.stream_generate(*a, mode="fast", fast=FastOptions.off(), **k)),
    "torch": lambda m, t: (t, lambda *a, **k: tb.stream_generate(*a, **k)),
}


def _same_events(a, b):
    assert [e.kind for e in a] == [e.kind for e in b]
    for x, y in zip(a, b):
        if isinstance(x, Draft):
            assert (x.tokens, x.accepted, x.step, x.fixed) == (y.tokens, y.accepted, y.step, y.fixed)
        elif isinstance(x, Commit):
            assert (x.tokens, x.steps, x.finished) == (y.tokens, y.steps, y.finished)
        else:
            assert (x.tokens, x.steps_per_canvas, x.finish_reason) == (y.tokens, y.steps_per_canvas, y.finish_reason)


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("randomness", ["noise", "seed"])
def test_nothing_fixed_is_todays_run(mixed, runner, randomness):
    m, run = RUNNERS[runner](*mixed)
    prompt = random_prompt(m_vocab(m), 9, 3)
    kw = dict(max_new_tokens=32, max_denoising_steps=8)

    def go(**extra):
        r = dict(noise=md.SeededNoise(3)) if randomness == "noise" else dict(seed=3)
        return list(run(m, None, prompt, **r, **kw, **extra))

    plain = go()
    _same_events(go(fixed={}), plain)
    _same_events(go(fixed=None), plain)
    assert all(e.fixed is None for e in plain if isinstance(e, Draft))


def m_vocab(m) -> int:
    return m.vocab_size if hasattr(m, "vocab_size") else int(m.config.text_config.vocab_size)


# -- fixed tokens hold ----------------------------------------------------------------


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_fixed_tokens_never_change_in_any_event(mixed, runner):
    m, run = RUNNERS[runner](*mixed)
    C, V = 16, m_vocab(m)
    prompt = random_prompt(V, 9, 11)
    kw = dict(max_new_tokens=2 * C, max_denoising_steps=10, noise=md.SeededNoise(4))
    # EOS pressure: the token the model argmaxes most often in a free run is the EOS.
    free = [e for e in run(m, None, prompt, eos_token_id=None, **kw) if isinstance(e, Draft)]
    eos = Counter(t for e in free for t in e.tokens).most_common(1)[0][0]
    fixed = {0: 40, 7: 41, C - 1: 42, C + 5: 43}
    events = list(run(m, None, prompt, eos_token_id=[eos], fixed=fixed, **kw))
    drafts = [e for e in events if isinstance(e, Draft)]
    assert {e.canvas_index for e in drafts} == {0, 1}
    for e in drafts:
        for p, t in fixed.items():
            if p // C == e.canvas_index:
                assert e.tokens[p % C] == t and e.accepted[p % C] and e.fixed[p % C]
        last = C if e.canvas_index == 0 else 5
        assert eos not in e.tokens[:last], "an open position before the last fixed one took EOS"
        assert sum(e.fixed) == sum(1 for p in fixed if p // C == e.canvas_index)
    commits = [e for e in events if isinstance(e, Commit)]
    out = [t for c in commits for t in c.tokens]
    assert all(out[p] == t for p, t in fixed.items())
    assert events[-1].tokens[:C + 6] == out[:C + 6]


def test_a_canvas_fixed_whole_runs_no_step(mixed, monkeypatch):
    model, _ = mixed
    C = model.canvas_length
    calls = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    fixed = {p: 30 + p for p in range(C)}
    events = list(md.stream_generate(model, None, [5, 6, 7], max_new_tokens=2 * C, max_denoising_steps=6,
                                     eos_token_id=None, noise=md.SeededNoise(0), fixed=fixed))
    summary = events[-1]
    assert isinstance(summary, Summary)
    assert summary.steps_per_canvas[0] == 0 and summary.tokens[:C] == [30 + p for p in range(C)]
    assert all(e.canvas_index == 1 for e in events if isinstance(e, Draft))
    assert len(calls) == summary.steps_per_canvas[1]  # canvas 0 called no decoder
    assert summary.tokens_per_forward == pytest.approx(2 * C / summary.steps_per_canvas[1])


# -- the stop reads the open positions --------------------------------------------------


def test_the_stop_reads_the_open_positions_mean():
    rng = np.random.default_rng(0)
    h = rng.uniform(0, 2, (1, 16)).astype(np.float32)
    open_ = rng.uniform(size=(1, 16)) < 0.6
    argmax = mx.zeros((1, 16), dtype=mx.int32)
    for thr in (0.5, float(h[open_].mean()) + 1e-3, float(h[open_].mean()) - 1e-3, 1.5):
        stop, _ = stable_and_confident(argmax, None, mx.array(h), 0, thr, open=mx.array(open_))
        assert bool(stop.item()) == bool(h[open_].mean() < thr)
    # A fixed high-entropy position does not block a stop the open ones allow.
    h2 = np.full((1, 16), 0.001, np.float32)
    h2[0, 3] = 9.0
    fixed = np.zeros((1, 16), bool)
    fixed[0, 3] = True
    stop, _ = stable_and_confident(argmax, None, mx.array(h2), 0, 0.005, open=mx.array(~fixed))
    assert bool(stop.item())
    stop, _ = stable_and_confident(argmax, None, mx.array(h2), 0, 0.005)
    assert not bool(stop.item())


# -- MLX = torch ------------------------------------------------------------------------


def test_mlx_replays_the_torch_run_with_fixed_positions(ckpt_factory, monkeypatch):
    path = ckpt_factory("mixed", sc_down_scale=0.02)
    model, _ = md.load(path)
    tmodel, _ = tb.load(path, device="cpu")
    C, V = model.canvas_length, model.vocab_size
    prompt = random_prompt(V, 11, 21)
    fixed = {0: 40, 6: 41, C - 1: 42, C + 2: 43, C + 9: 44}
    kw = dict(max_new_tokens=2 * C, max_denoising_steps=12, eos_token_id=[9])
    noise = md.SeededNoise(8)
    with recording(monkeypatch, tb.TorchDenoiser) as torch_run:
        events = list(tb.stream_generate(tmodel, None, prompt, noise=noise, fixed=fixed, **kw))
    summary = events[-1]
    assert all(summary.tokens[p] == t for p, t in fixed.items())
    gen = GenerationConfig.from_model_dir(path, **kw)
    report = replay(MLXDenoiser(model, gen, noise=noise), torch_run, noise, from_numpy=mx.array)
    report.check(ATOL)
    assert report.steps == sum(summary.steps_per_canvas)


def test_speculative_drafting_refuses_fixed_positions():
    with pytest.raises(ValueError, match="fixed positions need block diffusion's own canvases"):
        next(md.speculative_stream_generate(None, None, None, None, [5], fixed={0: 3}))

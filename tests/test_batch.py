"""Several sequences denoised together (generation/batch.py, models/batched.py) held to
each one run alone: each row's own random keys, the batched forward against the solo
decoder, and whole rows against their solo runs (teacher-forced where a batched matmul
may round differently)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import teacher_forcing as tf
from teacher_forcing import assert_argmax_where_certain
from tiny_checkpoints import random_prompt

import mlx_diffgemma as md
from mlx_diffgemma.generation.api import make_denoiser
from mlx_diffgemma.generation.batch import BatchDrafter
from mlx_diffgemma.generation.denoiser import MLXDenoiser
from mlx_diffgemma.generation.events import Draft
from mlx_diffgemma.generation.fast import FastDenoiser
from mlx_diffgemma.generation.fixed import check_fixed
from mlx_diffgemma.generation.loop import Drafting, draft, stream
from mlx_diffgemma.generation.noise import KeyStream
from mlx_diffgemma.generation.settings import defaults, resolve
from mlx_diffgemma.models.batched import cache_views, decode_rows


@pytest.fixture(scope="module")
def mixed(ckpt_factory):
    model, tok = md.load(ckpt_factory("mixed"))
    return model, tok


def _settings(model, **kw):
    kw.setdefault("eos_token_id", None)
    return resolve(defaults(model), **kw)


# -- each row's own randomness ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_a_key_stream_draws_what_the_seeded_generator_draws(mixed, mode):
    """A run on its own KeyStream(s) gives the tokens of the same run after
    mx.random.seed(s), event for event, whatever the global generator does meanwhile."""
    model, _ = mixed
    C = model.canvas_length
    prompt = random_prompt(model.vocab_size, 11, 4)
    kw = dict(max_new_tokens=3 * C, max_denoising_steps=8, mode=mode)
    seeded = list(md.stream_generate(model, None, prompt, seed=1234, eos_token_id=None, **kw))

    mx.random.seed(99)  # a different global stream: the keys must not read it
    denoiser = make_denoiser(model, _settings(model, seed=1234, **kw), keys=KeyStream(1234))
    events = []
    for ev in stream(denoiser, None, prompt):
        events.append(ev)
        mx.random.uniform(shape=(3,))  # another sequence drawing between steps
    assert [e.kind for e in events] == [e.kind for e in seeded]
    for a, b in zip(events, seeded):
        assert a.tokens == b.tokens
    assert events[-1].steps_per_canvas == seeded[-1].steps_per_canvas
    assert len(events[-1].tokens) == 3 * C


# -- the batched forward ----------------------------------------------------------------------


@pytest.mark.parametrize("with_sc", [False, True])
def test_rows_decode_as_each_alone(mixed, with_sc):
    """decode_rows on canvases whose contexts are empty, inside and past the sliding
    window (8) and long, each row against `Model.decode` on its own cache."""
    model, _ = mixed
    C, V = model.canvas_length, model.vocab_size
    caches, canvases, scs = [], [], []
    for n, seed in ((0, 1), (5, 2), (21, 3), (70, 4)):
        cache = model.make_cache()
        if n:
            model.encode(mx.array([random_prompt(V, n, seed)]), cache)
        caches.append(cache)
        canvases.append(mx.array([random_prompt(V, C, 10 + seed)]))
        scs.append(mx.random.normal((1, C, V), key=mx.random.key(seed)) * 3 if with_sc else None)
    solo = [np.array(model.decode(c, cache, sc)) for c, cache, sc in zip(canvases, caches, scs)]
    h = mx.concatenate([model.decoder_input(c, sc) for c, sc in zip(canvases, scs)], axis=0)
    got = np.array(decode_rows(model, h, [c.offset for c in caches], [cache_views(c) for c in caches]))
    assert got.shape == (4, C, V)
    for b, ref in enumerate(solo):
        np.testing.assert_allclose(got[b:b + 1], ref, atol=1e-4, rtol=0)
        assert_argmax_where_certain(got[b], ref[0], f"row {b}")
    # rows differ (each its own context): a row computed on another's cache would not pass
    assert np.abs(solo[1] - solo[2]).max() > 1e-2


# -- rows drafted together --------------------------------------------------------------------


def _row(model, prompt, noise=None, keys=None, fixed=None, **kw):
    settings = _settings(model, **kw)
    denoiser = make_denoiser(model, settings, noise=noise, keys=keys)
    return Drafting(denoiser, prompt, settings.gen, fixed=_fixed(model, settings.gen, fixed))


def _fixed(model, gen, fixed):
    return check_fixed(fixed, canvas_length=model.canvas_length, max_new_tokens=gen.max_new_tokens,
                       vocab_size=model.vocab_size, eos_token_id=gen.eos_token_id,
                       pad_token_id=gen.pad_token_id)


def _drain(drafter: BatchDrafter, joining=()):
    """Steps `drafter` until every row has left; `joining`: (tick, run) pairs inserted
    before that tick. Returns {row id: events} and the ticks each row took."""
    events, ticks, tick = {}, {}, 0
    joining = list(joining)
    while len(drafter) or joining:
        for t, run in [j for j in joining if j[0] == tick]:
            joining.remove((t, run))
            events[drafter.insert(run)] = []
        for uid, evs in drafter.step():
            events[uid] += evs
            ticks[uid] = tick
        tick += 1
    return events, ticks


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_a_batch_of_one_is_the_solo_drafter(mixed, mode):
    """One row: the events of `draft` itself, token for token (the same calls)."""
    model, _ = mixed
    C = model.canvas_length
    prompt = random_prompt(model.vocab_size, 9, 6)
    kw = dict(max_new_tokens=2 * C, max_denoising_steps=10, mode=mode)
    mx.random.seed(21)
    solo = list(draft(make_denoiser(model, _settings(model, **kw)), prompt, _settings(model, **kw).gen))
    drafter = BatchDrafter(model)
    events, _ = _drain(drafter, [(0, _row(model, prompt, keys=KeyStream(21), **kw))])
    (got,) = events.values()
    assert [e.kind for e in got] == [e.kind for e in solo]
    for a, b in zip(got, solo):
        assert a.tokens == b.tokens
    assert drafter.mean_batch == 1.0


def test_rows_together_give_their_solo_runs(mixed, monkeypatch):
    """Four rows (prompts inside and past the sliding window, 8 to 16 steps, reference
    and fast mode, one joining after three steps) drafted together: each reference row,
    replayed on a cold solo denoiser, makes every certain decision as it did in the
    batch, and each fast row's batched forward is its solo forward along its whole run."""
    model, _ = mixed
    C, V = model.canvas_length, model.vocab_size
    logs, fast_checked = {}, []
    tf.record_rows(monkeypatch, MLXDenoiser, logs)
    tf.check_batched_forwards(monkeypatch, FastDenoiser, fast_checked)
    specs = [  # (tick joined, prompt length, seed, settings)
        (0, 5, 1, dict(max_denoising_steps=8, max_new_tokens=2 * C)),
        (0, 20, 2, dict(max_denoising_steps=16, max_new_tokens=3 * C, stability_threshold=1,
                        confidence_threshold=0.9)),
        (0, 11, 3, dict(max_denoising_steps=12, max_new_tokens=2 * C, mode="fast")),
        (3, 40, 4, dict(max_denoising_steps=10, max_new_tokens=2 * C)),
    ]
    runs = [(t, _row(model, random_prompt(V, n, s), noise=md.SeededNoise(s), **kw)) for t, n, s, kw in specs]
    drafter = BatchDrafter(model)
    events, ticks = _drain(drafter, runs)
    assert drafter.mean_batch > 2
    assert len(set(ticks.values())) > 1  # rows left at their own steps
    for uid, ((t, n, seed, kw), (_, run)) in enumerate(zip(specs, runs)):  # ids in insertion order
        summary = events[uid][-1]
        assert summary.kind == "summary" and len(summary.tokens) == kw["max_new_tokens"]
        if kw.get("mode") == "fast":
            continue
        record = logs[id(run.denoiser)]
        cold = MLXDenoiser(model, run.gen, noise=md.SeededNoise(seed))
        report = tf.replay(cold, record, md.SeededNoise(seed), from_numpy=mx.array)
        report.check(1e-3)
        assert report.steps == sum(summary.steps_per_canvas)
    assert len(fast_checked) >= 4


def _holds(events, fixed, C):
    """Every Draft of `events` shows the `fixed` tokens of its canvas, marked fixed."""
    drafts = [e for e in events if isinstance(e, Draft)]
    assert drafts
    for e in drafts:
        mine = {p % C: t for p, t in fixed.items() if p // C == e.canvas_index}
        assert e.fixed is not None and sum(e.fixed) == len(mine)
        assert all(e.tokens[p] == t and e.fixed[p] and e.accepted[p] for p, t in mine.items())
    out = events[-1].tokens
    assert all(out[p] == t for p, t in fixed.items())


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_a_batch_of_one_with_fixed_positions_is_the_solo_drafter(mixed, mode):
    """A row with fixed positions, its second canvas fixed whole: the events of
    `draft(..., fixed=)` itself, fixed masks and the stepless canvas included."""
    model, _ = mixed
    C = model.canvas_length
    prompt = random_prompt(model.vocab_size, 9, 6)
    kw = dict(max_new_tokens=3 * C, max_denoising_steps=10, mode=mode)
    fixed = {0: 40, 7: 41, **{C + p: 30 + p for p in range(C)}, 2 * C + 3: 44}
    settings = _settings(model, **kw)
    solo = list(draft(make_denoiser(model, settings, noise=md.SeededNoise(5)), prompt, settings.gen,
                      fixed=_fixed(model, settings.gen, fixed)))
    events, _ = _drain(BatchDrafter(model), [(0, _row(model, prompt, noise=md.SeededNoise(5), fixed=fixed, **kw))])
    (got,) = events.values()
    assert [e.kind for e in got] == [e.kind for e in solo]
    for a, b in zip(got, solo):
        assert a.tokens == b.tokens and getattr(a, "fixed", None) == getattr(b, "fixed", None)
    assert got[-1].steps_per_canvas[1] == 0
    _holds(got, fixed, C)


def test_rows_with_fixed_positions_keep_them_beside_other_rows(mixed, monkeypatch):
    """A reference row with fixed positions (its second canvas fixed whole, committed
    with no step), a plain row and a fast row with fixed positions, drafted together:
    every Draft of a fixed row shows its tokens, and the reference row, replayed on a
    cold solo denoiser that starts its canvases with the same fixed positions, makes
    every certain decision as it did in the batch."""
    model, _ = mixed
    C, V = model.canvas_length, model.vocab_size
    logs, fast_checked = {}, []
    tf.record_rows(monkeypatch, MLXDenoiser, logs)
    tf.check_batched_forwards(monkeypatch, FastDenoiser, fast_checked)
    held = {0: 40, 7: 41, **{C + p: 30 + p for p in range(C)}, 2 * C + 3: 44}
    specs = [  # (prompt length, seed, fixed, settings)
        (9, 1, held, dict(max_denoising_steps=10, max_new_tokens=3 * C)),
        (14, 2, None, dict(max_denoising_steps=12, max_new_tokens=2 * C)),
        (6, 3, {3: 45, C + 1: 46}, dict(max_denoising_steps=10, max_new_tokens=2 * C, mode="fast")),
    ]
    runs = [_row(model, random_prompt(V, n, s), noise=md.SeededNoise(s), fixed=f, **kw) for n, s, f, kw in specs]
    drafter = BatchDrafter(model)
    events, _ = _drain(drafter, [(0, r) for r in runs])
    assert drafter.mean_batch > 1.5
    summary = events[0][-1]
    assert summary.steps_per_canvas[1] == 0 and summary.tokens[C:2 * C] == [30 + p for p in range(C)]
    assert not any(isinstance(e, Draft) and e.canvas_index == 1 for e in events[0])
    _holds(events[0], held, C)
    _holds(events[2], specs[2][2], C)
    assert all(e.fixed is None for e in events[1] if isinstance(e, Draft))
    for uid in (0, 1):
        run, seed = runs[uid], specs[uid][1]
        cold = MLXDenoiser(model, run.gen, noise=md.SeededNoise(seed))
        report = tf.replay(cold, logs[id(run.denoiser)], md.SeededNoise(seed), from_numpy=mx.array)
        report.check(1e-3)
        assert report.steps == sum(events[uid][-1].steps_per_canvas)
    assert len(fast_checked) >= 2

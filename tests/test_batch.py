"""Several sequences denoised together (generation/batch.py, models/batched.py) held to
each one run alone: each row's own random keys, the batched forward against the solo
decoder, and whole rows against their solo runs (teacher-forced where a batched matmul
may round differently)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from teacher_forcing import assert_argmax_where_certain
from tiny_checkpoints import random_prompt

import mlx_diffgemma as md
from mlx_diffgemma.generation.api import make_denoiser
from mlx_diffgemma.generation.loop import stream
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

"""Several sequences denoised together (generation/batch.py, models/batched.py) held to
each one run alone: each row's own random keys, the batched forward against the solo
decoder, and whole rows against their solo runs (teacher-forced where a batched matmul
may round differently)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tiny_checkpoints import random_prompt

import mlx_diffgemma as md
from mlx_diffgemma.generation.api import make_denoiser
from mlx_diffgemma.generation.loop import stream
from mlx_diffgemma.generation.noise import KeyStream
from mlx_diffgemma.generation.settings import defaults, resolve


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

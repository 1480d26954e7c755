"""Fast mode (fast.py): with every approximation off it is reference mode token for token
(same operations, same noise); the active-set forward computes the full decoder's logits
at the positions it runs when the other positions' keys and values are current; sparse
self-conditioning at K = vocabulary is the dense product and its truncation error stays
within the stated bound; the mode runs end to end with each approximation."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from tiny_checkpoints import DRAFTER_RUNS, random_prompt

import mlx_diffgemma as md
from mlx_diffgemma.generation.fast import FastDenoiser, FastOptions, sparse_soft_embedding_bound
from mlx_diffgemma.generation.loop import stream
from mlx_diffgemma.generation.settings import defaults, resolve
from mlx_diffgemma.models.layers import rope_at, sparse_soft_embedding

RUNS = [DRAFTER_RUNS[i] for i in (0, 3, 4)]  # a plain run and both data-dependent stops


@pytest.fixture(scope="module")
def mixed(ckpt_factory):
    path = ckpt_factory("mixed")
    model, tok = md.load(path)
    return path, model, tok


_prompt = random_prompt


@pytest.mark.parametrize("seed, prompt_len, canvases, kw", RUNS)
def test_every_approximation_off_is_reference_mode(mixed, seed, prompt_len, canvases, kw):
    _, model, _ = mixed
    C = model.canvas_length
    prompt = _prompt(model.vocab_size, prompt_len, seed)
    kw = dict(kw, max_new_tokens=canvases * C, eos_token_id=None)
    ref = list(md.stream_generate(model, None, prompt, noise=md.SeededNoise(seed), **kw))
    fast = list(md.stream_generate(model, None, prompt, noise=md.SeededNoise(seed), mode="fast",
                                   fast=FastOptions.off(), **kw))
    assert [e.kind for e in fast] == [e.kind for e in ref]
    for a, b in zip(fast, ref):  # every draft, commit and the summary's tokens
        if a.kind != "summary":
            assert a.tokens == b.tokens
    assert fast[-1].tokens == ref[-1].tokens and fast[-1].steps_per_canvas == ref[-1].steps_per_canvas


def test_rope_at_positions_is_the_canvas_rope(mixed):
    _, model, _ = mixed
    attn = model.layers[1].self_attn
    C, offset = model.canvas_length, 23
    x = mx.random.normal((1, attn.n_heads, C, attn.head_dim), key=mx.random.key(0))
    whole = attn.rope(x, offset=offset)
    idx = mx.array([0, 3, 4, 11, C - 1])
    np.testing.assert_array_equal(np.array(rope_at(attn.rope, x[:, :, idx], idx, C, offset)),
                                  np.array(whole[:, :, idx]))


@pytest.mark.parametrize("with_sc", [False, True])
def test_active_positions_match_the_full_decoder(mixed, with_sc):
    """Keys and values current for every position (refreshed: the whole canvas run once
    through `forward_positions`), the logits of any subset of positions are the full
    decoder's at those positions; the whole canvas through it is the full decoder."""
    _, model, _ = mixed
    C, V = model.canvas_length, model.vocab_size
    rng = np.random.default_rng(1)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, V, (1, 13))), cache)  # past the sliding window
    canvas = mx.array(rng.integers(0, V, (1, C)))
    sc = mx.array((rng.standard_normal((1, C, V)) * 3).astype(np.float32)) if with_sc else None
    full = np.array(model.decode(canvas, cache, sc))
    kv = [None] * len(model.layers)
    every = mx.arange(C)
    whole = np.array(model.forward_positions(canvas, every, C, cache, kv, sc_logits=sc))
    np.testing.assert_allclose(whole, full, atol=1e-4)
    some = mx.array([1, 2, 7, 12])
    part = model.forward_positions(canvas[:, some], some, C, cache, kv,
                             sc_logits=None if sc is None else sc[:, some])
    np.testing.assert_allclose(np.array(part), full[:, [1, 2, 7, 12]], atol=1e-4)
    # Teeth: stale keys and values for the other positions give other logits.
    stale = [(k * 0.5, v * 0.5) for k, v in kv]
    off = model.forward_positions(canvas[:, some], some, C, cache, stale,
                            sc_logits=None if sc is None else sc[:, some])
    assert np.abs(np.array(off) - full[:, [1, 2, 7, 12]]).max() > 1e-2


def test_sparse_self_conditioning_and_its_bound(mixed):
    _, model, _ = mixed
    embed = model.model.decoder.embed_tokens
    V, scale = model.vocab_size, model.embed_scale
    logits = mx.array((np.random.default_rng(2).standard_normal((1, 6, V)) * 4).astype(np.float32))
    probs = mx.softmax(logits, axis=-1)
    dense = (probs @ embed.weight) * scale
    order = mx.argsort(-probs, axis=-1)
    every = sparse_soft_embedding(embed, mx.take_along_axis(probs, order, -1), order, scale)
    np.testing.assert_allclose(np.array(every), np.array(dense), atol=1e-4)
    for k in (1, 8, 32):
        ids = order[..., :k]
        p = mx.take_along_axis(probs, ids, -1)
        err = np.linalg.norm(np.array(sparse_soft_embedding(embed, p, ids, scale)) - np.array(dense), axis=-1)
        bound = np.array(sparse_soft_embedding_bound(embed.weight, p, ids, scale))
        assert (err <= bound + 1e-4).all(), (k, err, bound)
        if k == 1:
            assert err.max() > 1e-3  # the truncation is real


# Random weights are never sure of a token, so re-opening would keep every position open:
# the active-set runs freeze for good, to exercise what the active set skips.
KEEP = FastOptions().irrevocable()
OPTIONS = {
    "default": FastOptions(),
    "irrevocable": KEEP,
    "active set": replace(KEEP, active_set=True, buckets=(2, 4, 8)),
    "active set, refresh every 2": replace(KEEP, active_set=True, refresh_every=2, buckets=(2, 4, 8)),
    "active set, revocable": FastOptions(active_set=True, buckets=(2, 4, 8)),
    "entropy-freeze, active set, renoised": replace(KEEP, freeze="entropy", active_set=True, renoise=True,
                                                    buckets=(2, 4, 8)),
    "entropy-freeze, revocable": FastOptions(freeze="entropy"),
    "freeze only": FastOptions(top_k=0, sc_top_k=0),
    "top-k only": FastOptions(freeze=None, sc_top_k=0, skip_after_eos=False, renoise=True),
    "sparse sc only": FastOptions(freeze=None, top_k=0, skip_after_eos=False, renoise=True),
    "repair": FastOptions(repair=True),
    "margin, hold, adapt, final pass": FastOptions(revoke_margin=0.2, hold=2, adapt=0.5, final_pass=0.9),
    "floor decay, max re-opens, verify under noise, doubt, forget sc": FastOptions(
        floor_decay=2.0, max_reopens=2, verify_noise=0.9, doubt=0.8, forget_sc=True),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_fast_mode_runs_with_each_approximation(mixed, name):
    _, model, tok = mixed
    C = model.canvas_length
    gen = resolve(defaults(model), max_new_tokens=2 * C, max_denoising_steps=8, eos_token_id=None).gen
    den = FastDenoiser(model, gen, noise=md.SeededNoise(3), options=OPTIONS[name])
    events = list(stream(den, None, _prompt(model.vocab_size, 7, 1)))
    s = events[-1]
    assert s.kind == "summary" and len(s.tokens) == 2 * C and s.canvases == 2
    assert den.work.steps == sum(s.steps_per_canvas)
    o = OPTIONS[name]
    drafts = [e for e in events if e.kind == "draft"]
    if o.freeze == "confidence":
        # every position is frozen at the last step at the latest: each canvas's last draft shows all settled
        for ci in range(s.canvases):
            assert all([d for d in drafts if d.canvas_index == ci][-1].accepted)
    if o.active_set and not o.revocable and o.buckets[0] < C:
        assert min(den.work.per_step) < C  # fewer positions once some are frozen
    if o.refresh_every:
        # never more than `refresh_every` active-set steps in a row within a canvas
        run = 0
        for d, n in zip(drafts, den.work.per_step):
            run = 0 if n == C or d.step == 8 else run + 1
            assert run <= o.refresh_every


def test_options_are_checked():
    with pytest.raises(ValueError, match="active set needs a freeze rule"):
        FastOptions(freeze=None, active_set=True)
    with pytest.raises(ValueError, match="freeze must be one of"):
        FastOptions(freeze="sometimes")
    with pytest.raises(ValueError, match="confidence"):
        FastOptions(confidence=1.5)
    with pytest.raises(ValueError, match="refresh_every must be >= 0"):
        FastOptions(active_set=True, refresh_every=-1)
    with pytest.raises(ValueError, match="mode must be one of"):
        list(md.stream_generate(None, None, [1], mode="turbo"))


PUZZLE, SOLUTION = "1.3.34..2.4.4.1.", "1234342121434312"  # the unique solution


def test_generate_and_chat_run_fast_mode_end_to_end(capsys):
    """`mlx-diffgemma generate --mode fast` and a chat session in fast mode (also switched
    with /set) solve the toy model's puzzle; the torch backend refuses fast mode."""
    import io

    from rich.console import Console

    from mlx_diffgemma import cli
    from mlx_diffgemma.chat import repl
    from mlx_diffgemma.chat.session import ChatSession

    assert cli.main(["generate", "--model", "toy-sudoku", "-p", PUZZLE, "--mode", "fast", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == SOLUTION

    model, tok = md.load("toy-sudoku")
    s = ChatSession(model, tok, seed=0, keep_history=False, mode="fast")
    for _ in range(2):
        summary = [e for e in s.send(PUZZLE) if e.kind == "summary"][-1]
        assert summary.text == SOLUTION
    out = io.StringIO()
    con = Console(file=out, width=200)
    repl._command(s, con, "/set mode=reference")
    assert s.settings.mode == "reference" and "mode=reference" in out.getvalue()
    repl._command(s, con, "/set mode=warp")
    assert s.settings.mode == "reference" and "mode must be one of reference, fast" in out.getvalue()
    assert cli.main(["generate", "--model", "toy-sudoku", "-p", PUZZLE, "--mode", "fast",
                     "--backend", "torch"]) == 2
    assert "MLX backend only" in capsys.readouterr().err

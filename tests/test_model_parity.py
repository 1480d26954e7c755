"""The MLX denoiser held to transformers' DiffusionGemmaForBlockDiffusion, in float32."""

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import reference_decoder_logits, reference_encoder_cache
from teacher_forcing import assert_argmax_where_certain

from mlx_diffgemma import load

# Two correct float32 implementations land near 1e-4 on logits of magnitude ~20.
ATOL = 1e-3
WORST = {}  # shape/case -> worst |diff|, printed at the end for the closing note


def _mlx_logits(model, prompt, canvas, sc=None, prefix_canvases=()):
    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    for c in prefix_canvases:
        model.encode(mx.array(c), cache)
    out = model.decode(mx.array(canvas), cache, None if sc is None else mx.array(sc))
    assert out.dtype == mx.float32
    return np.array(out)


def _check(name, ours, ref):
    diff = float(np.abs(ours - ref).max())
    WORST[name] = max(diff, WORST.get(name, 0.0))
    assert np.abs(ref).max() > 5, "logits too small to make the comparison meaningful"
    assert diff <= ATOL, f"{name}: max |logit diff| {diff:.2e} > {ATOL}"
    assert_argmax_where_certain(ours, ref, name)


@pytest.fixture(scope="module", params=["tiny", "mixed", "wide"])
def pair(request, ckpt_factory):
    from tiny_checkpoints import load_reference

    path = ckpt_factory(request.param)
    model, tok = load(path)
    return request.param, model, load_reference(path)


def _inputs(V, C, prompt_len, seed):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, V, (1, prompt_len))
    canvas = rng.integers(0, V, (1, C))
    sc = (rng.standard_normal((1, C, V)) * 4).astype(np.float32)
    return prompt, canvas, sc


def test_decoder_logits_without_self_conditioning(pair):
    name, model, ref = pair
    prompt, canvas, _ = _inputs(model.vocab_size, model.canvas_length, 5, 0)
    _check(
        f"{name}/no-sc",
        _mlx_logits(model, prompt, canvas),
        reference_decoder_logits(ref, prompt, canvas),
    )


def test_decoder_logits_with_self_conditioning(pair):
    name, model, ref = pair
    prompt, canvas, sc = _inputs(model.vocab_size, model.canvas_length, 5, 1)
    _check(
        f"{name}/sc",
        _mlx_logits(model, prompt, canvas, sc),
        reference_decoder_logits(ref, prompt, canvas, sc),
    )


def test_second_canvas_past_the_sliding_window(pair):
    """Prompt + a committed canvas encoded, context longer than the sliding window:
    where sliding-window handling in encoder and decoder goes wrong."""
    name, model, ref = pair
    V, C = model.vocab_size, model.canvas_length
    prompt, canvas, sc = _inputs(V, C, 11, 2)
    first = np.random.default_rng(3).integers(0, V, (1, C))
    assert prompt.shape[1] + C > model.args.sliding_window
    _check(
        f"{name}/2nd-canvas",
        _mlx_logits(model, prompt, canvas, sc, prefix_canvases=[first]),
        reference_decoder_logits(ref, prompt, canvas, sc, prefix_canvases=[first]),
    )


def test_encoder_cache_matches_transformers(pair):
    """Cached K/V per layer after a prompt and two canvases (the sliding layers hold the
    last window-1 tokens in the reference; our decoder view must be exactly that)."""
    name, model, ref = pair
    V, C = model.vocab_size, model.canvas_length
    ids = np.random.default_rng(4).integers(0, V, (1, 7 + 2 * C))
    chunks = [7, C, C]
    expected = reference_encoder_cache(ref, ids, chunks)
    cache = model.make_cache()
    start = 0
    for n in chunks:
        model.encode(mx.array(ids[:, start : start + n]), cache)
        start += n
    assert cache.offset == ids.shape[1]
    for i, (layer, (rk, rv)) in enumerate(zip(cache.layers, expected)):
        k, v = (np.array(a) for a in layer.view())
        assert k.shape == rk.shape, f"layer {i}: keys {k.shape} vs reference {rk.shape}"
        np.testing.assert_allclose(k, rk, atol=1e-4, err_msg=f"{name} layer {i} keys")
        np.testing.assert_allclose(v, rv, atol=1e-4, err_msg=f"{name} layer {i} values")


def test_chunked_prefill_equals_whole_prefill(ckpt_mixed):
    """The encoder's chunking (for bounded prefill memory) changes nothing but rounding."""
    model, _ = load(ckpt_mixed)
    V, C = model.vocab_size, model.canvas_length
    prompt, canvas, sc = _inputs(V, C, 37, 5)
    whole = model.make_cache()
    model.encode(mx.array(prompt), whole, chunk_size=None)
    chunked = model.make_cache()
    model.encode(mx.array(prompt), chunked, chunk_size=5)
    a = np.array(model.decode(mx.array(canvas), whole, mx.array(sc)))
    b = np.array(model.decode(mx.array(canvas), chunked, mx.array(sc)))
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_decode_does_not_touch_the_cache(ckpt_mixed):
    model, _ = load(ckpt_mixed)
    cache = model.make_cache()
    model.encode(mx.array([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]), cache)
    before = [np.array(a) for a in cache.state_arrays()]
    offset = cache.offset
    canvas = mx.array(np.arange(model.canvas_length)[None] % model.vocab_size)
    first = np.array(model.decode(canvas, cache))
    second = np.array(model.decode(canvas, cache))
    assert cache.offset == offset
    for a, b in zip(before, cache.state_arrays()):
        np.testing.assert_array_equal(a, np.array(b))
    np.testing.assert_array_equal(first, second)


def test_cache_trim_and_snapshot_restore(ckpt_mixed):
    """Trim back over recent tokens (within the slack) and snapshot/restore give the same
    logits as a cache that never held those tokens."""
    model, _ = load(ckpt_mixed)
    V, C = model.vocab_size, model.canvas_length
    rng = np.random.default_rng(6)
    base = rng.integers(0, V, (1, 20))
    extra = rng.integers(0, V, (1, 9))
    canvas = mx.array(rng.integers(0, V, (1, C)))
    clean = model.make_cache()
    model.encode(mx.array(base), clean)
    expected = np.array(model.decode(canvas, clean))

    trimmed = model.make_cache()
    model.encode(mx.array(base), trimmed)
    snap = trimmed.snapshot()
    model.encode(mx.array(extra), trimmed)
    assert trimmed.can_trim(9)
    trimmed.trim(9)
    assert trimmed.offset == 20
    np.testing.assert_allclose(np.array(model.decode(canvas, trimmed)), expected, atol=1e-5)

    model.encode(mx.array(extra), trimmed)
    trimmed.restore(snap)
    assert trimmed.offset == 20
    np.testing.assert_allclose(np.array(model.decode(canvas, trimmed)), expected, atol=1e-5)

    # Beyond the sliding layers' slack, trimming is refused with a clear message.
    no_slack = model.make_cache(slack=0)
    model.encode(mx.array(base), no_slack)
    assert not no_slack.can_trim(5)
    with pytest.raises(ValueError, match="sliding-window layers keep only"):
        no_slack.trim(5)


def test_report_worst_differences():
    """Prints the worst logit difference per shape/case (for the closing note)."""
    for k in sorted(WORST):
        print(f"worst |logit diff| {k}: {WORST[k]:.2e}")
    assert all(v <= ATOL for v in WORST.values())


def test_lanes_are_bit_identical_and_match_transformers(ckpt_factory):
    """The tokens split into lanes on separate streams (lanes.py): encoder cache and
    decoder logits bit-identical to one lane, for 2 and 3 lanes of >= 32 tokens, with the
    context past the sliding window, with and without self-conditioning; one lane and
    three held to transformers."""
    from tiny_checkpoints import load_reference

    import mlx_diffgemma.models.lanes as lanes_mod

    path = ckpt_factory("lanes")
    model, _ = load(path)
    ref = load_reference(path)
    V, C = model.vocab_size, model.canvas_length
    assert C == 3 * lanes_mod.MIN_LANE_TOKENS
    prompt, canvas, sc = _inputs(V, C, 70, 6)
    first = np.random.default_rng(7).integers(0, V, (1, C))
    runs = {}
    for n in (1, 2, 3):
        model.lanes = n
        try:
            lanes = model.lanes_for(C)
            assert len(lanes) == n and len({id(s) for _, _, s in lanes}) == n
            cache = model.make_cache()
            model.encode(mx.array(prompt), cache)
            model.encode(mx.array(first), cache)
            kv = [np.array(a) for a in cache.state_arrays()]
            plain = np.array(model.decode(mx.array(canvas), cache, None))
            cond = np.array(model.decode(mx.array(canvas), cache, mx.array(sc)))
        finally:
            model.lanes = None
        runs[n] = kv, plain, cond
    for n in (2, 3):
        for a, b in zip(runs[1][0], runs[n][0]):
            assert np.array_equal(a, b), f"{n} lanes: encoder cache differs"
        assert np.array_equal(runs[1][1], runs[n][1]), f"{n} lanes: logits differ"
        assert np.array_equal(runs[1][2], runs[n][2]), f"{n} lanes: self-conditioned logits differ"
    expected = reference_decoder_logits(ref, prompt, canvas, sc, prefix_canvases=[first])
    _check("lanes/2nd-canvas", runs[3][2], expected)

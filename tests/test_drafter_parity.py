"""The drafter held to the reference generate(), two ways.

1. Per-step replay (teacher forcing), on ordinary random checkpoints: the reference's
   recorded trajectory is fed step by step to our MLX denoiser; every decision (argmax,
   sample, acceptance, next canvas, stop) must be identical and the logits close.
2. Whole runs, token for token, on checkpoints whose self-conditioning output is scaled
   down (random weights otherwise amplify float rounding 5-10x per step): MLX drafter
   vs torch drafter, and torch drafter vs transformers' own generate() with its
   randomness replaced by the same noise. Tokens and steps per canvas identical.
   The scale is 0.02: measured on the "mixed" fixture (logits ~20), the MLX-vs-torch
   difference of the fed-back logits then stays flat near 3e-4 (max 1.1e-3) over 36
   steps, where 0.1 still let it grow ~2x per step and part the runs after ~25 steps
   (both float32 paths are within 3.2e-4 of a float64 run of the reference).
"""

import mlx.core as mx
import numpy as np
import pytest

import mlx_diffgemma as md
from hf_reference import hooked_generate
from mlx_diffgemma import torch_backend as tb
from mlx_diffgemma.config import GenerationConfig
from mlx_diffgemma.drafter import MLXDenoiser, Summary

STATS = {}  # for the closing note: steps per canvas and tokens per forward side by side


def _summary(events) -> Summary:
    events = list(events)
    assert isinstance(events[-1], Summary)
    return events[-1]


def _prompt(V, n, seed):
    return np.random.default_rng(seed).integers(3, V, n).tolist()


# -- 1. teacher-forced replay -------------------------------------------------------------


@pytest.mark.parametrize("shape", ["mixed", "wide"])
def test_per_step_replay_matches_reference(shape, ckpt_factory):
    from tiny_checkpoints import load_reference

    path = ckpt_factory(shape)
    ref = load_reference(path)
    model, _ = md.load(path)
    C, V = model.canvas_length, model.vocab_size
    prompt = _prompt(V, 13, 1)  # prompt + canvases run past the sliding window
    kw = dict(max_new_tokens=2 * C, max_denoising_steps=10, eos_token_id=None,
              stability_threshold=1, confidence_threshold=0.9)
    noise = md.SeededNoise(7)
    result = hooked_generate(ref, np.array([prompt]), noise, record=True, **kw)
    assert result.n_canvases == 2

    gen = GenerationConfig.from_model_dir(path, **kw)
    den = MLXDenoiser(model, gen, noise=noise)
    den.encode(prompt)
    worst = 0.0
    for ci in range(result.n_canvases):
        if ci:
            den.encode(result.committed(ci - 1, C)[0].tolist())
        recs = result.canvas_steps(ci)
        assert [r.step for r in recs][0] == 10
        start = den.start_canvas(ci)
        np.testing.assert_array_equal(np.array(start), result.init_canvases[ci])
        argmaxes = []
        for r in recs:
            # Feed the reference's inputs: canvas, self-conditioning logits, stop history.
            den._sc_logits = None if r.sc_logits_in is None else mx.array(r.sc_logits_in)
            den._history = None if not argmaxes else mx.array(np.stack(argmaxes[-1:]).astype(np.int32))
            nxt, argmax, accepted, stop = den.step(mx.array(r.canvas_in), ci, r.step)
            # The decoder logits of this step (processed = logits / temperature).
            raw = np.array(den._sc_logits) * np.float32(r.temperature)
            worst = max(worst, float(np.abs(raw - r.raw_logits).max()))
            np.testing.assert_allclose(raw, r.raw_logits, atol=1e-3)
            assert np.array(argmax).tolist() == r.argmax_canvas[0].tolist(), (ci, r.step)
            assert np.array(accepted).tolist() == r.accepted_mask[0].tolist(), (ci, r.step)
            np.testing.assert_array_equal(np.array(nxt), r.next_canvas, err_msg=f"{ci}/{r.step}")
            assert stop == bool(r.stop_fired[0]), (ci, r.step)
            argmaxes.append(r.argmax_canvas)
    STATS[f"replay/{shape} worst |logit diff|"] = worst


# -- 2. whole runs ------------------------------------------------------------------------

RUNS = [
    # (seed, prompt_len, canvases, kwargs)
    (0, 5, 3, dict(max_denoising_steps=12)),
    (1, 11, 3, dict(max_denoising_steps=12)),
    (2, 20, 2, dict(max_denoising_steps=20)),
    # Random weights never meet the released stopping rule: these stop data-dependently.
    (3, 9, 3, dict(max_denoising_steps=16, stability_threshold=0, confidence_threshold=0.9)),
    # Accept-everything at low temperature: the argmax canvas settles, so the stability
    # window (threshold 1) is exercised too.
    (4, 9, 3, dict(max_denoising_steps=16, stability_threshold=1, confidence_threshold=0.9,
                   entropy_bound=1e3, t_min=0.05, t_max=0.1)),
]


@pytest.fixture(scope="module")
def damped(ckpt_factory):
    from tiny_checkpoints import load_reference

    path = ckpt_factory("mixed", sc_down_scale=0.02)
    model, _ = md.load(path)
    tmodel, _ = tb.load(path, device="cpu")
    return path, model, tmodel, load_reference(path)


@pytest.mark.parametrize("seed, prompt_len, canvases, kw", RUNS)
def test_whole_runs_token_for_token(seed, prompt_len, canvases, kw, damped):
    path, model, tmodel, ref = damped
    C, V = model.canvas_length, model.vocab_size
    prompt = _prompt(V, prompt_len, 100 + seed)
    kw = dict(kw, max_new_tokens=canvases * C, eos_token_id=None)
    noise = md.SeededNoise(seed)

    ours = _summary(md.stream_generate(model, None, prompt, noise=noise, **kw))
    torch_ = _summary(tb.stream_generate(tmodel, None, prompt, noise=noise, **kw))
    reference = hooked_generate(ref, np.array([prompt]), noise, **kw)

    # (b) torch drafter vs transformers' generate()
    assert torch_.tokens == reference.tokens[0].tolist()
    assert torch_.steps_per_canvas == reference.steps_per_canvas
    assert torch_.tokens_per_forward == pytest.approx(float(reference.tokens_per_forward[0]))
    # (a) MLX drafter vs torch drafter
    assert ours.tokens == torch_.tokens
    assert ours.steps_per_canvas == torch_.steps_per_canvas
    assert ours.canvases == canvases
    if "stability_threshold" in kw:
        assert min(ours.steps_per_canvas) < kw["max_denoising_steps"], "expected an early stop"
    STATS[f"run seed {seed}"] = (
        f"steps/canvas MLX {ours.steps_per_canvas} transformers {reference.steps_per_canvas}; "
        f"tokens/forward MLX {ours.tokens_per_forward:.3f} transformers {float(reference.tokens_per_forward[0]):.3f}"
    )


@pytest.mark.parametrize("seed, prompt_len, canvases, kw", [RUNS[2], RUNS[3]])
def test_whole_runs_on_lanes_token_for_token(seed, prompt_len, canvases, kw, damped, monkeypatch):
    """The same runs with the canvas and the prompt split into two lanes on two streams
    (model.py; lanes shrunk to 8 tokens so the 16-token canvas splits): the tokens and the
    steps are transformers' still."""
    import mlx_diffgemma.model as M

    path, model, tmodel, ref = damped
    monkeypatch.setattr(M, "MIN_LANE_TOKENS", 8)
    monkeypatch.setattr(model, "lanes", 2)
    C, V = model.canvas_length, model.vocab_size
    assert len(model._lanes(C)) == 2
    prompt = _prompt(V, prompt_len, 100 + seed)
    kw = dict(kw, max_new_tokens=canvases * C, eos_token_id=None)
    noise = md.SeededNoise(seed)
    ours = _summary(md.stream_generate(model, None, prompt, noise=noise, **kw))
    reference = hooked_generate(ref, np.array([prompt]), noise, **kw)
    assert ours.tokens == reference.tokens[0].tolist()
    assert ours.steps_per_canvas == reference.steps_per_canvas


def test_eos_ends_generation_like_the_reference(damped):
    """With an EOS id that the model is sure to emit early, generation stops after that
    canvas, pads after the first EOS, and our tokens drop the padding."""
    path, model, tmodel, ref = damped
    C, V = model.canvas_length, model.vocab_size
    prompt = _prompt(V, 9, 55)
    noise = md.SeededNoise(5)
    kw = dict(max_new_tokens=4 * C, max_denoising_steps=8, eos_token_id=None)
    free = _summary(md.stream_generate(model, None, prompt, noise=noise, **kw))
    eos = free.tokens[C + 3]  # a token of the second canvas becomes "EOS"
    kw["eos_token_id"] = [eos]
    ours = _summary(md.stream_generate(model, None, prompt, noise=noise, **kw))
    reference = hooked_generate(ref, np.array([prompt]), noise, **kw)
    cut = free.tokens.index(eos) + 1
    assert ours.tokens == free.tokens[:cut]
    assert ours.finish_reason == "eos" and ours.canvases == cut // C + (cut % C > 0)
    ref_tokens = reference.tokens[0].tolist()
    assert ref_tokens[:cut] == ours.tokens
    assert all(t == 0 for t in ref_tokens[cut:])  # the reference pads with pad_token_id


def test_report_stats():
    for k, v in sorted(STATS.items()):
        print(f"{k}: {v}")

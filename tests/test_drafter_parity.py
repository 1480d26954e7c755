"""The drafter held to the reference generate(), two ways.

1. Teacher-forced replay (tests/teacher_forcing.py), wherever the two sides compute
   different floats (MLX vs torch, one lane vs two): the reference's recorded
   trajectory is fed step by step to our MLX denoiser; the logits must be close and
   every decision that the measured difference cannot flip (argmax, sample, acceptance,
   next canvas, stop) identical. Replay cannot compound a rounding difference, so it
   runs on ordinary random checkpoints too.
2. Whole runs, token for token, where both sides compute the same floats by
   construction: our torch drafter vs transformers' own generate() (same network, same
   torch ops, the context encoded in the same pieces) with its randomness replaced by
   the same noise. Tokens and steps per canvas identical. These run on checkpoints
   whose self-conditioning output is scaled down (0.02), so that the whole MLX runs
   printed beside them stay comparable to the reference's for the closing statistics.
"""

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import hooked_generate
from teacher_forcing import from_reference, recording, replay
from tiny_checkpoints import DRAFTER_RUNS, random_prompt

import mlx_diffgemma as md
from mlx_diffgemma import torch_backend as tb
from mlx_diffgemma.generation.denoiser import MLXDenoiser
from mlx_diffgemma.generation.events import Summary
from mlx_diffgemma.models.config import GenerationConfig

ATOL = 1e-3  # raw logits (~20); two float32 implementations land near 1e-4

STATS = {}  # for the closing note: steps per canvas and tokens per forward side by side


def _summary(events) -> Summary:
    events = list(events)
    assert isinstance(events[-1], Summary)
    return events[-1]


_prompt = random_prompt


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
    for ci in range(result.n_canvases):  # same noise, same starting canvas
        np.testing.assert_array_equal(np.array(den.start_canvas(ci)), result.init_canvases[ci])
    record = from_reference(result, prompt, C, gen.stability_threshold)
    report = replay(den, record, noise, from_numpy=mx.array)
    report.check(ATOL)
    assert report.steps == 2 * 10
    STATS[f"replay/{shape} worst |logit diff|"] = report.max_logit_diff


# -- 2. whole runs ------------------------------------------------------------------------

RUNS = DRAFTER_RUNS


@pytest.fixture(scope="module")
def damped(ckpt_factory):
    from tiny_checkpoints import load_reference

    path = ckpt_factory("mixed", sc_down_scale=0.02)
    model, _ = md.load(path)
    tmodel, _ = tb.load(path, device="cpu")
    return path, model, tmodel, load_reference(path)


@pytest.mark.parametrize("seed, prompt_len, canvases, kw", RUNS)
def test_whole_runs_token_for_token(seed, prompt_len, canvases, kw, damped, monkeypatch):
    path, model, tmodel, ref = damped
    C, V = model.canvas_length, model.vocab_size
    prompt = _prompt(V, prompt_len, 100 + seed)
    kw = dict(kw, max_new_tokens=canvases * C, eos_token_id=None)
    noise = md.SeededNoise(seed)

    with recording(monkeypatch, tb.TorchDenoiser) as torch_run:
        torch_ = _summary(tb.stream_generate(tmodel, None, prompt, noise=noise, **kw))
    reference = hooked_generate(ref, np.array([prompt]), noise, **kw)

    # (b) torch drafter vs transformers' generate(): the same floats, token for token
    assert torch_.tokens == reference.tokens[0].tolist()
    assert torch_.steps_per_canvas == reference.steps_per_canvas
    assert torch_.tokens_per_forward == pytest.approx(float(reference.tokens_per_forward[0]))
    assert torch_.canvases == canvases
    if "stability_threshold" in kw:
        assert min(torch_.steps_per_canvas) < kw["max_denoising_steps"], "expected an early stop"
    # (a) MLX drafter vs torch drafter: the torch run replayed on MLX, every encode,
    # step and stop of the loop included
    gen = GenerationConfig.from_model_dir(path, **kw)
    report = replay(MLXDenoiser(model, gen, noise=noise), torch_run, noise, from_numpy=mx.array)
    report.check(ATOL)
    assert report.steps == sum(torch_.steps_per_canvas)

    ours = _summary(md.stream_generate(model, None, prompt, noise=noise, **kw))
    STATS[f"run seed {seed}"] = (
        f"steps/canvas MLX {ours.steps_per_canvas} transformers {reference.steps_per_canvas}; "
        f"tokens/forward MLX {ours.tokens_per_forward:.3f} transformers {float(reference.tokens_per_forward[0]):.3f}; "
        f"replayed MLX-vs-torch worst |logit diff| {report.max_logit_diff:.2e}"
    )


@pytest.mark.parametrize("seed, prompt_len, canvases, kw", [RUNS[2], RUNS[3]])
def test_whole_runs_on_lanes_match_the_reference(seed, prompt_len, canvases, kw, damped, monkeypatch):
    """The reference's runs replayed with the canvas and the prompt split into two lanes
    on two streams (lanes.py; lanes shrunk to 8 tokens so the 16-token canvas splits)."""
    import mlx_diffgemma.models.lanes as lanes_mod

    path, model, tmodel, ref = damped
    monkeypatch.setattr(lanes_mod, "MIN_LANE_TOKENS", 8)
    monkeypatch.setattr(model, "lanes", 2)
    C, V = model.canvas_length, model.vocab_size
    assert len(model.lanes_for(C)) == 2
    prompt = _prompt(V, prompt_len, 100 + seed)
    kw = dict(kw, max_new_tokens=canvases * C, eos_token_id=None)
    noise = md.SeededNoise(seed)
    reference = hooked_generate(ref, np.array([prompt]), noise, record=True, **kw)
    gen = GenerationConfig.from_model_dir(path, **kw)
    record = from_reference(reference, prompt, C, gen.stability_threshold)
    report = replay(MLXDenoiser(model, gen, noise=noise), record, noise, from_numpy=mx.array)
    report.check(ATOL)
    assert report.steps == sum(reference.steps_per_canvas)


def test_eos_ends_generation_like_the_reference(damped):
    """With an EOS id that the model is sure to emit early, generation stops after that
    canvas, pads after the first EOS, and our tokens drop the padding."""
    path, model, tmodel, ref = damped
    C, V = model.canvas_length, model.vocab_size
    prompt = _prompt(V, 9, 55)
    noise = md.SeededNoise(5)
    kw = dict(max_new_tokens=4 * C, max_denoising_steps=8, eos_token_id=None)
    # Each side picks a token of its own second canvas as "EOS" and is held to its own
    # free run (same floats up to the EOS canvas); the torch drafter is held to
    # generate() under the same EOS (same floats), and pads where the reference pads.
    for name, run in (
        ("mlx", lambda **k: md.stream_generate(model, None, prompt, noise=noise, **k)),
        ("torch", lambda **k: tb.stream_generate(tmodel, None, prompt, noise=noise, **k)),
    ):
        free = _summary(run(**kw))
        eos = free.tokens[C + 3]
        ours = _summary(run(**dict(kw, eos_token_id=[eos])))
        cut = free.tokens.index(eos) + 1
        assert ours.tokens == free.tokens[:cut], name
        assert ours.finish_reason == "eos" and ours.canvases == cut // C + (cut % C > 0), name
        if name == "torch":
            reference = hooked_generate(ref, np.array([prompt]), noise, **dict(kw, eos_token_id=[eos]))
            ref_tokens = reference.tokens[0].tolist()
            assert ref_tokens[:cut] == ours.tokens
            assert all(t == 0 for t in ref_tokens[cut:])  # the reference pads with pad_token_id


def test_report_stats():
    for k, v in sorted(STATS.items()):
        print(f"{k}: {v}")

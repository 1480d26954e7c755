"""In-line editing (editing.py): the span to rewrite found or refused by message; the
canvas starts from the old span with round(strength x n) positions drawn as noise (those
with the smallest init ids); anchored positions go back to their old token when renoised;
MLX holds to the torch path under shared noise (teacher-forced); on the toy Sudoku model
a wrong span of an answer is rewritten into the solution."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from teacher_forcing import Start, recording, replay

import mlx_diffgemma as md
from mlx_diffgemma import torch_backend as tb
from mlx_diffgemma.generation.denoiser import MLXDenoiser
from mlx_diffgemma.generation.editing import find_span
from mlx_diffgemma.generation.fixed import check_fixed
from mlx_diffgemma.models.config import GenerationConfig
from mlx_diffgemma.models.paths import ASSETS_DIR
from mlx_diffgemma.models.tokenizer import render

ASSET = ASSETS_DIR / "toy-sudoku"


@pytest.mark.parametrize("span, old, message", [
    (None, None, r"give the span to rewrite as span=\(start, end\) or as old="),
    ((0, 2), "ab", "give the span to rewrite"),
    (None, "b", "'b' occurs 2 times in the text; an edit needs it exactly once"),
    (None, "zz", "'zz' occurs 0 times"),
    ((3, 2), None, r"span \(3, 2\) must be character offsets 0 <= start <= end <= 6"),
    ((0, 9), None, "must be character offsets"),
])
def test_the_span_is_found_or_refused_by_message(span, old, message):
    with pytest.raises(ValueError, match=message):
        find_span("abcabx", span, old)


def test_find_span_by_old_text():
    assert find_span("abcdef", None, "cd") == (2, 4) and find_span("abcdef", (1, 1), None) == (1, 1)


@pytest.fixture(scope="module")
def toy():
    return md.load(ASSET / "mlx")


def test_bad_edits_are_refused_by_message(toy):
    model, tok = toy
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\] \(got 1.5\)"):
        md.edit(model, tok, "ab1234", span=(2, 4), strength=1.5)
    with pytest.raises(ValueError, match="the span starts the text; give an instruction"):
        md.edit(model, tok, "1234", span=(0, 2))


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5, 1.0])
def test_the_start_canvas_keeps_the_old_span_but_the_noised_fraction(toy, strength):
    model, tok = toy
    C, V = model.canvas_length, model.vocab_size
    old = {3 + i: 40 + i for i in range(8)}
    fixed = check_fixed({12: 44, 13: 45}, canvas_length=C, max_new_tokens=C, vocab_size=V,
                        eos_token_id=[1, 5], pad_token_id=0)
    from dataclasses import replace

    cf = replace(fixed, start=old, strength=strength).canvas(0)
    noise = md.SeededNoise(2)
    gen = GenerationConfig(max_new_tokens=C, eos_token_id=[1, 5])
    den = MLXDenoiser(model, gen, noise=noise)
    den.encode([2, 4, 10, 11])
    init = noise.init_canvas(0, (1, C), V)[0]
    canvas = np.array(den.start_canvas(0, cf))[0]
    span = np.arange(3, 11)
    noised = span[np.argsort(init[span], kind="stable")[: round(strength * 8)]]
    kept = np.setdiff1d(span, noised)
    assert (canvas[kept] == [old[p] for p in kept]).all() and (canvas[noised] == init[noised]).all()
    assert canvas[12] == 44 and canvas[13] == 45
    rest = np.setdiff1d(np.arange(C), np.concatenate([span, [12, 13]]))
    assert (canvas[rest] == init[rest]).all()
    # Anchored: a kept position that the step does not accept goes back to its old token.
    nxt, _, accepted, _ = den.step(mx.array(canvas[None]), 0, 48)
    nxt, accepted = np.array(nxt)[0], np.array(accepted)
    renoise = noise.renoise(0, 48, (1, C), V)[0]
    for p in range(C):
        if not accepted[p]:
            want = old[p] if p in kept else renoise[p]
            assert nxt[p] == want, p


def test_mlx_replays_the_torch_edit(ckpt_factory, monkeypatch):
    path = ckpt_factory("mixed", sc_down_scale=0.02)
    model, tok = md.load(path)
    tmodel, ttok = tb.load(path, device="cpu")
    text = "hello there, general kenobi"
    kw = dict(max_denoising_steps=12, eos_token_id=[9], noise=md.SeededNoise(5))
    with recording(monkeypatch, tb.TorchDenoiser) as torch_run:
        summary = list(tb.stream_edit(tmodel, ttok, text, old="general", strength=0.5, **kw))[-1]
    assert any(isinstance(r, Start) and r.fixed.start is not None for r in torch_run)
    assert summary.length == len(tok.encode("general", add_special_tokens=False))
    gen = GenerationConfig.from_model_dir(path, max_new_tokens=model.canvas_length, eos_token_id=[9],
                                          max_denoising_steps=12)
    report = replay(MLXDenoiser(model, gen, noise=kw["noise"]), torch_run, kw["noise"], from_numpy=mx.array)
    report.check(1e-3)
    assert report.steps == summary.steps_per_canvas[0]


@pytest.mark.parametrize("mode, strengths", [("reference", (0.0, 0.5, 1.0)), ("fast", (1.0,))])
def test_the_toy_rewrites_a_wrong_span_into_the_solution(toy, mode, strengths):
    """Reference mode at every strength (anchored tokens change where the model is sure);
    fast mode renoises nothing, so a wrong start can stay frozen: it is held to infill."""
    model, tok = toy
    test = json.loads((ASSET / "testset.json").read_text())["test"]
    for i, item in enumerate(test[::100][:5]):
        g = item["grid"]
        prompt = render(tok, [{"role": "user", "content": item["puzzle"]}], True)
        wrong = g[:4] + "".join("1" if c != "1" else "2" for c in g[4:8]) + g[8:]
        for strength in strengths:
            out = md.edit(model, tok, prompt + wrong, span=(len(prompt) + 4, len(prompt) + 8),
                          strength=strength, noise=md.SeededNoise(i), mode=mode)
            assert out == prompt + g, (item, strength)

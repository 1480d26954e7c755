"""Infill (infilling.py): the canvas holds the reply's start and the suffix fixed around
the middle, every candidate length starts from the same encoded context, the model's own
score picks the length (ties to the shorter), and on the toy Sudoku model the search
finds the true hole length and completes the grid, on MLX (both modes) and on torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_diffgemma as md
from mlx_diffgemma import torch_backend as tb
from mlx_diffgemma.generation.denoiser import MLXDenoiser
from mlx_diffgemma.generation.events import Commit, Draft
from mlx_diffgemma.generation.infilling import InfillSummary, Scored, plan, score_of
from mlx_diffgemma.models.paths import ASSETS_DIR

ASSET = ASSETS_DIR / "toy-sudoku"


@pytest.fixture(scope="module")
def toy():
    model, tok = md.load(ASSET / "mlx")
    return model, tok


@pytest.fixture(scope="module")
def easy():
    """Held-out test puzzles with 4 blanks (unique solution)."""
    test = json.loads((ASSET / "testset.json").read_text())["test"]
    return [p for p in test if p["blanks"] == 4][:8]


def _chat(puzzle):
    return [{"role": "user", "content": puzzle}]


# -- layout and errors ----------------------------------------------------------------------


def test_plan_places_whole_canvases_of_the_reply_start_in_the_prompt():
    lay = plan([9, 9], list(range(10, 40)), [5, 6], canvas_length=24, cap=24, lengths=[3, 4])
    assert lay.prompt == [9, 9] + list(range(10, 34)) and lay.head == list(range(34, 40))
    assert lay.fixed(3) == {**{i: 34 + i for i in range(6)}, 9: 5, 10: 6}
    assert lay.scored(3) == [6, 7, 8, 9, 10]
    assert score_of([-1.0, -2.0, -3.0, -6.0], 2) == -3.0 and score_of([-1.0, -2.0, -3.0, -6.0], 2, "sum") == -12.0
    assert score_of([-1.0, -2.0, -3.0, -6.0], 2, "suffix") == -4.5


def test_default_lengths_fit_beside_the_suffix():
    assert plan([1], [], [5] * 4, canvas_length=24, cap=24).lengths == [4, 8, 16]
    assert plan([1], [], [5] * 4, canvas_length=24, cap=6).lengths == [4]
    assert plan([1], [], [5] * 4, canvas_length=24, cap=3).lengths == [3]


@pytest.mark.parametrize("kw, message", [
    (dict(suffix=[5] * 30), "the suffix is 30 tokens; a 24-token canvas holds at most 16 beside a middle "
                            "of up to 8: shorten it, lower the lengths, or pass truncate_suffix=True"),
    (dict(suffix=[5] * 20, lengths=8, head=[3]),
     "holds at most 15 beside the reply's first 1 tokens and a middle of up to 8"),
    (dict(suffix=[5], lengths=30), "a middle of up to 24 tokens does not fit a 24-token canvas beside"),
    (dict(suffix=[5], lengths=[0, 3]), r"infill lengths must be positive token counts \(got \[0, 3\]\)"),
    (dict(suffix=[5], lengths="8"), "infill lengths must be positive token counts"),
])
def test_bad_infills_are_refused_by_message(kw, message):
    head = kw.pop("head", [])
    with pytest.raises(ValueError, match=message):
        plan([1], head, canvas_length=24, cap=24, **kw)


def test_a_long_suffix_is_cut_to_its_head_on_request():
    lay = plan([1], [], list(range(10, 40)), canvas_length=24, cap=24, lengths=8, truncate_suffix=True)
    assert lay.suffix == list(range(10, 26)) and lay.suffix_dropped == 14


def test_an_unknown_score_rule_is_refused(toy):
    model, tok = toy
    with pytest.raises(ValueError, match="score must be one of mean, sum, suffix"):
        md.infill(model, tok, "1234", "1", messages=_chat("." * 16), score="max")


# -- the search -------------------------------------------------------------------------------


def test_every_candidate_starts_from_the_same_context_with_the_suffix_in_place(toy, easy, monkeypatch):
    model, tok = toy
    item = easy[0]
    g = item["grid"]
    starts = []
    start = MLXDenoiser.start_canvas

    def spy(self, k, fixed=None):
        canvas = start(self, k, fixed)
        starts.append((self.cached_tokens, canvas.tolist()[0]))
        return canvas

    monkeypatch.setattr(MLXDenoiser, "start_canvas", spy)
    head, suffix = tok.encode(g[:4], add_special_tokens=False), tok.encode(g[12:], add_special_tokens=False)
    events = list(md.stream_infill(model, tok, g[:4], g[12:], messages=_chat(item["puzzle"]),
                                   lengths=[6, 7, 8, 9, 10], noise=md.SeededNoise(0)))
    summary = events[-1]
    assert isinstance(summary, InfillSummary)
    assert len(starts) == 5 and len({c for c, _ in starts}) == 1  # the cache is the same for all
    for (_, canvas), n in zip(starts, [6, 7, 8, 9, 10]):
        assert canvas[:4] == head and canvas[4 + n:8 + n] == suffix
    for ev in events:
        if isinstance(ev, Draft):
            n = ev.candidate
            assert ev.tokens[:4] == head and ev.tokens[4 + n:8 + n] == suffix
            assert ev.fixed == [i < 4 or 4 + n <= i < 8 + n for i in range(24)]
            assert all(ev.accepted[i] for i in range(24) if ev.fixed[i])
    scored = [e for e in events if isinstance(e, Scored)]
    assert [s.length for s in scored] == [6, 7, 8, 9, 10]
    for s in scored:  # the middle's and the suffix's log-probabilities, their mean the score
        assert len(s.logprobs) == s.length + 4 and s.score == pytest.approx(np.mean(s.logprobs))
    assert summary.scores == {s.length: s.score for s in scored}
    best = max(summary.scores, key=lambda n: (summary.scores[n], -n))
    assert summary.length == best == 8
    assert summary.forwards == sum(s.steps + 1 for s in scored)
    commits = [e for e in events if isinstance(e, Commit)]
    assert len(commits) == 1 and commits[0].text == summary.text == g[4:12]


def test_ties_go_to_the_shorter_length(toy, easy, monkeypatch):
    model, tok = toy
    monkeypatch.setattr(MLXDenoiser, "score", lambda self, canvas, positions: [0.0] * len(positions))
    summary = list(md.stream_infill(model, tok, "12", "4", messages=_chat(easy[0]["puzzle"]),
                                    lengths=[9, 5, 7], noise=md.SeededNoise(0)))[-1]
    assert summary.length == 5 and sorted(summary.scores) == [5, 7, 9]


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_the_toy_infill_finds_the_hole_and_completes_the_grid(toy, easy, mode):
    model, tok = toy
    for i, item in enumerate(easy):
        g = item["grid"]
        summary = list(md.stream_infill(model, tok, g[:4], g[12:], messages=_chat(item["puzzle"]),
                                        lengths=range(6, 11), noise=md.SeededNoise(i), mode=mode))[-1]
        assert summary.length == 8, (item, summary.scores)
        assert g[:4] + summary.text + g[12:] == g


def test_default_lengths_search_then_refine(toy, easy):
    model, tok = toy
    g = easy[1]["grid"]
    summary = list(md.stream_infill(model, tok, g[:4], g[12:], messages=_chat(easy[1]["puzzle"]),
                                    noise=md.SeededNoise(0)))[-1]
    assert sorted(summary.scores) == [4, 6, 8, 10, 16]  # {4, 8, 16}, then 0.75x and 1.25x of 8
    assert summary.length == 8 and summary.text == g[4:12]


def test_raw_infill_encodes_the_prefix_as_the_prompt(toy, easy):
    from mlx_diffgemma.models.tokenizer import render

    model, tok = toy
    item = easy[2]
    raw = render(tok, _chat(item["puzzle"]), True)
    text = md.infill(model, tok, raw, item["grid"][8:], lengths=[6, 7, 8, 9, 10], noise=md.SeededNoise(0))
    assert text == item["grid"][:8]


def test_torch_infill_agrees_with_mlx(toy, easy):
    model, tok = toy
    tmodel, ttok = tb.load(ASSET / "hf", device="cpu")
    for i, item in enumerate(easy[:3]):
        g = item["grid"]
        kw = dict(messages=_chat(item["puzzle"]), lengths=[6, 8, 10], noise=md.SeededNoise(i))
        ours = list(md.stream_infill(model, tok, g[:4], g[12:], **kw))[-1]
        theirs = list(tb.stream_infill(tmodel, ttok, g[:4], g[12:], **kw))[-1]
        assert (ours.length, ours.text) == (theirs.length, theirs.text) == (8, g[4:12])
        for n in ours.scores:
            assert ours.scores[n] == pytest.approx(theirs.scores[n], abs=1e-3)


def test_bench_sets_are_unseen_and_the_fixed_rows_keep_the_givens():
    import bench_infill
    import toy_testsets
    import train_toy

    hard = bench_infill.hard_set(per_grid=1)
    seen = {it["puzzle"] for t in ("toy-sudoku", "toy-sudoku-open")
            for s in ("tune", "test") for it in toy_testsets.load(t)[s]}
    maker = train_toy.PuzzleMaker()
    assert hard and all(it["puzzle"] not in seen and maker.n_solutions(it["puzzle"]) == 1 for it in hard)
    assert {it["blanks"] for it in hard} == {11, 12}
    table = bench_infill.run_set("toy-sudoku-open", bench_infill.templates(per_grid=1)[:3], "template",
                                 ["reference", "fast"], range(1), rows=("blank+fixed",))
    assert all(cell["n"] == 3 and cell["changed"] == 0 for cell in table.values())

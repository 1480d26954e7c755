"""The shipped `toy-sudoku-open` model: 4x4 Sudoku with 11-16 blanks (most puzzles have
several solutions; any valid grid keeping the givens is right), answered on 12-token
canvases, so the 16 digits and EOS span two canvases and the reference sampler needs many
steps per canvas (the testbed fast mode is measured on).

Held out by solution grid (as toy-sudoku). Our runtime and transformers sample with
different randomness, so their solve rates are compared with a tolerance, never token
for token; the conversion is held to the HF checkpoint exactly (same weights, same
code, same floats)."""

from __future__ import annotations

import json
from pathlib import Path

import eval_toy
import mlx.core as mx
import numpy as np
import pytest
from train_toy import get_task

import mlx_diffgemma as md
from mlx_diffgemma.models.paths import ASSETS_DIR, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # evaluates the toy model against transformers

DIR = ASSETS_DIR / "toy-sudoku-open"
HF_DIR, MLX_DIR = DIR / "hf", DIR / "mlx"
TASK = get_task("sudoku-open")


def test_name_resolves_and_conversion_matches_the_checkpoint():
    assert resolve_model_path("toy-sudoku-open") == MLX_DIR
    a, _ = md.load(MLX_DIR)
    b, _ = md.load(HF_DIR)
    assert a.canvas_length == 12
    ids = mx.array([[2, 4, 10, 11, 12, 13]])
    canvas = mx.array(np.arange(12)[None] % a.vocab_size)
    ca, cb = a.make_cache(), b.make_cache()
    a.encode(ids, ca)
    b.encode(ids, cb)
    np.testing.assert_array_equal(np.array(a.decode(canvas, ca)), np.array(b.decode(canvas, cb)))


def test_checker_accepts_any_valid_completion():
    item = {"puzzle": "1..........3....", "solution": "1234341221434321"}
    assert TASK.check(item, "1234341221434321")  # another valid grid with the givens
    assert not TASK.check(item, "1234341221434312")  # not a grid
    assert not TASK.check(item, "2134341243212143")  # breaks a given


def test_solves_heldout_like_transformers_in_many_steps_over_two_canvases():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(HF_DIR))
    held = json.loads((HF_DIR / "heldout.json").read_text())["puzzles"][::4]  # 60 of 240
    max_new = eval_toy.default_max_new_tokens(held, TASK.canvas_length)
    results = {name: eval_toy.evaluate(eval_toy.BACKENDS[name](HF_DIR, 0), tok, held,
                                       TASK.canvas_length, max_new, TASK)
               for name in ("mlx", "transformers")}
    ours, ref = results["mlx"], results["transformers"]
    print(f"toy-sudoku-open held-out subset: {json.dumps(results)}")
    assert ours["solve_rate"] >= 0.75 and abs(ours["solve_rate"] - ref["solve_rate"]) <= 0.10
    # The testbed's point: many steps per canvas, two canvases, EOS in the second.
    assert ours["mean_steps_per_canvas"] >= 6 and ref["mean_steps_per_canvas"] >= 6
    assert ours["canvases_per_answer"] == 2 and ours["eos_ended"] >= 0.95

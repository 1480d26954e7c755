"""The shipped toy model: a tiny DiffusionGemma trained on 4x4 Sudoku (scripts/train_toy.py).

Unlike random-weight checkpoints it converges, so these tests see real denoising
dynamics: adaptive stopping fires, EOS ends generation, and solve rates can be compared
between our MLX drafter and transformers' own generate().
"""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_diffgemma as md
from mlx_diffgemma.generation.loop import run_to_summary
from mlx_diffgemma.models.paths import ASSETS_DIR, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
import eval_toy  # noqa: E402
from train_toy import prompt_ids, solves  # noqa: E402

pytestmark = pytest.mark.slow  # trains and evaluates the toy model

ASSET = ASSETS_DIR / "toy-sudoku"
HF_DIR, MLX_DIR = ASSET / "hf", ASSET / "mlx"


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(HF_DIR))


@pytest.fixture(scope="module")
def heldout():
    puzzles = json.loads((HF_DIR / "heldout.json").read_text())["puzzles"]
    assert len(puzzles) >= 200
    return puzzles[:200]


def test_name_resolves_to_the_shipped_mlx_conversion():
    assert resolve_model_path("toy-sudoku") == MLX_DIR


def test_mlx_conversion_matches_the_hf_checkpoint():
    a, _ = md.load(MLX_DIR)
    b, _ = md.load(HF_DIR)
    ids = mx.array([[2, 4, 10, 11, 12, 13]])
    canvas = mx.array(np.arange(a.canvas_length)[None] % a.vocab_size)
    ca, cb = a.make_cache(), b.make_cache()
    a.encode(ids, ca)
    b.encode(ids, cb)
    np.testing.assert_array_equal(np.array(a.decode(canvas, ca)), np.array(b.decode(canvas, cb)))


def test_chat_template_gives_the_trained_prompt(hf_tokenizer):
    """What the chat REPL sends (our tokenizer + the asset's template) is exactly the
    prompt the model was trained on."""
    _, tok = md.load(MLX_DIR)
    puzzle = "1.3.34..2.4.4.1."
    ours = tok.apply_chat_template([{"role": "user", "content": puzzle}], add_generation_prompt=True)
    assert list(ours) == prompt_ids(hf_tokenizer, puzzle)
    assert tok.eos_token_ids == {1, 5} or sorted(tok.eos_token_ids) == [1, 5]


def test_solves_heldout_like_transformers(hf_tokenizer, heldout):
    """200 held-out puzzles (solution grids never seen in training), the default
    (reference) sampler from generation_config.json, both backends measured here."""
    canvas = json.loads((HF_DIR / "config.json").read_text())["canvas_length"]
    results = {}
    for name in ("mlx", "transformers"):
        solve = eval_toy.BACKENDS[name](HF_DIR, seed=0)
        results[name] = eval_toy.evaluate(solve, hf_tokenizer, heldout, canvas, 2 * canvas)
    mlx_r, ref_r = results["mlx"], results["transformers"]
    print(f"toy-sudoku held-out: {json.dumps(results)}")
    assert mlx_r["solve_rate"] >= 0.90
    assert abs(mlx_r["solve_rate"] - ref_r["solve_rate"]) <= 0.03
    # Adaptive stopping fires: far fewer steps than the 48 allowed, on both.
    assert mlx_r["mean_steps_per_canvas"] < 8 and ref_r["mean_steps_per_canvas"] < 8
    # EOS ends generation: one canvas although max_new_tokens allowed two.
    assert mlx_r["eos_ended"] >= 0.95 and ref_r["eos_ended"] >= 0.95
    assert abs(mlx_r["tokens_per_forward"] - ref_r["tokens_per_forward"]) < 1.0


def test_stream_reports_early_stop_and_eos(hf_tokenizer):
    model, tok = md.load(MLX_DIR)
    puzzle = "1.3.34..2.4.4.1."
    events = list(md.stream_generate(model, tok, prompt_ids(hf_tokenizer, puzzle), seed=1,
                                     max_new_tokens=3 * model.canvas_length))
    summary = events[-1]
    drafts = [e for e in events if e.kind == "draft"]
    assert summary.finish_reason == "eos" and summary.canvases == 1
    assert len(drafts) == summary.steps_per_canvas[0] < 48
    assert summary.tokens[-1] == 5 and len(summary.tokens) == 17  # 16 digits + <turn|>
    assert solves(puzzle, summary.text)
    assert summary.tokens_per_forward == pytest.approx(17 / len(drafts))


def test_training_script_smoke_run(tmp_path):
    """A few training steps end in a checkpoint our runtime loads and runs."""
    out = tmp_path / "toy"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_toy.py"), "--smoke", "--out", str(out), "--seed", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    model, tok = md.load(out)
    s = run_to_summary(md.stream_generate(model, tok, "1.3.", max_denoising_steps=2, seed=0))
    assert s.canvases >= 1 and len(s.steps_per_canvas) == s.canvases


def test_chat_without_history_solves_puzzle_after_puzzle():
    """`mlx-diffgemma chat --model toy-sudoku --no-history`: each puzzle is sent as a
    fresh conversation (the model was trained single-turn), reusing the cached
    `<bos><|turn>user\\n` prefix."""
    from mlx_diffgemma.chat.session import ChatSession

    model, tok = md.load(MLX_DIR)
    session = ChatSession(model, tok, seed=0, keep_history=False)
    for puzzle in ("1.3.34..2.4.4.1.", "..3.3...2..44...", "1..2....3..4..1."):
        summary = [e for e in session.send(puzzle) if getattr(e, "kind", None) == "summary"][0]
        assert solves(puzzle, summary.text), (puzzle, summary.text)
    assert len(session.messages) == 6  # the transcript keeps every turn
    assert session.turns[-1].reused > 0

"""The multi-canvas toy task of scripts/train_toy.py (``--task narayana``): Narayana's
cows sequence mod 10, whose answers (59 characters plus EOS) span two 32-token canvases.

No trained model is shipped for it yet (see the training script's docstring), so these
tests cover the task definition, the held-out split, the evaluation plumbing for
multi-canvas answers, and a smoke run of the multi-canvas objective whose checkpoint our
runtime loads and runs across canvases.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_diffgemma as md
from mlx_diffgemma.generation.loop import run_to_summary

ROOT = Path(__file__).resolve().parents[1]
import eval_toy  # noqa: E402
from train_toy import get_task, narayana_terms, normalize_seeds  # noqa: E402

pytestmark = pytest.mark.slow  # trains and evaluates the toy model

TASK = get_task("narayana")


def test_sequence_and_prompt_format():
    assert narayana_terms("3 7 1") == "4 1 2 6 7 9 5 2 1 6 8 9 5 3 2 7 0 2 9 9 1 0 9 0 0 9 9 9 8 7"
    assert normalize_seeds("3,7, 1") == normalize_seeds("371") == "3 7 1"
    with pytest.raises(ValueError):
        normalize_seeds("3 7")
    answer = narayana_terms("0 0 1")
    assert len(answer) == 59 and TASK.canvas_length < len(answer) + 1 <= 2 * TASK.canvas_length


def test_heldout_split_by_starting_triple():
    train, held = TASK.split(0)
    assert len(held) == 240 and len(train) == 760
    assert not {h["puzzle"] for h in held} & set(train)
    assert all(h["solution"] == narayana_terms(h["puzzle"]) for h in held)
    assert TASK.split(0) == (train, held)  # derived from the seed alone


def test_multi_canvas_evaluation_counts_canvases_and_eos(tmp_path):
    """evaluate() on a fake backend that answers correctly in two canvases (EOS at the
    end of the answer, pad after it) and on one that never stops."""
    import train_toy

    tok = train_toy.build_tokenizer(tmp_path)
    items = [{"puzzle": "3 7 1", "solution": narayana_terms("3 7 1")}]
    C = TASK.canvas_length
    right = train_toy.canvas_ids(tok, items[0]["solution"], C)
    r = eval_toy.evaluate(lambda ids, n: (right, 9.0), tok, items, C, 3 * C, TASK)
    assert r["solve_rate"] == 1 and r["eos_ended"] == 1 and r["canvases_per_answer"] == 2
    assert r["mean_steps_per_canvas"] == 9.0
    never = [tok.convert_tokens_to_ids("1")] * (3 * C)
    r = eval_toy.evaluate(lambda ids, n: (never, 48.0), tok, items, C, 3 * C, TASK)
    assert r["solve_rate"] == 0 and r["eos_ended"] == 0 and r["canvases_per_answer"] == 3
    assert eval_toy.default_max_new_tokens(items, C) == 3 * C


def test_training_script_smoke_run(tmp_path):
    """A few steps of the multi-canvas objective end in a checkpoint our runtime loads
    and runs over several canvases."""
    out = tmp_path / "toy"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_toy.py"), "--task", "narayana", "--smoke",
         "--out", str(out), "--seed", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["canvas_length"] == 32
    assert json.loads((out / "heldout.json").read_text())["task"] == "narayana"
    model, tok = md.load(out)
    s = run_to_summary(md.stream_generate(model, tok, "1 2 3", max_denoising_steps=2, seed=0,
                                          max_new_tokens=2 * model.canvas_length))
    assert s.canvases >= 1 and len(s.steps_per_canvas) == s.canvases

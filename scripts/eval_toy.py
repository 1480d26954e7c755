#!/usr/bin/env python
"""Evaluate a toy DiffusionGemma (4x4 Sudoku or Narayana's sequence mod 10) on its held-out prompts.

``python scripts/eval_toy.py --model DIR [--n 200] [--backend transformers] [--seed 0]``

DIR is a checkpoint written by ``scripts/train_toy.py`` (HF format plus ``heldout.json``),
e.g. ``mlx_diffgemma/assets/toy-sudoku/hf`` or ``mlx_diffgemma/assets/toy-narayana/hf``; the
task is read from ``heldout.json`` (``"task"``, absent = sudoku). For the Sudoku model,
for each backend it reports:

* solve rate: the first 16 committed tokens are digits forming a valid grid that agrees
  with the givens (puzzles have unique solutions, so this is "solved");
* mean denoising steps per canvas (decoder forwards / canvases; the sampler maximum is 48);
* tokens per forward, transformers' definition: non-pad generated tokens / decoder forwards;
* EOS ended: the generation stopped after ONE canvas although ``max_new_tokens`` allowed
  two (default ``--max-new-tokens`` = 2 x canvas_length), with the first EOS at index 16 and
  only pad after it.

For the Narayana-sequence model (answers span two canvases) the solve rate is exact match of the
text before the first EOS; steps per canvas are averaged over the canvases of each answer
and then over answers; "canvases per answer" counts the generated canvases; "EOS ended"
means the first EOS sits right after the answer, generation stopped with the canvas that
holds it although ``max_new_tokens`` (default: one canvas more than the longest answer
needs) allowed another, and only pad follows it.

Backends
--------
A backend is a factory ``make(model_dir, seed) -> solve`` where
``solve(prompt_ids: list[int], max_new_tokens: int) -> (tokens, steps_per_canvas)``;
``tokens`` are the generated ids after the prompt (the reference post-processing applied:
pad after the first EOS), ``steps_per_canvas`` the mean number of decoder forwards per
generated canvas. Register it in ``BACKENDS`` and it becomes a column of the report.
``transformers`` is the reference ``DiffusionGemmaForBlockDiffusion.generate``; ``mlx`` is
this package's drafter (``mlx_diffgemma.stream_generate``) on the MLX conversion (a
directory's ``../mlx`` sibling when DIR is the shipped ``hf`` folder, else DIR itself).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_toy import EOS, TURN_CLOSE, get_task, prompt_ids, solves  # noqa: E402

Solve = Callable[[list, int], "tuple[list[int], float]"]


def make_transformers_backend(model_dir: Path, seed: int) -> Solve:
    """Reference backend: transformers' own ``generate()`` with the checkpoint's
    ``generation_config.json`` (released-default sampler), one puzzle per call."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    # "eager" experts: the default grouped_mm kernel is much slower on CPU; same math.
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(model_dir), experts_implementation="eager")
    model.eval()
    calls = [0]
    model.model.decoder.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    canvas = model.config.canvas_length

    def solve(ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        calls[0] = 0
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, return_dict_in_generate=True
        )
        new = out.sequences[0, len(ids) :].tolist()
        n_canvases = math.ceil(len(new) / canvas)
        # cross-check the forward count against transformers' own tokens_per_forward
        pad = model.generation_config.pad_token_id
        valid = sum(1 for t in new if t != pad)
        tpf = float(out.tokens_per_forward[0])
        assert valid == 0 or abs(valid / calls[0] - tpf) < 1e-6, (valid, calls[0], tpf)
        return new, calls[0] / n_canvases

    return solve


def make_mlx_backend(model_dir: Path, seed: int) -> Solve:
    """This package's drafter on MLX, with the checkpoint's generation_config.json."""
    import mlx.core as mx

    import mlx_diffgemma as md
    from mlx_diffgemma.generation.loop import run_to_summary

    mlx_dir = model_dir.parent / "mlx" if (model_dir.parent / "mlx").is_dir() else model_dir
    model, _ = md.load(mlx_dir)
    mx.random.seed(seed)
    canvas = model.canvas_length

    def solve(ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        s = run_to_summary(md.stream_generate(model, None, ids, max_new_tokens=max_new_tokens))
        # The reference's post-processing: the committed canvases, pad after the first EOS.
        tokens = s.tokens + [0] * (s.canvases * canvas - len(s.tokens))
        return tokens, sum(s.steps_per_canvas) / s.canvases

    return solve


def default_max_new_tokens(puzzles: list[dict], canvas: int) -> int:
    """One canvas more than the longest answer (+ EOS) needs: EOS has to end generation."""
    longest = max(len(p["solution"]) + 1 for p in puzzles)
    return (math.ceil(longest / canvas) + 1) * canvas


# name -> factory(model_dir, seed) -> solve
BACKENDS: dict[str, Callable[[Path, int], Solve]] = {
    "mlx": make_mlx_backend,
    "transformers": make_transformers_backend,
}


def evaluate(
    solve: Solve, tokenizer, puzzles: list[dict], canvas: int, max_new_tokens: int, task=None
) -> dict:
    if task is not None and task.name != "sudoku":
        return evaluate_task(solve, tokenizer, puzzles, canvas, max_new_tokens, task)
    pad = tokenizer.pad_token_id
    eos = {tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(TURN_CLOSE)}
    n_solved = n_eos = 0
    steps, tpfs = [], []
    t0 = time.time()
    for item in puzzles:
        ids = prompt_ids(tokenizer, item["puzzle"])
        tokens, steps_per_canvas = solve(ids, max_new_tokens)
        answer = "".join(tokenizer.convert_ids_to_tokens(tokens[:16]))
        n_solved += solves(item["puzzle"], answer)
        first_eos = next((i for i, t in enumerate(tokens) if t in eos), None)
        n_eos += (
            first_eos == 16 and len(tokens) == canvas and all(t == pad for t in tokens[17:])
        )
        n_canvases = math.ceil(len(tokens) / canvas)
        forwards = steps_per_canvas * n_canvases
        valid = sum(1 for t in tokens if t != pad)
        steps.append(steps_per_canvas)
        tpfs.append(valid / forwards)
    n = len(puzzles)
    return {
        "n": n,
        "solve_rate": n_solved / n,
        "mean_steps_per_canvas": sum(steps) / n,
        "max_steps_per_canvas": max(steps),
        "tokens_per_forward": sum(tpfs) / n,
        "eos_ended": n_eos / n,
        "seconds": round(time.time() - t0, 1),
    }


def evaluate_task(solve: Solve, tokenizer, puzzles: list[dict], canvas: int, max_new_tokens: int, task) -> dict:
    """Multi-canvas answers (see the module docstring)."""
    pad = tokenizer.pad_token_id
    eos = {tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(TURN_CLOSE)}
    n_solved = n_eos = 0
    steps, tpfs, canvases = [], [], []
    t0 = time.time()
    for item in puzzles:
        ids = prompt_ids(tokenizer, item["puzzle"], task)
        tokens, steps_per_canvas = solve(ids, max_new_tokens)
        first_eos = next((i for i, t in enumerate(tokens) if t in eos), None)
        end = len(tokens) if first_eos is None else first_eos
        answer = "".join(tokenizer.convert_ids_to_tokens(tokens[:end]))
        n_solved += task.check(item, answer)
        n_canvases = math.ceil(len(tokens) / canvas)
        want = len(item["solution"])
        n_eos += (
            first_eos == want
            and n_canvases == want // canvas + 1
            and all(t == pad for t in tokens[want + 1 :])
        )
        valid = sum(1 for t in tokens if t != pad)
        steps.append(steps_per_canvas)
        canvases.append(n_canvases)
        tpfs.append(valid / (steps_per_canvas * n_canvases))
    n = len(puzzles)
    return {
        "n": n,
        "solve_rate": n_solved / n,
        "mean_steps_per_canvas": sum(steps) / n,
        "max_steps_per_canvas": max(steps),
        "canvases_per_answer": sum(canvases) / n,
        "tokens_per_forward": sum(tpfs) / n,
        "eos_ended": n_eos / n,
        "seconds": round(time.time() - t0, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Held-out solve rate of a toy model (Sudoku or Narayana's sequence mod 10).")
    ap.add_argument("--model", required=True, help="checkpoint dir (HF format + heldout.json)")
    ap.add_argument("--n", type=int, default=200, help="number of held-out puzzles (max: all)")
    ap.add_argument("--backend", action="append", choices=sorted(BACKENDS), help="repeatable; default all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: one canvas more than the longest answer needs (Sudoku: 2 x canvas_length)")
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest for batch-1 decoding")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    canvas = AutoConfig.from_pretrained(str(model_dir)).canvas_length
    heldout = json.loads((model_dir / "heldout.json").read_text())
    task = get_task(heldout.get("task", "sudoku"))
    held = heldout["puzzles"][: args.n]
    max_new = args.max_new_tokens or default_max_new_tokens(held, canvas)

    results = {}
    for name in args.backend or sorted(BACKENDS):
        solve = BACKENDS[name](model_dir, args.seed)
        results[name] = evaluate(solve, tokenizer, held, canvas, max_new, task)

    names = list(results)
    rows = [
        ("puzzles", "n", "{:d}"),
        ("solve rate", "solve_rate", "{:.4f}"),
        ("mean denoising steps / canvas", "mean_steps_per_canvas", "{:.2f}"),
        ("max denoising steps / canvas", "max_steps_per_canvas", "{:.0f}"),
        ("tokens per forward", "tokens_per_forward", "{:.2f}"),
        ("EOS ended after 1 canvas", "eos_ended", "{:.4f}"),
        ("wall seconds", "seconds", "{:.1f}"),
    ]
    if task.name != "sudoku":
        rows[1] = (getattr(task, "metric", "exact-match accuracy"), "solve_rate", "{:.4f}")
        rows.insert(4, ("canvases per answer", "canvases_per_answer", "{:.2f}"))
        rows[6] = ("EOS ended after the answer's last canvas", "eos_ended", "{:.4f}")
    print(f"model: {model_dir}   task: {task.name}   max_new_tokens: {max_new}   seed: {args.seed}")
    print(f"| metric | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for label, key, fmt in rows:
        print(f"| {label} | {' | '.join(fmt.format(results[n][key]) for n in names)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

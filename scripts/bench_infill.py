#!/usr/bin/env python
"""Fixed canvas positions on the Sudoku toys: the puzzle's givens held at their places in
the answer canvas (fixed.py), against the plain prompt.

    python scripts/bench_infill.py [--n N] [--seeds 1] [--modes reference,fast]

The answer canvas holds the 16 cells row by row, so a given `p[i] != "."` becomes
`fixed[i] = id(p[i])`; on toy-sudoku-open (12-token canvas) cells 12-15 sit in the second
canvas. Rows, each in reference and fast mode (fast.py's defaults), under SeededNoise:

- plain: the puzzle as the prompt (what the toys were trained on);
- fixed: the puzzle as the prompt and its givens fixed;
- blank+fixed: an empty puzzle ("................") as the prompt, the givens fixed: the
  canvas alone carries the puzzle.

Sets: toy-sudoku's test split (assets/toy-sudoku/testset.json, 4-10 blanks, unique
solutions) by blanks; a hard set beyond toy-sudoku's training range (11 and 12 blanks,
unique solutions, 5 per held-out grid drawn with PuzzleMaker.sample, seed 1, none in a
shipped test set); toy-sudoku-open's test split (11-14 blanks) by solution class; and
"template with holes": each held-out grid with 5 random halves (8 cells) fixed under the
empty prompt, on both toys: how often the rest completes a valid grid; and length
recovery: toy-sudoku chat infill with the reply's first a and last b digits held (a, b in
2, 4, 6), candidate lengths within 3 of the true one, per score rule (mean, sum, suffix):
how often the chosen length is right and the grid solved, and the decoder forwards spent.

Reported per cell: solve rate (a valid grid that keeps the givens), steps per canvas (the
decoder forwards that transfer to a Mac GPU; not yet measured on a GPU) and given cells
changed per answer (0 by construction where they are fixed). CPU wall times go to stderr,
indicative only (a shared machine).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_testsets  # noqa: E402
import train_toy  # noqa: E402

import mlx_diffgemma as md  # noqa: E402
from mlx_diffgemma.generation.denoiser import MLXDenoiser  # noqa: E402
from mlx_diffgemma.generation.fast import FastDenoiser  # noqa: E402
from mlx_diffgemma.generation.loop import stream  # noqa: E402
from mlx_diffgemma.generation.settings import defaults  # noqa: E402
from mlx_diffgemma.models.paths import ASSETS_DIR  # noqa: E402

EMPTY = "." * 16
ROWS = ("plain", "fixed", "blank+fixed")


def hard_set(per_grid: int = 5, seed: int = 1) -> List[dict]:
    """Unique-solution puzzles with 11 and 12 blanks of the held-out grids, none in a
    shipped test set or held-out file."""
    maker = train_toy.PuzzleMaker()
    taken = set()
    for toy in ("toy-sudoku", "toy-sudoku-open"):
        data = toy_testsets.load(toy)
        taken |= {it["puzzle"] for split in ("tune", "test") for it in data[split]}
        taken |= toy_testsets.shipped_heldout(toy)
    rng = random.Random(seed)
    out = []
    for grid in toy_testsets.load("toy-sudoku")["heldout_grids"]:
        for blanks in (11, 12):
            made = set()
            for _ in range(4000):
                if len(made) == per_grid:
                    break
                p = maker.sample(grid, blanks, rng)
                if p not in taken and p not in made:
                    made.add(p)
            out += [{"puzzle": p, "grid": grid, "blanks": blanks, "solutions": 1} for p in sorted(made)]
    return out


def templates(per_grid: int = 5, seed: int = 2) -> List[dict]:
    """Each held-out grid with `per_grid` random halves kept: the template's holes."""
    rng, maker = random.Random(seed), train_toy.PuzzleMaker()
    out = []
    for grid in toy_testsets.load("toy-sudoku")["heldout_grids"]:
        for _ in range(per_grid):
            keep = set(rng.sample(range(16), 8))
            p = "".join(c if i in keep else "." for i, c in enumerate(grid))
            out.append({"puzzle": p, "grid": grid, "blanks": 8, "solutions": maker.n_solutions(p)})
    return out


def run_case(model, tok, hf, task, digit, item: dict, row: str, mode: str, seed: int) -> dict:
    puzzle = item["puzzle"]
    fixed = None if row == "plain" else {i: digit[c] for i, c in enumerate(puzzle) if c != "."}
    ids = train_toy.prompt_ids(hf, EMPTY if row == "blank+fixed" else puzzle, task)
    gen = defaults(model).gen
    noise = md.SeededNoise(seed)
    den = (MLXDenoiser if mode == "reference" else FastDenoiser)(model, gen, noise=noise)
    s = list(stream(den, tok, ids, fixed=fixed))[-1]
    answer = s.text.replace(" ", "")[:16]
    kept = sum(1 for i, c in enumerate(puzzle) if c != "." and (i >= len(answer) or answer[i] != c))
    return {"solved": bool(task.check({"puzzle": puzzle}, s.text)), "changed": kept,
            "steps": sum(s.steps_per_canvas) / len(s.steps_per_canvas)}


def stratum(item: dict, toy: str, kind: str) -> List[str]:
    if kind == "template":
        return ["all"]
    if toy == "toy-sudoku":
        b = item["blanks"]
        return ["all", "4-6" if b <= 6 else "7-8" if b <= 8 else "9-10" if b <= 10 else str(b)]
    return ["all", f"{item['blanks']} blanks", f"{toy_testsets.solution_class(item['solutions'])} sol."]


def run_set(toy: str, items: List[dict], kind: str, modes, seeds, rows=ROWS) -> Dict:
    from transformers import AutoTokenizer

    model, tok = md.load(ASSETS_DIR / toy / "mlx")
    hf = AutoTokenizer.from_pretrained(str(ASSETS_DIR / toy / "hf"))
    task = train_toy.get_task(toy_testsets.load(toy)["task"])
    digit = {c: hf.convert_tokens_to_ids(c) for c in "1234"}
    table: Dict = {}
    for mode in modes:
        for row in rows:
            t0 = time.perf_counter()
            for item in items:
                for seed in seeds:
                    r = run_case(model, tok, hf, task, digit, item, row, mode, seed)
                    for key in stratum(item, toy, kind):
                        cell = table.setdefault((key, mode, row), {"n": 0, "solved": 0, "changed": 0,
                                                                   "steps": 0.0})
                        cell["n"] += 1
                        for f in ("solved", "changed", "steps"):
                            cell[f] += r[f]
            print(f"  {toy} {kind} {mode} {row}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return table


RULES = ("mean", "sum", "suffix")


def length_recovery(items: List[dict], modes) -> Dict:
    """Chat infill on toy-sudoku: the reply's first `a` digits and last `b` held, the true
    middle 16 - a - b long, candidates within 3 of it; per score rule, how often the
    chosen length is the true one and the filled grid solves the puzzle."""
    from mlx_diffgemma.generation.infilling import Scored, score_of

    model, tok = md.load(ASSETS_DIR / "toy-sudoku" / "mlx")
    task = train_toy.get_task("sudoku")
    table: Dict = {}
    for mode in modes:
        t0 = time.perf_counter()
        for i, item in enumerate(items):
            g = item["grid"]
            for a in (2, 4, 6):
                for b in (2, 4, 6):
                    true = 16 - a - b
                    events = list(md.stream_infill(
                        model, tok, g[:a], g[16 - b:], messages=[{"role": "user", "content": item["puzzle"]}],
                        lengths=list(range(max(1, true - 3), true + 4)), noise=md.SeededNoise(i), mode=mode))
                    scored = [e for e in events if isinstance(e, Scored)]
                    for rule in RULES:
                        best = max(scored, key=lambda r: (score_of(r.logprobs, r.length, rule), -r.length))
                        text = g[:a] + tok.decode(best.tokens) + g[16 - b:]
                        cell = table.setdefault((f"a+b={a + b}", mode, rule), {"n": 0, "right": 0, "solved": 0,
                                                                                "forwards": 0})
                        cell["n"] += 1
                        cell["right"] += best.length == true
                        cell["solved"] += len(text) == 16 and task.check({"puzzle": item["puzzle"]}, text)
                        cell["forwards"] += events[-1].forwards
        print(f"  length recovery {mode}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return table


def print_lengths(title: str, table: Dict, modes) -> None:
    keys = sorted({k for k, _, _ in table}, key=lambda k: int(k.split("=")[1]))
    print(f"\n### {title}\n")
    head = ["a+b", "n"] + [f"{m} {r}" for m in modes for r in RULES] + [f"{m} forwards" for m in modes]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in keys:
        cells = [table[(key, m, r)] for m in modes for r in RULES]
        print(f"| {key} | {cells[0]['n']} | " + " | ".join(
            f"{c['right'] / c['n']:.3f} · {c['solved'] / c['n']:.3f}" for c in cells) + " | " + " | ".join(
            f"{table[(key, m, 'mean')]['forwards'] / table[(key, m, 'mean')]['n']:.1f}" for m in modes) + " |")


def _rank(key: str):
    """Strata in order: all, then by blanks, then by solution class."""
    if key == "all":
        return (0, 0)
    if key.endswith("sol."):
        return (2, toy_testsets.CLASSES.index(key.split()[0]))
    return (1, int(key.split()[0].split("-")[0]))


def print_table(title: str, table: Dict, modes, rows=ROWS) -> None:
    keys = []
    for key, _, _ in table:
        if key not in keys:
            keys.append(key)
    keys.sort(key=_rank)
    print(f"\n### {title}\n")
    print("cells: solve rate · steps per canvas · given cells changed per answer\n")
    head = ["stratum", "n"] + [f"{m} {r}" for m in modes for r in rows]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in keys:
        cells = [table[(key, m, r)] for m in modes for r in rows]
        n = cells[0]["n"]
        print(f"| {key} | {n} | " + " | ".join(
            f"{c['solved'] / c['n']:.3f} · {c['steps'] / c['n']:.2f} st · {c['changed'] / c['n']:.2f} ch"
            for c in cells) + " |")


def subsample(items: List[dict], n: Optional[int]) -> List[dict]:
    return items if not n or n >= len(items) else items[:: max(1, len(items) // n)][:n]


# name -> (toy, its puzzles, table title)
SETS = {
    "sudoku": ("toy-sudoku", lambda: toy_testsets.load("toy-sudoku")["test"],
               "toy-sudoku, test split ({n} puzzles), by blanks"),
    "hard": ("toy-sudoku", hard_set, "toy-sudoku, hard set beyond training ({n} puzzles, 11-12 blanks, unique)"),
    "open": ("toy-sudoku-open", lambda: toy_testsets.load("toy-sudoku-open")["test"],
             "toy-sudoku-open, test split ({n} puzzles), by blanks and solutions"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="cases per set (evenly spaced; default all)")
    p.add_argument("--seeds", type=int, default=1, help="noise seeds per case (default 1)")
    p.add_argument("--modes", default="reference,fast")
    p.add_argument("--sets", default="sudoku,hard,open,template,length")
    a = p.parse_args(argv)
    modes, seeds, sets = a.modes.split(","), range(a.seeds), a.sets.split(",")
    for name, (toy, make, title) in SETS.items():
        if name in sets:
            items = subsample(make(), a.n)
            print_table(title.format(n=len(items)), run_set(toy, items, "test", modes, seeds), modes)
    if "template" in sets:
        items = subsample(templates(), a.n)
        for toy in ("toy-sudoku", "toy-sudoku-open"):
            print_table(f"template with holes, {toy} ({len(items)} half grids, empty prompt)",
                        run_set(toy, items, "template", modes, seeds, rows=("blank+fixed",)), modes,
                        rows=("blank+fixed",))
    if "length" in sets:
        items = subsample(toy_testsets.load("toy-sudoku")["test"], a.n)
        print_lengths(f"length recovery, toy-sudoku chat infill ({len(items)} puzzles x 9 (a, b)); cells: "
                      "right length · solved; forwards per answer", length_recovery(items, modes), modes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

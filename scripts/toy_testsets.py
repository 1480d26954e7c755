#!/usr/bin/env python
"""Held-out test sets of the trained Sudoku toys: distinct puzzles that no training run
saw, in two disjoint splits, stratified by number of blanks and of solutions.

    python scripts/toy_testsets.py            # (re)writes mlx_diffgemma/assets/<toy>/testset.json
    python scripts/toy_testsets.py --check    # fails unless the shipped files are what it makes

What "unseen" means here, from how scripts/train_toy.py trains (seed 0):

* Both toys split the 288 valid 4x4 grids by solution grid (`split_grids(0)`): 240
  training grids, 48 held out. Every puzzle below is made from a held-out grid.
* toy-sudoku trains on fresh unique-solution puzzles of the training grids with 4-10
  blanks. A unique-solution puzzle of a held-out grid has that grid as its only
  completion, so no training grid could have produced it: its test puzzles have 4-10
  blanks and a unique solution.
* toy-sudoku-open (fine-tuned from toy-sudoku) trains on a fixed list of prompts:
  `OpenSudokuTask().split(0)`'s 5,777 puzzles of the training grids with 11-16 blanks.
  Few givens fit many grids, so many puzzles of held-out grids are on that list too
  (every one-given puzzle is: all 64 of them, and the empty grid). Its test puzzles are
  the puzzles of held-out grids with 11-14 blanks that are NOT on the list. With several
  solutions, some completions may be training grids (any valid completion is right);
  the prompt itself was never trained on.
* The puzzles of the shipped `hf/heldout.json` files are left out of both splits: they
  were read when earlier fast-mode defaults were chosen.

Splits: `tune` (for choosing fast mode's defaults) and `test` (for reporting), drawn
together and disjoint. Quotas are per cell (blanks x solution class, classes 1, 2-3,
4-9, 10+), so that every stratum holds enough puzzles to compare modes on; the cells that
cannot exist (a unique solution with 13 blanks, few solutions with 14) stay empty.
toy-sudoku-open also carries, reported apart and never mixed into the splits: the empty
grid (one puzzle, run under many noise seeds) and the 64 one-given puzzles (15 blanks),
all of them training prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_toy  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "mlx_diffgemma" / "assets"
SEED = 0  # the training runs' seed: it fixes the grid split and the open toy's prompts
CLASSES = ("1", "2-3", "4-9", "10+")
EMPTY = "." * 16

# (blanks, solution class) -> (test quota, tune quota)
QUOTAS = {
    "toy-sudoku": {(k, "1"): (100, 50) for k in range(train_toy.MIN_BLANKS, train_toy.MAX_BLANKS + 1)},
    "toy-sudoku-open": {
        **{(11, c): (50, 25) for c in ("1", "2-3", "4-9")},
        **{(12, c): (50, 25) for c in CLASSES},
        **{(13, c): (50, 25) for c in ("2-3", "4-9", "10+")},
        (14, "10+"): (150, 75),
    },
}
TASKS = {"toy-sudoku": "sudoku", "toy-sudoku-open": "sudoku-open"}


def solution_class(n: int) -> str:
    """The stratum of a puzzle with `n` solutions: 1, 2-3, 4-9 or 10+."""
    return "1" if n == 1 else "2-3" if n <= 3 else "4-9" if n <= 9 else "10+"


def training_prompts(toy: str) -> set:
    """The prompts a toy trained on, where they form a fixed list (toy-sudoku draws fresh
    unique-solution puzzles of training grids instead: none of a held-out grid)."""
    if toy == "toy-sudoku-open":
        return set(train_toy.OpenSudokuTask().split(SEED)[0])
    return set()


def shipped_heldout(toy: str) -> set:
    return {p["puzzle"] for p in json.loads((ASSETS / toy / "hf" / "heldout.json").read_text())["puzzles"]}


def puzzle_of(grid: str, blanks: Iterable[int]) -> str:
    b = set(blanks)
    return "".join("." if i in b else c for i, c in enumerate(grid))


def draw_cell(maker, grids: List[str], blanks: int, cls: str, n: int, rng: random.Random,
              excluded: set) -> List[dict]:
    """`n` distinct puzzles of `grids` with `blanks` blanks in solution class `cls`, none in
    `excluded` (which they join), by rejection sampling."""
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200_000:
            raise RuntimeError(f"cell ({blanks} blanks, {cls} solutions) ran dry after {len(out)} puzzles")
        grid = rng.choice(grids)
        p = puzzle_of(grid, rng.sample(range(16), blanks))
        if p in excluded:
            continue
        count = maker.n_solutions(p)
        if solution_class(count) != cls:
            continue
        excluded.add(p)
        out.append({"puzzle": p, "grid": grid, "blanks": blanks, "solutions": count})
    return out


def build(toy: str) -> dict:
    """The test set of `toy`, a pure function of the training split (seed 0)."""
    maker = train_toy.PuzzleMaker()
    _, held_grids = train_toy.split_grids(SEED)
    trained = training_prompts(toy)
    excluded = trained | shipped_heldout(toy)
    rng = random.Random(f"{toy} test set")  # str seeds hash the same on every platform
    splits: Dict[str, List[dict]] = {"tune": [], "test": []}
    for (blanks, cls), (n_test, n_tune) in sorted(QUOTAS[toy].items()):
        cell = draw_cell(maker, held_grids, blanks, cls, n_test + n_tune, rng, excluded)
        splits["test"] += cell[:n_test]
        splits["tune"] += cell[n_test:]
    out = {
        "description": (
            f"Held-out puzzles of {toy}: made from the 48 grids train_toy.py holds out (seed {SEED}), "
            "none a training prompt, none in hf/heldout.json; 'tune' chooses defaults, 'test' "
            "reports. Built by scripts/toy_testsets.py."),
        "task": TASKS[toy],
        "heldout_grids": held_grids,
        "tune": splits["tune"],
        "test": splits["test"],
    }
    if toy == "toy-sudoku-open":
        one_given = sorted({puzzle_of(g, [j for j in range(16) if j != i]) for g in maker.grids for i in range(16)})
        assert all(p in trained for p in one_given) and EMPTY in trained
        out["apart"] = {
            "empty grid": [{"puzzle": EMPTY, "blanks": 16, "solutions": maker.n_solutions(EMPTY)}],
            "15 blanks (training prompts)": [
                {"puzzle": p, "blanks": 15, "solutions": maker.n_solutions(p)} for p in one_given],
        }
    return out


def path_of(toy: str) -> Path:
    return ASSETS / toy / "testset.json"


def dumps(data: dict) -> str:
    return json.dumps(data, indent=1) + "\n"


def load(toy: str) -> dict:
    return json.loads(path_of(toy).read_text())


def items(data: dict, split: str) -> List[Tuple[str, dict]]:
    """(group, item) pairs of a split: `tune`, `test`, or `apart` (each apart group's
    items, in order)."""
    if split == "apart":
        return [(g, it) for g, rows in data.get("apart", {}).items() for it in rows]
    return [(split, it) for it in data[split]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare the shipped files instead of writing")
    a = p.parse_args(argv)
    status = 0
    for toy in QUOTAS:
        text = dumps(build(toy))
        if a.check:
            same = path_of(toy).is_file() and path_of(toy).read_text() == text
            print(f"{toy}: {'same' if same else 'DIFFERENT'}")
            status |= not same
            continue
        tmp = path_of(toy).with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path_of(toy))  # never half a file on disk
        d = json.loads(text)
        print(f"{toy}: {len(d['test'])} test, {len(d['tune'])} tune -> {path_of(toy)}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The toys' held-out test sets (scripts/toy_testsets.py, shipped as
mlx_diffgemma/assets/<toy>/testset.json): what the generator makes, distinct puzzles only,
none of them seen in training, stratified as the benchmarks report them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import toy_testsets  # noqa: E402
import train_toy  # noqa: E402

TOYS = ("toy-sudoku", "toy-sudoku-open")


@pytest.fixture(scope="module")
def maker():
    return train_toy.PuzzleMaker()


@pytest.mark.slow
@pytest.mark.parametrize("toy", TOYS)
def test_shipped_file_is_what_the_generator_makes(toy):
    assert toy_testsets.path_of(toy).read_text() == toy_testsets.dumps(toy_testsets.build(toy))


@pytest.mark.parametrize("toy", TOYS)
def test_distinct_held_out_and_stratified(toy, maker):
    data = toy_testsets.load(toy)
    _, held_grids = train_toy.split_grids(toy_testsets.SEED)
    assert data["heldout_grids"] == held_grids
    test, tune = data["test"], data["tune"]
    assert len(test) >= 400
    puzzles = [it["puzzle"] for it in test + tune]
    assert len(set(puzzles)) == len(puzzles)  # no repeats, within or across the splits
    shipped = {p["puzzle"] for p in json.loads((ROOT / "mlx_diffgemma" / "assets" / toy / "hf" / "heldout.json")
                                               .read_text())["puzzles"]}
    assert not shipped & set(puzzles)
    for it in test + tune:
        p, grid = it["puzzle"], it["grid"]
        assert grid in held_grids and all(c in (".", g) for c, g in zip(p, grid))
        assert it["blanks"] == p.count(".") and it["solutions"] == maker.n_solutions(p)
    cells = {}
    for it in test:
        key = (it["blanks"], toy_testsets.solution_class(it["solutions"]))
        cells[key] = cells.get(key, 0) + 1
    assert cells == {k: v[0] for k, v in toy_testsets.QUOTAS[toy].items()}


def test_toy_sudoku_puzzles_have_only_their_held_out_grid(maker):
    """toy-sudoku trains on unique-solution puzzles of training grids: a unique-solution
    puzzle of a held-out grid is one no training draw can produce."""
    data = toy_testsets.load("toy-sudoku")
    for it in data["test"] + data["tune"]:
        assert it["solutions"] == 1
        assert train_toy.MIN_BLANKS <= it["blanks"] <= train_toy.MAX_BLANKS


def test_open_puzzles_are_never_training_prompts():
    data = toy_testsets.load("toy-sudoku-open")
    trained = set(train_toy.OpenSudokuTask().split(toy_testsets.SEED)[0])
    assert len(trained) == 5777
    assert not trained & {it["puzzle"] for it in data["test"] + data["tune"]}
    # What is kept apart is exactly what could not be held out: the empty grid and every
    # one-given puzzle are training prompts.
    apart = data["apart"]
    assert [it["puzzle"] for it in apart["empty grid"]] == ["." * 16]
    fifteen = [it["puzzle"] for it in apart["15 blanks (training prompts)"]]
    assert len(fifteen) == len(set(fifteen)) == 64 and set(fifteen) <= trained and "." * 16 in trained

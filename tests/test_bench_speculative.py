"""scripts/bench_speculative.py: the shipped trained target with toy-sudoku drafting (a
few puzzles: outputs identical to the target alone, fewer target forwards), and the
cost model's arithmetic at the real shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_speculative as bench  # noqa: E402


def test_trained_target_with_toy_drafter(capsys):
    assert bench.main(["--n", "6", "--k", "17", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    alone = next(line for line in out.splitlines() if line.startswith("| target alone"))
    drafted = [line for line in out.splitlines() if line.startswith("| drafted, k=17, 1 step(s)")][-1]
    cells = [c.strip() for c in drafted.strip("|").split("|")]
    assert cells[-1] == "6/6"  # greedy: every output is the target's
    assert cells[-2] == [c.strip() for c in alone.strip("|").split("|")][-2]  # same solved rate
    assert float(cells[1]) >= 4 and float(cells[2]) <= 0.25  # tokens per round; target forwards per token


def test_cost_model_arithmetic():
    # One token: shared 1.7 GB + LM head 0.78 GB + 30 layers x 8 experts x 3.34 MB.
    one = bench.forward_seconds(1, 1.0, 1e30)  # bandwidth 1 byte/s: the bytes
    assert one == pytest.approx(1.7e9 + 262144 * 2816 * 8.5 / 8 + 30 * 8 * 5_947_392 * 4.5 / 8, rel=1e-12)
    assert bench.experts_read(1) == pytest.approx(8) and bench.experts_read(9, independent=False) == 8
    assert 55 < bench.experts_read(9) < 57
    # A round keeping every draft of k=8 in one step: one encode of 9, forwards of 8 and 9.
    f = lambda n: bench.forward_seconds(n, 400e9, 30e12)  # noqa: E731
    assert bench.speculative_tps(8, 1, 9, 400e9, 30e12) == pytest.approx(9 / (f(8) + f(9) + f(9)))
    # Compute binds only when the positions' arithmetic outruns the weight bytes.
    assert bench.forward_seconds(4096, 1e15, 30e12) == pytest.approx(4096 * bench.ACTIVE_FLOPS / 30e12)

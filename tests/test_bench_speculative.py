"""scripts/bench_speculative.py: the shipped trained target with toy-sudoku drafting (a
few puzzles: the target's own outputs, with fewer target forwards), and the
cost model's arithmetic at the real shapes."""

from __future__ import annotations

import bench_speculative as bench  # noqa: E402
import pytest

pytestmark = pytest.mark.slow  # runs the speculative benchmark on trained toys


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def test_trained_target_with_toy_drafter():
    """Drafting keeps the target's greedy output, with far fewer target forwards. The
    target alone decodes one token per forward and the drafted run checks blocks, so their
    floats differ in the last bits: outputs must be equal up to a decision the target
    itself makes by a near-tie (top-2 logit gap below 1e-2), and most must be equal."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    from teacher_forcing import top2_gap

    from mlx_diffgemma import load

    target, ttok = mlx_lm.load(str(bench.ROOT / "benchmarks" / "toy-sudoku-target"))
    drafter, dtok = load(bench.DRAFTER / "mlx")
    items = bench.puzzles(6)
    prompts = [bench.toy.prompt_ids(dtok._tokenizer, it["puzzle"]) for it in items]
    base = bench.run_target_alone(target, prompts)
    r = bench.run_speculative(target, ttok, drafter, dtok, prompts, 17, 1)
    same = 0
    for ids, a, b in zip(prompts, base["outputs"], r["outputs"]):
        i = _first_difference(a, b)
        if i is None:
            same += 1
            continue
        logits = target(mx.array([ids + a[:i]]))[0, -1].astype(mx.float32)
        assert float(top2_gap(np.array(logits))) < 1e-2, f"drafting changed a certain decision at {i}"
    assert same >= 5
    assert r["tokens"] / r["rounds"] >= 4 and r["target_forwards"] / r["tokens"] <= 0.25


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

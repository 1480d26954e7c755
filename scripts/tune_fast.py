#!/usr/bin/env python
"""How fast mode's defaults are picked: candidate FastOptions on the toys' TUNING split
(scripts/toy_testsets.py), never on the test split the benchmarks report.

    python scripts/tune_fast.py [--json benchmarks/cpu-2core/tune-fast.json]

The rule:
1. Accuracy first, by the bar's own slack: per toy, the smaller of (overall accuracy -
   reference's + 1 point) and (worst stratum - reference's + 2 points); a candidate
   scores the smaller over both toys (>= 0: the accuracy bar is met). Ties go to fewer
   steps per canvas on toy-sudoku-open.
2. Still fast: toy-sudoku-open's steps per canvas at least 2.5x below reference mode's
   and its decoder work per token (projected to 26B-A4B) at least 3x below. (A first
   rule put the bar's 3x / 3.5x first; on the tuning split it admitted only settings 8
   or more points behind the reference in a stratum, so accuracy now comes first.)
Stage 1 crosses the revocation floor with the temperature the confidence is read at;
stage 2 adds each remaining rule alone to stage 1's pick and keeps it if the score rises.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fast import run_mode, summarize, toy_cases  # noqa: E402

import mlx_diffgemma as md  # noqa: E402
from mlx_diffgemma.bench.synthetic import preset_args  # noqa: E402
from mlx_diffgemma.generation.fast import FastOptions  # noqa: E402
from mlx_diffgemma.models.paths import packaged_model  # noqa: E402

TOYS = ("toy-sudoku-open", "toy-sudoku")
BASE = FastOptions().irrevocable()
STAGE1 = [replace(BASE, revoke_floor=f, reopen_noise=f > 0, confidence_at_t1=t1)
          for t1 in (True, False) for f in (0.0, 0.95, 0.98, 0.99, 0.995, 0.999)]
STAGE2 = {  # each rule alone, on top of stage 1's pick
    "revoke_margin 0.2": dict(revoke_margin=0.2),
    "hold 2": dict(hold=2),
    "adapt 0.5": dict(adapt=0.5),
    "final_pass 0.9": dict(final_pass=0.9),
    "confidence 0.95": dict(confidence=0.95),
    "reopen to argmax": dict(reopen_noise=False),
}
STEPS_X, WORK_X = 2.5, 3.0


class Bench:
    """Each toy's tuning split, model and reference run, loaded once."""

    def __init__(self):
        self.real = preset_args("real")
        self.toys: Dict[str, Any] = {}
        for toy in TOYS:
            model, tok = md.load(packaged_model(toy))
            cases, check = toy_cases(toy, packaged_model(toy, prefer="hf"), "tune", 0, apart=False)
            self.toys[toy] = (model, tok, cases, check)
        self.ref = {toy: self.run(toy, None) for toy in TOYS}

    def run(self, toy: str, opts) -> Dict[str, Any]:
        model, tok, cases, check = self.toys[toy]
        r = run_mode(model, tok, cases, check, opts, 2 * model.canvas_length)
        return summarize(model, cases, r, "tune", self.real)

    def score(self, opts: FastOptions) -> Dict[str, Any]:
        row: Dict[str, Any] = {"options": {k: v for k, v in asdict(opts).items() if v != getattr(BASE, k)}}
        slack = []
        for toy in TOYS:
            r, ref = self.run(toy, opts), self.ref[toy]
            d = {k: 100 * (r["strata"][k]["accuracy"] - ref["strata"][k]["accuracy"]) for k in ref["strata"]}
            worst = min(v for k, v in d.items() if k != "all")
            slack.append(min(d["all"] + 1, worst + 2))
            row[toy] = {"accuracy": r["accuracy"], "delta": d["all"], "worst_stratum": worst,
                        "steps": r["steps_per_canvas"],
                        "steps_x": ref["steps_per_canvas"] / r["steps_per_canvas"],
                        "work_x": ref["real_work_per_token"] / r["real_work_per_token"]}
        o = row["toy-sudoku-open"]
        row["fast_enough"] = o["steps_x"] >= STEPS_X and o["work_x"] >= WORK_X
        row["slack"] = min(slack)
        print(f"slack {row['slack']:+5.1f} fast {row['fast_enough']!s:5} open {o['accuracy']:.3f} "
              f"({o['delta']:+.1f}, worst {o['worst_stratum']:+.1f}) {o['steps']:.2f} steps x{o['steps_x']:.2f} "
              f"26B x{o['work_x']:.2f} | sudoku {row['toy-sudoku']['accuracy']:.3f} "
              f"(worst {row['toy-sudoku']['worst_stratum']:+.1f}) | {row['options']}", flush=True)
        return row


def best(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    ok = [r for r in rows if r["fast_enough"]] or rows
    return max(ok, key=lambda r: (r["slack"], -r["toy-sudoku-open"]["steps"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    bench = Bench()
    for toy in TOYS:
        r = bench.ref[toy]
        print(f"reference on {toy}'s tuning split: {r['accuracy']:.3f}, {r['steps_per_canvas']:.2f} steps/canvas")
    print("stage 1: floor x temperature")
    stage1 = [(o, bench.score(o)) for o in STAGE1]
    pick_row = best([r for _, r in stage1])
    pick = next(o for o, r in stage1 if r is pick_row)
    print(f"stage 1 pick: {pick_row['options']}\nstage 2: one rule more at a time")
    stage2 = []
    for name, kw in STAGE2.items():
        o = replace(pick, **kw)
        row = bench.score(o)
        row["added"] = name
        stage2.append((o, row))
        if row["fast_enough"] and row["slack"] > pick_row["slack"]:
            pick, pick_row = o, row
    print(f"pick: {pick_row['options']} (slack {pick_row['slack']:+.1f} points; >= 0 meets the accuracy bar)")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "reference": {t: {"accuracy": r["accuracy"], "steps": r["steps_per_canvas"]} for t, r in bench.ref.items()},
            "stage1": [r for _, r in stage1], "stage2": [r for _, r in stage2], "pick": pick_row}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

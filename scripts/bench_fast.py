#!/usr/bin/env python
"""Fast mode against reference mode on the trained Sudoku toys, on their held-out test
sets (scripts/toy_testsets.py): accuracy overall and by stratum (number of blanks,
number of solutions: 1, 2-3, 4-9, 10+; the groups kept apart, such as the empty grid,
reported beside), steps per canvas, mean active positions per step, tokens per second
(indicative) and decoder work per generated token, for reference mode, fast mode, each
of its rules and approximations alone or left out, and mlx-vlm 0.7.10's default sampler
(confidence threshold) on the same MLX directory, in one run.

    python scripts/bench_fast.py [--model toy-sudoku --model toy-sudoku-open] [--split test]
        [--json-dir benchmarks/cpu-2core]

Puzzle i of a split runs under `SeededNoise(i)` (mlx-vlm: `mx.random.seed(i)`); the
empty grid runs under seeds 0..--empty-seeds-1. Decoder work is counted, not timed (a
tiny model's wall time is per-call overhead): positions run through the layers, LM-head
rows and self-conditioning entries, each weighed by its FLOPs at the toy's shapes and,
projected with the same per-step counts scaled to a 256-token canvas, at the released
26B-A4B shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_diffgemma as md  # noqa: E402
from mlx_diffgemma.generation.denoiser import MLXDenoiser  # noqa: E402
from mlx_diffgemma.generation.fast import IRREVOCABLE, FastDenoiser, FastOptions, Work  # noqa: E402
from mlx_diffgemma.generation.loop import stream  # noqa: E402
from mlx_diffgemma.generation.settings import defaults, resolve  # noqa: E402
from mlx_diffgemma.models.config import ModelArgs  # noqa: E402


def rule_rows(d: FastOptions) -> Dict[str, FastOptions]:
    """Each self-correction rule of freezing.py measured alone: the defaults without it
    when it is on, with it (a representative setting) when it is off."""
    rows = {"frozen for good (no re-opening)": d.irrevocable()}
    tries = {"revoke_floor": 0.99, "revoke_margin": 0.2, "hold": 2, "adapt": 0.5, "final_pass": 0.9,
             "floor_decay": 2, "max_reopens": 2, "verify_noise": 0.5, "doubt": 0.8, "forget_sc": True}
    for name, value in tries.items():
        off = IRREVOCABLE[name]
        if getattr(d, name) != off:
            r = replace(d, **{name: off})
            if r.revocable or r.final_pass or r.hold > 1:  # else it is the row above
                rows[f"defaults, no {name}"] = r
        else:
            rows[f"defaults + {name}" + ("" if value is True else f" {value}")] = replace(d, **{name: value})
    if d.floor_decay == 1 and d.verify_noise is None:  # tune_fast.py's stage-3 pick, not adopted
        rows["defaults + floor_decay 2 + verify_noise 0.5"] = replace(d, floor_decay=2.0, verify_noise=0.5)
    if d.revocable:
        rows["defaults, re-opened to argmax"] = replace(d, reopen_noise=not d.reopen_noise)
    rows[f"defaults, confidence at {'the schedule' if d.confidence_at_t1 else 'temperature 1'}"] = replace(
        d, confidence_at_t1=not d.confidence_at_t1)
    return rows


D = FastOptions()
MODES: Dict[str, Optional[FastOptions]] = {
    "reference": None,
    "fast (defaults)": D,
    **rule_rows(D),
    "freeze (confidence) only": replace(D, top_k=0, sc_top_k=0),
    "freeze (entropy) only": replace(D, freeze="entropy", top_k=0, sc_top_k=0),
    "top-K sampling only": FastOptions(freeze=None, sc_top_k=0, skip_after_eos=False, renoise=True),
    "sparse self-cond. only": FastOptions(freeze=None, top_k=0, skip_after_eos=False, renoise=True),
    "fast, open renoised": replace(D, renoise=True),
    "fast + active set": replace(D, active_set=True),
    "fast + active set, refresh 1": replace(D, active_set=True, refresh_every=1),
    "fast, no self-cond.": replace(D, self_conditioning=False),
    "fast + repair": replace(D, repair=True),
}
PEER = "mlx-vlm 0.7.10 default"


@dataclass
class Case:
    """One generation: a puzzle, the noise seed it runs under and its strata."""

    puzzle: str
    ids: List[int]
    seed: int
    group: str  # the split's name, or the group reported apart
    blanks: int
    solutions: int


def position_flops(args: ModelArgs) -> float:
    """FLOPs of one canvas position through every layer (projections, dense MLP, routed
    experts; attention's mixing left out: it scales with the context, not the canvas)."""
    H = args.hidden_size
    total = 0.0
    for i in range(args.num_hidden_layers):
        hd, kv = args.head_dim_of(i), args.kv_heads_of(i)
        attn = H * (args.num_attention_heads * hd) * 2 + H * kv * hd * 2
        dense = 3 * H * args.intermediate_size
        experts = args.top_k_experts * 3 * H * args.moe_intermediate_size + H * args.num_experts
        total += 2 * (attn + dense + experts)
    return total


def work_flops(args: ModelArgs, work: Work, sc_k: Optional[int]) -> float:
    """FLOPs of `work` at the shapes of `args`: layers per position, the LM head per row,
    self-conditioning per row (its MLP, plus K or V embedding rows)."""
    H, V = args.hidden_size, args.vocab_size
    sc_mlp = 2 * 3 * H * args.intermediate_size
    sc_read = 2 * H * (sc_k or V)
    return (work.positions * position_flops(args) + work.lm_head_rows * 2 * H * V
            + work.sc_rows * (sc_mlp + sc_read))


def reference_work(steps: List[int], canvas: int) -> Work:
    n = sum(steps) * canvas
    sc = sum(max(s - 1, 0) for s in steps) * canvas  # no self-conditioning at a first step
    return Work(steps=sum(steps), positions=n, lm_head_rows=n, sc_rows=sc)


WORK_FIELDS = ("steps", "positions", "lm_head_rows", "sc_rows")


def run_mode(model, tok, cases: List[Case], check, opts: Optional[FastOptions], max_new: int) -> Dict[str, Any]:
    """Every case in one mode: per case (solved, steps per canvas, tokens, work)."""
    C = model.canvas_length
    out = []
    t0 = time.perf_counter()
    for c in cases:
        gen = resolve(defaults(model), max_new_tokens=max_new).gen
        noise = md.SeededNoise(c.seed)
        den = (MLXDenoiser(model, gen, noise=noise) if opts is None
               else FastDenoiser(model, gen, noise=noise, options=opts))
        s = list(stream(den, tok, c.ids))[-1]
        w = reference_work(s.steps_per_canvas, C) if opts is None else den.work
        out.append({"solved": bool(check(c.puzzle, s.text)), "steps": list(s.steps_per_canvas),
                    "tokens": len(s.tokens), "work": [getattr(w, f) for f in WORK_FIELDS]})
    return {"cases": out, "seconds": time.perf_counter() - t0,
            "sc_k": None if opts is None else (opts.sc_top_k or None)}


def mlx_vlm_mode(path: Path, cases: List[Case], check, max_new: int) -> Dict[str, Any]:
    """mlx-vlm 0.7.10's own diffusion generation with its default sampler."""
    import importlib

    import mlx.core as mx
    from mlx_vlm.utils import load_model

    from mlx_diffgemma.models.tokenizer import load_tokenizer

    d = importlib.import_module("mlx_vlm.generate.diffusion")
    model = load_model(path)
    wrapper = load_tokenizer(path)
    eos = set(wrapper.eos_token_ids)

    class Stop:  # the stopping-criteria surface mlx-vlm's loop touches
        def add_eos_token_ids(self, ids) -> None:
            eos.update([ids] if isinstance(ids, int) else ids)

        def __call__(self, t) -> bool:
            return int(t) in eos

    class Detok:  # mlx-lm's streaming detokenizer under mlx-vlm's call signature
        inner = wrapper.detokenizer

        def reset(self):
            self.inner.reset()

        def add_token(self, token, skip_special_token_ids=None):
            if int(token) not in (skip_special_token_ids or ()):
                self.inner.add_token(int(token))

        def finalize(self):
            self.inner.finalize()

        @property
        def last_segment(self):
            return self.inner.last_segment

    class Tok:  # the processor/tokenizer surface mlx-vlm's loop touches
        detokenizer = Detok()
        stopping_criteria = Stop()

    out = []
    t0 = time.perf_counter()
    for c in cases:
        mx.random.seed(c.seed)
        text, n, blocks, done = "", 0, 0, 0
        for r in d.stream_diffusion_generate(model, Tok, Tok, mx.array([c.ids]), None, None,
                                             max_tokens=max_new, skip_special_token_ids=sorted(eos)):
            text += r.text
            n = r.generation_tokens
            done = r.diffusion_denoising_steps
            blocks += bool(r.diffusion_block_complete)
        out.append({"solved": bool(check(c.puzzle, text)), "steps": [done / max(blocks, 1)] * max(blocks, 1),
                    "tokens": n})
    return {"cases": out, "seconds": time.perf_counter() - t0}


# -- the test sets and their strata -------------------------------------------------------


def toy_cases(toy: str, hf_dir: Path, split: str, empty_seeds: int, limit: Optional[int] = None,
              apart: bool = True):
    """The cases of a toy's test set (`split`, then with `apart` the groups kept apart,
    the empty grid under `empty_seeds` seeds) and the task's checker `check(puzzle, answer)`."""
    import toy_testsets
    import train_toy
    from transformers import AutoTokenizer

    path = toy_testsets.path_of(toy)
    if not path.is_file():
        raise SystemExit(f"{toy} has no test set ({path}); write it with python scripts/toy_testsets.py")
    data = toy_testsets.load(toy)
    task = train_toy.get_task(data["task"])
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    picked = toy_testsets.items(data, split)
    if limit:
        picked = picked[:: max(1, len(picked) // limit)][:limit]
    cases = [Case(it["puzzle"], [], i, g, it["blanks"], it["solutions"]) for i, (g, it) in enumerate(picked)]
    for i, (g, it) in enumerate(toy_testsets.items(data, "apart") if apart else []):
        seeds = range(empty_seeds) if it["blanks"] == 16 else [i]
        cases += [Case(it["puzzle"], [], s, g, it["blanks"], it["solutions"]) for s in seeds]
    for c in cases:
        c.ids = train_toy.prompt_ids(hf, c.puzzle, task)
    return cases, lambda puzzle, answer: task.check({"puzzle": puzzle}, answer)


def stratum_keys(c: Case, split: str) -> List[str]:
    """The strata a case counts in: all of the split, its blanks and its solution class;
    a group kept apart only in itself."""
    from toy_testsets import solution_class

    if c.group != split:
        return [c.group]
    return ["all", f"{c.blanks} blanks", f"{solution_class(c.solutions)} sol."]


def summarize(model, cases: List[Case], r: Dict[str, Any], split: str, real: ModelArgs) -> Dict[str, Any]:
    """Accuracy per stratum, and over the split: steps, active positions, tokens per
    second and work per token (toy shapes, and projected to the released ones)."""
    strata: Dict[str, List[int]] = {}
    steps_by: Dict[str, List[float]] = {}
    for c, x in zip(cases, r["cases"]):
        for k in stratum_keys(c, split):
            strata.setdefault(k, []).append(int(x["solved"]))
            steps_by.setdefault(k, []).extend(x["steps"])
    main = [x for c, x in zip(cases, r["cases"]) if c.group == split]
    out = {
        "accuracy": float(np.mean([x["solved"] for x in main])),
        "steps_per_canvas": float(np.mean([s for x in main for s in x["steps"]])),
        "canvases": float(np.mean([len(x["steps"]) for x in main])),
        "tokens": int(sum(x["tokens"] for x in main)),
        "tokens_per_second_indicative": sum(x["tokens"] for x in r["cases"]) / r["seconds"],
        "strata": {k: {"n": len(v), "solved": int(sum(v)), "accuracy": float(np.mean(v)),
                       "steps_per_canvas": float(np.mean(steps_by[k]))} for k, v in strata.items()},
        "solved_bits": "".join(str(int(x["solved"])) for x in r["cases"]),
    }
    if "work" in main[0]:
        w = Work(**{f: int(sum(x["work"][i] for x in main)) for i, f in enumerate(WORK_FIELDS)})
        out.update(work=w, sc_k=r["sc_k"], mean_active=w.positions / max(w.steps, 1),
                   work_per_token=work_flops(model.args, w, r["sc_k"]) / max(out["tokens"], 1))
        out["real_work_per_token"] = real_shape_projection(out, model.canvas_length, real)
    return out


def real_shape_projection(r: Dict[str, Any], canvas: int, real: ModelArgs) -> float:
    """Work per token at the released shapes if every per-step count scaled from the
    toy's canvas to 256 positions (same steps, same active fractions)."""
    w, f = r["work"], 256 / canvas
    scaled = Work(steps=w.steps, positions=w.positions * f, lm_head_rows=w.lm_head_rows * f,
                  sc_rows=w.sc_rows * f)
    return work_flops(real, scaled, r["sc_k"]) / max(r["tokens"], 1)


# -- tables -------------------------------------------------------------------------------


def print_main(rows: Dict[str, Dict[str, Any]]) -> None:
    ref = rows["reference"]
    print("| mode | solved | steps / canvas | positions / step | tok/s (indicative) | work / token "
          "| x less | 26B-A4B x less | x tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        tps = r["tokens_per_second_indicative"] / ref["tokens_per_second_indicative"]
        if "work" not in r:
            print(f"| {name} | {r['accuracy']:.3f} | {r['steps_per_canvas']:.2f} | - "
                  f"| {r['tokens_per_second_indicative']:.1f} | - | - | - | {tps:.2f} |")
            continue
        print(f"| {name} | {r['accuracy']:.3f} | {r['steps_per_canvas']:.2f} | {r['mean_active']:.1f} "
              f"| {r['tokens_per_second_indicative']:.1f} | {r['work_per_token'] / 1e6:.2f} M "
              f"| {ref['work_per_token'] / r['work_per_token']:.2f} "
              f"| {ref['real_work_per_token'] / r['real_work_per_token']:.2f} | {tps:.2f} |")


def stratum_order(keys) -> List[str]:
    def rank(k: str):
        if k == "all":
            return (0, 0)
        if k.endswith("blanks"):
            return (1, int(k.split()[0]))
        if k.endswith("sol."):
            return (2, ["1", "2-3", "4-9", "10+"].index(k.split()[0]))
        return (3, k)

    return sorted(keys, key=rank)


def print_strata(rows: Dict[str, Dict[str, Any]], versus=("reference", PEER)) -> None:
    """Percent solved per stratum (n in the header), then fast mode's defaults minus
    each of `versus`, in points."""
    keys = stratum_order(rows["reference"]["strata"])
    n = rows["reference"]["strata"]
    print("| mode | " + " | ".join(f"{k} ({n[k]['n']})" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * r['strata'][k]['accuracy']:.1f}" for k in keys) + " |")
    fast = rows.get("fast (defaults)")
    for other in versus:
        if fast is None or other not in rows:
            continue
        d = [100 * (fast["strata"][k]["accuracy"] - rows[other]["strata"][k]["accuracy"]) for k in keys]
        print(f"| fast (defaults) - {other}, points | " + " | ".join(f"{x:+.1f}" for x in d) + " |")


def run_toy(toy: str, a, real: ModelArgs, modes: Dict[str, Optional[FastOptions]]) -> Dict[str, Dict[str, Any]]:
    from mlx_diffgemma.models.paths import packaged_model

    mlx_dir, hf_dir = packaged_model(toy), packaged_model(toy, prefer="hf")
    model, tok = md.load(mlx_dir)
    cases, check = toy_cases(toy, hf_dir, a.split, a.empty_seeds, a.limit)
    max_new = 2 * model.canvas_length
    rows = {}
    for name, opts in modes.items():
        rows[name] = summarize(model, cases, run_mode(model, tok, cases, check, opts, max_new), a.split, real)
        print(f"  {toy} {name}: {rows[name]['accuracy']:.3f}", flush=True)
    if not a.no_mlx_vlm:
        rows[PEER] = summarize(model, cases, mlx_vlm_mode(mlx_dir, cases, check, max_new), a.split, real)
    split_n = sum(c.group == a.split for c in cases)
    print(f"\n{toy}: {split_n} distinct held-out puzzles ({a.split} split), max_new_tokens {max_new}, "
          f"SeededNoise(i) for puzzle i; apart: {sorted({c.group for c in cases} - {a.split})}")
    print_main(rows)
    print()
    print_strata(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=None,
                   help="a packaged Sudoku toy (repeatable; default toy-sudoku and toy-sudoku-open)")
    p.add_argument("--split", default="test", choices=("test", "tune"))
    p.add_argument("--limit", type=int, default=None, help="at most this many puzzles of the split, spread over it")
    p.add_argument("--empty-seeds", type=int, default=64, help="noise seeds the empty grid runs under")
    p.add_argument("--modes", default=None,
                   help="mode names separated by ';' (or by ',' when none has a comma; default all)")
    p.add_argument("--no-mlx-vlm", action="store_true")
    p.add_argument("--json-dir", default=None, help="write fast-<toy>.json here")
    a = p.parse_args(argv)
    from mlx_diffgemma.bench.synthetic import preset_args

    names = a.modes.split(";" if ";" in a.modes else ",") if a.modes else None
    unknown = [m for m in names or [] if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; the modes are: {'; '.join(MODES)}")
    modes = MODES if not names else {"reference": None, **{m: MODES[m] for m in names}}
    real = preset_args("real")
    for toy in a.model or ["toy-sudoku", "toy-sudoku-open"]:
        rows = run_toy(toy, a, real, modes)
        if a.json_dir:
            out = {k: {kk: (vars(vv) | {"per_step": None} if kk == "work" else vv) for kk, vv in r.items()}
                   for k, r in rows.items()}
            Path(a.json_dir, f"fast-{toy}.json").write_text(json.dumps(out, indent=1) + "\n")
    H, V, K = real.hidden_size, real.vocab_size, FastOptions().sc_top_k
    print(f"\n26B-A4B FLOPs per computed canvas position: layers {position_flops(real) / 1e9:.2f} G, "
          f"LM head {2 * H * V / 1e9:.2f} G, self-conditioning dense {2 * H * V / 1e9:.2f} G / "
          f"top-{K} {2 * H * K / 1e9:.5f} G (+ its MLP {6 * H * real.intermediate_size / 1e9:.3f} G)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One rank of the two-rank runs of test_distributed.py (mlx.launch over 127.0.0.1, ring
backend, or ranks started by hand). Every rank runs the job; each writes what it found
to OUT.<rank>.json, and the test asserts on it.

    python dist_worker.py JOB OUT [ARG ...]

Jobs: `parity CKPT...` (logits, teacher-forced generations, bytes of a split model
against the same checkpoint in one process), `toy DIR N` (held-out accuracy of a trained
toy, split and whole), `errors CKPT OTHER UNSPLITTABLE` (the errors every rank must
raise alike), `drop CKPT` (rank 1 leaves in the middle of a generation).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))

from teacher_forcing import recording, replay, top2_gap  # noqa: E402

import mlx_diffgemma.fast as fast  # noqa: E402
from mlx_diffgemma import load  # noqa: E402
from mlx_diffgemma.denoiser import MLXDenoiser  # noqa: E402
from mlx_diffgemma.drafter import generation_config, run_to_summary  # noqa: E402
from mlx_diffgemma.fast import FastOptions  # noqa: E402
from mlx_diffgemma.generation import make_denoiser, stream_generate  # noqa: E402
from mlx_diffgemma.noise import SeededNoise  # noqa: E402

# (noise seed, prompt length, canvases, generation settings)
RUNS = [
    (0, 5, 2, dict(max_denoising_steps=8)),
    (3, 9, 2, dict(max_denoising_steps=8, stability_threshold=0, confidence_threshold=0.9)),
]


def _bytes(model):
    return {k: int(v.nbytes) for k, v in tree_flatten(model.parameters())}


def _prompt(model, n, seed):
    return np.random.default_rng(seed).integers(3, model.vocab_size, n).tolist()


def _logit_cases(single, split, also=None):
    """Decoder logits of both models on the same inputs: fresh context, with
    self-conditioning, and a second canvas past the sliding window. `also`: another
    split model whose logits must equal `split`'s exactly (same slices, same sums)."""
    rng = np.random.default_rng(7)
    V, C = single.vocab_size, single.canvas_length
    sc = (rng.standard_normal((1, C, V)) * 4).astype(np.float32)
    canvas, first = rng.integers(0, V, (1, C)), rng.integers(0, V, (1, C))
    cases = {"fresh": (5, [], None), "self-conditioned": (5, [], sc),
             "second canvas": (single.args.sliding_window + 3, [first], sc)}
    out = {}
    for name, (n, before, s) in cases.items():
        prompt = rng.integers(0, V, (1, n))
        got = []
        for m in (single, split) + ((also,) if also is not None else ()):
            cache = m.make_cache()
            m.encode(mx.array(prompt), cache)
            for c in before:
                m.encode(mx.array(c), cache)
            got.append(np.array(m.decode(mx.array(canvas), cache, None if s is None else mx.array(s))))
        d = float(np.abs(got[1] - got[0]).max())
        sure = top2_gap(got[0].astype(np.float64)) > 2 * d
        out[name] = {"max_diff": d, "max_abs": float(np.abs(got[0]).max()),
                     "certain": float(sure.mean()),
                     "argmax_mismatches": int(((got[0].argmax(-1) != got[1].argmax(-1)) & sure).sum())}
        if also is not None:
            out[name]["shard_equals_split_load"] = bool(np.array_equal(got[1], got[2]))
    return out


def _replay_reference(single, split):
    """Reference mode, teacher-forced: the one-process run recorded step by step, each
    step's inputs replayed on the split model, its decisions compared where certain."""
    from _pytest.monkeypatch import MonkeyPatch

    out = []
    for seed, n, canvases, kw in RUNS:
        kw = dict(kw, max_new_tokens=canvases * single.canvas_length)
        with recording(MonkeyPatch(), MLXDenoiser) as rec:
            run_to_summary(stream_generate(single, None, _prompt(single, n, seed), noise=SeededNoise(seed), **kw))
        den = make_denoiser(split, generation_config(split, **kw), noise=SeededNoise(seed))
        rep = replay(den, rec, SeededNoise(seed), from_numpy=mx.array)
        out.append({"max_logit_diff": rep.max_logit_diff, "decisions": rep.decisions,
                    "uncertain": rep.uncertain, "mismatches": rep.mismatches, "steps": rep.steps})
    return out


def _forced_fast(single, split, options, runs=RUNS):
    """Fast mode, teacher-forced at its forward (fast.forward_positions): the split
    model computes every forward of the one-process run on the same inputs; its logits
    are compared (argmax where certain), then the recorded ones are used, so both runs
    take the same path."""
    real = fast.forward_positions
    out = []
    for seed, n, canvases, kw in runs:
        kw = dict(kw, max_new_tokens=canvases * single.canvas_length, mode="fast", fast=options)
        log, stats = [], {"forwards": 0, "max_diff": 0.0, "decisions": 0, "uncertain": 0, "mismatches": 0}

        def forward(model, *a, **k):
            got = real(model, *a, **k)
            if model is single:
                log.append(np.array(got))
                return got
            ref = log[stats["forwards"]]
            stats["forwards"] += 1
            mine = np.array(got)
            d = float(np.abs(mine - ref).max())
            sure = top2_gap(ref.astype(np.float64)) > 2 * d + 1e-6
            stats["max_diff"] = max(stats["max_diff"], d)
            stats["decisions"] += sure.size
            stats["uncertain"] += int((~sure).sum())
            stats["mismatches"] += int(((mine.argmax(-1) != ref.argmax(-1)) & sure).sum())
            return mx.array(ref)

        fast.forward_positions = forward
        try:
            tokens = [run_to_summary(stream_generate(m, None, _prompt(single, n, seed),
                                                     noise=SeededNoise(seed), **kw)).tokens
                      for m in (single, split)]
        finally:
            fast.forward_positions = real
        stats["same_tokens"] = tokens[0] == tokens[1]
        stats["recorded"] = len(log)
        out.append(stats)
    return out


def _unforced(single, split):
    """Whole runs, nothing forced: do the tokens happen to match? (Reported only: the
    split model sums in another order, so a near-tie may go the other way.)"""
    out = {}
    for mode in ("reference", "fast"):
        same = []
        for seed, n, canvases, kw in RUNS[:1]:
            kw = dict(kw, max_new_tokens=canvases * single.canvas_length, mode=mode)
            t = [run_to_summary(stream_generate(m, None, _prompt(single, n, seed),
                                                noise=SeededNoise(seed), **kw)).tokens for m in (single, split)]
            same.append(t[0] == t[1])
        out[mode] = same
    return out


def parity(group, *paths):
    """Each checkpoint in turn; the first also runs unforced whole generations, the
    second fast mode with the active set and `Model.shard` of the whole model."""
    t = time.perf_counter()
    out = {p: _parity(group, p, unforced=i == 0, active_set=i == 1, shard=i == 1)
           for i, p in enumerate(paths)}
    out["cli"] = _cli_expected(group, paths[0])
    out["seconds"] = round(time.perf_counter() - t, 2)
    return out


# What test_distributed.py's command-line runs send, and what the split model answers
# through the same code in this process (every rank running it alike).
CLI = {"generate": ("hello there", 3), "chat": (["hello", "again please"], 3),
       "serve": {"prompt": "hello", "max_tokens": 20, "seed": 4, "max_denoising_steps": 4},
       "max_new_tokens": 16, "steps": 4}


def _cli_expected(group, path):
    from mlx_diffgemma.engine import Engine, Sink
    from mlx_diffgemma.generation import generate
    from mlx_diffgemma.images import prepare_prompt
    from mlx_diffgemma.session import ChatSession

    model, tok = load(path, group=group)
    kw = {"max_new_tokens": CLI["max_new_tokens"], "max_denoising_steps": CLI["steps"]}
    text, seed = CLI["generate"]
    ids, _ = prepare_prompt(model, tok, [ChatSession.user_message(text)])
    out = {"generate": generate(model, tok, ids, seed=seed, **kw)}
    lines, seed = CLI["chat"]
    session = ChatSession(model, tok, seed=seed, gen_kwargs={"max_new_tokens": CLI["max_new_tokens"],
                                                               "steps": CLI["steps"]})
    out["chat"] = [[e for e in session.send(line) if e.kind == "summary"][0].text for line in lines]

    class Client:
        def client_gone(self):
            return False

    engine = Engine(lambda: (model, tok), "m")
    try:
        out["serve"] = engine.run(engine.completion_job(dict(CLI["serve"])), Sink(Client())).content
    finally:
        engine.close()
    return out


def _parity(group, path, unforced=False, active_set=False, shard=False):
    mx.clear_cache()
    mx.reset_peak_memory()
    split, _ = load(path, group=group)
    peaks = {"split": int(mx.get_peak_memory())}
    held = int(mx.get_active_memory())
    mx.reset_peak_memory()
    single, _ = load(path)
    peaks["single"] = int(mx.get_peak_memory()) - held  # its own load's peak
    out = {"rank": group.rank(), "bytes": {"split": _bytes(split), "single": _bytes(single)},
           "load_peak": peaks, "seconds": {}}
    sharded = None
    if shard:  # the whole model loaded, then split in memory (Model.shard)
        sharded, _ = load(path)
        sharded.shard(group)
        out["bytes"]["shard"] = _bytes(sharded)
    parts = {"logits": lambda: _logit_cases(single, split, sharded),
             "reference": lambda: _replay_reference(single, split),
             "fast": lambda: _forced_fast(single, split, FastOptions())}
    if active_set:
        parts["fast_active_set"] = lambda: _forced_fast(single, split, FastOptions(active_set=True), RUNS[:1])
    if unforced:
        parts["unforced"] = lambda: _unforced(single, split)
    for name, fn in parts.items():
        t = time.perf_counter()
        out[name] = fn()
        out["seconds"][name] = round(time.perf_counter() - t, 2)
    return out


def toy(group, path, n):
    """Held-out solve rate in fast mode (few steps a canvas: the collectives of this
    CPU's loopback ring cost milliseconds each), one SeededNoise per puzzle, split vs
    whole."""
    import eval_toy
    from train_toy import get_task

    task = get_task("sudoku-open")
    hf = Path(path).parent / "hf"
    held = json.loads((hf / "heldout.json").read_text())["puzzles"][::240 // int(n)][: int(n)]
    max_new = eval_toy.default_max_new_tokens(held, task.canvas_length)
    out = {}
    for name, grp in (("split", group), ("single", None)):
        model, tok = load(path, group=grp)
        count = iter(range(10**6))

        def solve(ids, max_new_tokens, model=model):
            s = run_to_summary(stream_generate(model, None, ids, max_new_tokens=max_new_tokens,
                                               noise=SeededNoise(next(count)), mode="fast"))
            tokens = s.tokens + [0] * (s.canvases * model.canvas_length - len(s.tokens))
            return tokens, sum(s.steps_per_canvas) / s.canvases

        out[name] = eval_toy.evaluate(solve, tok, held, task.canvas_length, max_new, task)
        out[name].pop("seconds")
    return out


def errors(group, path, other, unsplittable):
    """Each error in turn (every rank raises it at the same point, so they go on):
    rank 1 loading another model, a model whose KV heads do not split over 2 ranks,
    and ranks drawing different noise."""
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)

    attempt("different models", lambda: load([path, other][group.rank()], group=group))
    attempt("rank count", lambda: load(unsplittable, group=group))
    model, _ = load(path, group=group)
    attempt("disagreement", lambda: run_to_summary(stream_generate(
        model, None, [5, 6, 7], noise=SeededNoise(group.rank()), max_new_tokens=model.canvas_length,
        max_denoising_steps=4)))
    return out


def drop(group, path):
    """Rank 1 of an `mlx-diffgemma generate` run (rank 0 is the command itself): it
    follows rank 0 as the command's own followers do, and leaves after its first
    denoising step."""
    from mlx_diffgemma.backends import MLXBackend
    from mlx_diffgemma.mirror import follow

    model, tok = load(path, group=group)
    real_step = MLXDenoiser.step

    def step(self, *a):
        real_step(self, *a)
        os._exit(3)

    MLXDenoiser.step = step
    follow(MLXBackend(model), lambda: tok, group)
    return {"finished": True}


JOBS = {"parity": parity, "toy": toy, "errors": errors, "drop": drop}


def main() -> None:
    job, out, *args = sys.argv[1:]
    group = mx.distributed.init()
    result = JOBS[job](group, *args)
    Path(f"{out}.{group.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

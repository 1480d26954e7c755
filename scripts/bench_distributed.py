#!/usr/bin/env python
"""One model split over several ranks: measured here, and a cost model at the released
shapes for two and four Macs.

``python scripts/bench_distributed.py measure [--preset small] [--steps 5] [--json OUT]``
    The synthetic preset (mixed-4, float32 scales on this CPU) saved once, then loaded
    and stepped by one process and by two ranks over 127.0.0.1 (ring backend):
    load time, prefill, denoising step time (reference mode, self-conditioned, the
    ranks' per-step check included), resident weights and peak memory per rank, and
    the time of one all_sum of a canvas x hidden array between the two ranks.
``python scripts/bench_distributed.py cost-model [--json OUT]``
    Per step at the released 26B-A4B shapes (mixed-4): FLOPs, bytes read and the bytes
    and time of the all-reduces per rank, on 1, 2 and 4 Macs, ring over Thunderbolt and
    JACCL; step time and tokens per second against one Mac, reference and fast mode;
    and what splitting the LM head or the self-conditioning product by vocabulary rows
    would save and cost. The figures it assumes are in `MACS` and `LINKS` (sources in
    BENCHMARKS.md).
``python scripts/bench_distributed.py rank DIR OUT`` (internal: one rank of `measure`)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# -- measured here -------------------------------------------------------------------------


def save_synthetic(preset: str, out: Path) -> Path:
    """The synthetic preset (mixed-4, float32 scales) as a model directory."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_diffgemma.config import GenerationConfig
    from mlx_diffgemma.synthetic import hf_config, preset_args, quantization_of, synthetic_model

    args = preset_args(preset)
    model = synthetic_model(args, recipe="mixed-4", dtype=mx.float32)
    config = hf_config(args)
    config["quantization"] = dict(group_size=64, bits=4, **quantization_of(model))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps(vars(GenerationConfig())))
    return out


def run_rank(model_dir: str, out: str, steps: int, prompt_tokens: int, lanes=None) -> None:
    """One rank (or the one process) of `measure`; `lanes`: the one process's lanes."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlx_diffgemma.distributed import launched_group
    from mlx_diffgemma.drafter import generation_config
    from mlx_diffgemma.generation import make_denoiser
    from mlx_diffgemma.loader import load
    from mlx_diffgemma.noise import SeededNoise

    group = launched_group()
    t = time.perf_counter()
    model, _ = load(model_dir, group=group, tokenizer=False)
    model.lanes = lanes
    res = {"ranks": 1 if group is None else group.size(), "load_s": time.perf_counter() - t,
           "lanes": len(model.lanes_for(model.canvas_length)),
           "weights_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
           "load_peak_bytes": mx.get_peak_memory()}
    ids = np.random.default_rng(0).integers(3, model.vocab_size, (1, prompt_tokens))
    cache = model.make_cache()
    t = time.perf_counter()
    model.encode(mx.array(ids), cache)
    res["prefill_s"] = time.perf_counter() - t
    gen = generation_config(model, max_denoising_steps=steps + 2, eos_token_id=None)
    den = make_denoiser(model, gen, cache=cache, noise=SeededNoise(0))
    mx.reset_peak_memory()
    canvas = den.start_canvas(0)
    canvas = den.step(canvas, 0, steps + 2)[0]  # warm-up, and the step with no self-conditioning
    times = []
    for s in range(steps + 1, 1, -1):
        t = time.perf_counter()
        canvas = den.step(canvas, 0, s)[0]
        times.append(time.perf_counter() - t)
    res["step_s"] = sorted(times)[len(times) // 2]
    res["step_times"] = times
    res["step_peak_bytes"] = mx.get_peak_memory()
    if group is not None:
        x = mx.ones((1, model.canvas_length, model.args.hidden_size), model.dtype)
        mx.eval(mx.distributed.all_sum(x, group=group))
        lat = []
        for _ in range(10):
            t = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=group))
            lat.append(time.perf_counter() - t)
        res["all_sum_canvas_x_hidden_s"] = sorted(lat)[len(lat) // 2]
        res["all_sum_bytes"] = x.nbytes
        res["rank"] = group.rank()
    Path(f"{out}.{0 if group is None else group.rank()}.json").write_text(json.dumps(res))


def _free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no free ports")


def _run(argvs, timeout: float, envs=None, cores=None) -> None:
    """The processes `argvs` at once (`envs`: their extra environment; `cores`: the core
    each runs on, from its start), each in its own process group, killed on time-out."""
    procs = []
    for i, argv in enumerate(argvs):
        pin = None if cores is None else (lambda c=cores[i]: os.sched_setaffinity(0, {c}))
        procs.append(subprocess.Popen(argv, start_new_session=True, cwd=str(ROOT), preexec_fn=pin,
                                      env=dict(os.environ, **(envs[i] if envs else {}))))
    try:
        for p in procs:
            if p.wait(timeout) != 0:
                raise RuntimeError(f"{argvs[0][:4]} failed ({p.returncode})")
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{argvs[0][:4]} ran past {timeout} s") from None
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def measure(args) -> dict:
    """One process, then two ranks over 127.0.0.1 started as mlx.launch starts them (a
    ring host file and MLX_RANK), each on a core of its own, without mlx.launch's own
    process: its I/O loop polls and would take one of this machine's two cores."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    try:
        model = save_synthetic(args.preset, tmp / "model")
        me = [sys.executable, str(Path(__file__).resolve()), "rank", str(model)]
        extra = ["--steps", str(args.steps), "--prompt-tokens", str(args.prompt_tokens)]
        _run([me + [str(tmp / "one")] + extra], args.timeout)
        _run([me + [str(tmp / "one-lane")] + extra + ["--lanes", "1"]], args.timeout)
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        pinned = None if not cores else [cores[r % len(cores)] for r in (0, 1)]
        # Two independent one-lane processes at once: what this machine gives two processes.
        _run([me + [str(tmp / f"pair{r}")] + extra + ["--lanes", "1"] for r in (0, 1)], args.timeout,
             cores=pinned)
        port = _free_port()
        hostfile = tmp / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
        _run([me + [str(tmp / "two")] + extra] * 2, args.timeout,
             envs=[{"MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(r)} for r in (0, 1)], cores=pinned)
        one = json.loads((tmp / "one.0.json").read_text())
        one_lane = json.loads((tmp / "one-lane.0.json").read_text())
        pair = [json.loads((tmp / f"pair{r}.0.json").read_text()) for r in (0, 1)]
        two = [json.loads((tmp / f"two.{r}.json").read_text()) for r in (0, 1)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"preset": args.preset, "steps_timed": args.steps, "prompt_tokens": args.prompt_tokens,
            "one_process": one, "one_process_one_lane": one_lane, "two_ranks": two,
            "two_one_lane_processes_at_once": pair}


def print_measure(r: dict) -> None:
    one, one_lane, two = r["one_process"], r["one_process_one_lane"], r["two_ranks"]
    mb = 1e6
    print(f"synthetic {r['preset']} (mixed-4, float32 scales), prompt {r['prompt_tokens']} tokens, "
          f"median of {r['steps_timed']} self-conditioned steps")
    print("| | lanes per rank | load (s) | prefill (s) | step (s) | weights held (MB) | peak, load (MB) | peak, steps (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("one process", one), ("one process, one lane", one_lane)]
    rows += [(f"two one-lane processes at once, #{i}", x) for i, x in enumerate(r["two_one_lane_processes_at_once"])]
    rows += [(f"2 ranks, rank {x['rank']}", x) for x in two]
    for name, x in rows:
        print(f"| {name} | {x['lanes']} | {x['load_s']:.2f} | {x['prefill_s']:.3f} | {x['step_s']:.3f} | "
              f"{x['weights_bytes'] / mb:.1f} | {x['load_peak_bytes'] / mb:.1f} | {x['step_peak_bytes'] / mb:.1f} |")
    slow = max(x["step_s"] for x in two)
    print(f"step time, one process / two ranks: {one['step_s'] / slow:.2f}x (one lane: "
          f"{one_lane['step_s'] / slow:.2f}x); "
          f"one all_sum of {two[0]['all_sum_bytes'] / 1e3:.0f} KB between the ranks: "
          f"{two[0]['all_sum_canvas_x_hidden_s'] * 1e3:.1f} ms")


# -- the cost model at the released shapes -----------------------------------------------------

# GPU: ALUs x 2 FLOP x clock as GPU databases list the clocks (hmc-tech.com: the M4 and
# M4 Pro GPUs at 1470 MHz, the M4 Max at 1678 MHz, as scripts/roofline.py takes it; Apple
# GPUs run FP16 at the FP32 rate), memory bandwidth as Apple specifies it; which
# Thunderbolt the machine has.
MACS = {
    "M4 (10-core GPU)": dict(flops=1280 * 2 * 1.47e9, bandwidth=120e9, thunderbolt=4),
    "M4 Pro (20-core GPU)": dict(flops=2560 * 2 * 1.47e9, bandwidth=273e9, thunderbolt=5),
    "M4 Max (40-core GPU)": dict(flops=5120 * 2 * 1.678e9, bandwidth=546e9, thunderbolt=5),
}
# Per link: seconds per ring step (latency) and bytes per second (BENCHMARKS.md, sources).
LINKS = {
    "ring (TCP over Thunderbolt)": dict(latency=300e-6, bandwidth=2.0e9, thunderbolt=4),
    "JACCL (RDMA over Thunderbolt 5)": dict(latency=10e-6, bandwidth=7.6e9, thunderbolt=5),
}
HOST_SYNC = 100e-6  # a GPU -> host read (the split experts' count, once per layer)
STEPS = {"reference": 15.14, "fast": 3.62}  # per canvas, toy-sudoku-open (BENCHMARKS.md)


def step_parts(config: dict, ranks: int, mode: str, context: int = 4096) -> dict:
    """FLOPs and bytes of one denoising step per rank, by part, at canvas C, and the
    all-reduces it issues (count, bytes each). Balanced routing assumed (each rank's
    experts take 1/ranks of the token-expert pairs)."""
    from mlx_diffgemma.config import ModelArgs
    from mlx_diffgemma.sizes import estimate

    a = ModelArgs.from_dict(config)
    C, H, V, N = a.canvas_length, a.hidden_size, a.vocab_size, ranks
    est = estimate(config, "mixed-4", ranks=N, dtype="bfloat16")["by_kind"]
    act = 2  # bf16 activations
    layers = 0.0
    for i, kind in enumerate(a.layer_types):
        hd, kv = a.head_dim_of(i), a.kv_heads_of(i)
        q_heads, kv_heads = a.num_attention_heads // N, max(1, kv // N)
        proj = 2 * C * H * hd * (2 * q_heads + kv_heads * (2 if kind == "sliding_attention" else 1))
        keys = (min(context, a.sliding_window - 1) if kind == "sliding_attention" else context) + C
        scores = 2 * 2 * C * keys * q_heads * hd
        layers += proj + scores
    layers += a.num_hidden_layers * (2 * C * 3 * H * a.intermediate_size / N  # dense MLP
                                     + 2 * C * H * a.num_experts  # router, on every rank
                                     + 2 * C * a.top_k_experts * 3 * H * a.moe_intermediate_size / N)
    weights = sum(v["bytes"] for k, v in est.items() if k not in ("embedding", "self_conditioning"))
    kv_bytes = sum(2 * max(1, a.kv_heads_of(i) // N) * a.head_dim_of(i) * act  # the cached keys read
                   * (min(context, a.sliding_window - 1) if t == "sliding_attention" else context)
                   for i, t in enumerate(a.layer_types))
    sc_mlp = 2 * C * 3 * H * a.intermediate_size
    if mode == "reference":
        sc = 2 * C * V * H / N  # the product, split by vocabulary rows over the replicated table
        sampler_passes = 5  # softmax/entropy, Gumbel sum and argmax, argmax, cast to bf16
    else:
        sc = 2 * C * 64 * H  # top-64 rows of the table
        sampler_passes = 3  # top-K selection passes
    logits = C * V * 4
    parts = {
        "layers": (layers, weights + kv_bytes),
        "LM head": (2 * C * H * V, est["embedding"]["bytes"]),
        "self-conditioning": (sc + sc_mlp, (est["embedding"]["bytes"] / N if mode == "reference" else 0)
                              + est["self_conditioning"]["bytes"]),
        "sampler": (0.0, sampler_passes * logits),
    }
    reduces = [(a.num_hidden_layers, C * H * act), (a.num_hidden_layers, 2 * C * H * act)]
    if mode == "reference":
        reduces.append((1, C * H * act))  # the self-conditioning product's halves
    return {"parts": parts, "reduces": reduces if N > 1 else [], "layers": a.num_hidden_layers}


def ring_time(nbytes: float, ranks: int, link: dict) -> float:
    """A ring all-reduce: 2(N-1) steps of nbytes/N each."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) * (link["latency"] + nbytes / ranks / link["bandwidth"])


def step_time(config: dict, ranks: int, mode: str, mac: dict, link: dict) -> dict:
    p = step_parts(config, ranks, mode)
    compute = sum(max(f / mac["flops"], b / mac["bandwidth"]) for f, b in p["parts"].values())
    comm = sum(n * ring_time(b, ranks, link) for n, b in p["reduces"])
    if ranks > 1:
        comm += p["layers"] * HOST_SYNC + ring_time(3 * 256 * 4, ranks, link)  # + the step check
    encode = max(p["parts"]["layers"][0] / mac["flops"], p["parts"]["layers"][1] / mac["bandwidth"])
    encode += sum(n * ring_time(b, ranks, link) for n, b in p["reduces"][:2])
    return {"flops": sum(f for f, _ in p["parts"].values()), "bytes": sum(b for _, b in p["parts"].values()),
            "reduce_bytes": sum(n * b for n, b in p["reduces"]), "compute_s": compute, "comm_s": comm,
            "step_s": compute + comm, "encode_s": encode}


def tokens_per_second(t: dict, mode: str, canvas: int = 256) -> float:
    return canvas / (STEPS[mode] * t["step_s"] + t["encode_s"])


def head_split(config: dict, mac: dict, link: dict, ranks: int = 2) -> dict:
    """Per step: what splitting the LM head or the self-conditioning product by vocabulary
    rows saves in compute, and what its communication costs."""
    from mlx_diffgemma.config import ModelArgs

    a = ModelArgs.from_dict(config)
    C, H, V = a.canvas_length, a.hidden_size, a.vocab_size
    work = 2 * C * H * V / mac["flops"] * (1 - 1 / ranks)
    gather = 2 * (ranks - 1) / ranks * C * V * 2 / link["bandwidth"] + (ranks - 1) * link["latency"]
    return {"saved_s": work, "lm_head_gather_s": gather, "sc_reduce_s": ring_time(C * H * 2, ranks, link)}


def cost_model(json_out=None) -> dict:
    from mlx_diffgemma.sizes import estimate
    from mlx_diffgemma.synthetic import hf_config, preset_args

    config = hf_config(preset_args("real"))
    print("links: " + "; ".join(f"{k}: {v['latency'] * 1e6:g} us a ring step, {v['bandwidth'] / 1e9:g} GB/s"
                                for k, v in LINKS.items()))
    out = {"weights_per_rank_gb": {n: estimate(config, "mixed-4", ranks=n, dtype="bfloat16")["text_bytes"] / 1e9
                                   for n in (1, 2, 4)}, "rows": [], "head": {}}
    for mac_name, mac in MACS.items():
        for mode in ("reference", "fast"):
            one = step_time(config, 1, mode, mac, LINKS["ring (TCP over Thunderbolt)"])
            for link_name, link in LINKS.items():
                if link["thunderbolt"] > mac["thunderbolt"]:
                    continue  # JACCL needs Thunderbolt 5
                for n in (1, 2, 4):
                    if n == 1 and link_name.startswith("JACCL"):
                        continue
                    t = one if n == 1 else step_time(config, n, mode, mac, link)
                    out["rows"].append(dict(mac=mac_name, mode=mode, link="-" if n == 1 else link_name, ranks=n,
                                            tok_s=tokens_per_second(t, mode),
                                            speedup=one["step_s"] / t["step_s"], **t))
        for link_name, link in LINKS.items():
            if link["thunderbolt"] <= mac["thunderbolt"]:
                out["head"][f"{mac_name}, {link_name}"] = head_split(config, mac, link)
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1))
    return out


def print_cost_model(r: dict) -> None:
    w = r["weights_per_rank_gb"]
    print("weights per rank (mixed-4, bf16 scales): " + ", ".join(f"{n} rank(s) {g:.2f} GB" for n, g in w.items()))
    print("| Mac | link | Macs | FLOPs / rank | bytes read / rank | all-reduced / rank | compute (ms) | "
          "communication (ms) | reference step (ms) | x one Mac | tok/s | fast step (ms) | x one Mac | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = [x for x in r["rows"] if x["mode"] == "reference"]
    fast = {(x["mac"], x["link"], x["ranks"]): x for x in r["rows"] if x["mode"] == "fast"}
    for x in ref:
        f = fast[x["mac"], x["link"], x["ranks"]]
        print(f"| {x['mac']} | {x['link']} | {x['ranks']} | {x['flops'] / 1e12:.2f} T | {x['bytes'] / 1e9:.2f} GB | "
              f"{x['reduce_bytes'] / 1e6:.0f} MB | {x['compute_s'] * 1e3:.0f} | {x['comm_s'] * 1e3:.1f} | "
              f"{x['step_s'] * 1e3:.0f} | {x['speedup']:.2f} | {x['tok_s']:.1f} | {f['step_s'] * 1e3:.0f} | "
              f"{f['speedup']:.2f} | {f['tok_s']:.1f} |")
    print("\nsplitting by vocabulary rows over 2 Macs, per step (ms): compute saved / communication added")
    for k, h in r["head"].items():
        print(f"  {k}: LM head {h['saved_s'] * 1e3:.1f} saved / {h['lm_head_gather_s'] * 1e3:.1f} to gather "
              f"the logits; self-conditioning {h['saved_s'] * 1e3:.1f} saved / {h['sc_reduce_s'] * 1e3:.2f} "
              "to all-reduce its product")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--preset", default="small")
    m.add_argument("--steps", type=int, default=5)
    m.add_argument("--prompt-tokens", type=int, default=512)
    m.add_argument("--timeout", type=float, default=1200)
    m.add_argument("--json", default=None)
    c = sub.add_parser("cost-model")
    c.add_argument("--json", default=None)
    for name, key in (("ring", "ring (TCP over Thunderbolt)"), ("jaccl", "JACCL (RDMA over Thunderbolt 5)")):
        c.add_argument(f"--{name}-latency-us", type=float, default=LINKS[key]["latency"] * 1e6,
                       help=f"seconds per ring step of {key}, in microseconds")
        c.add_argument(f"--{name}-gbps", type=float, default=LINKS[key]["bandwidth"] / 1e9,
                       help=f"bandwidth of {key}, GB/s")
    r = sub.add_parser("rank")
    r.add_argument("model")
    r.add_argument("out")
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--prompt-tokens", type=int, default=512)
    r.add_argument("--lanes", type=int, default=None)
    args = p.parse_args(argv)
    if args.cmd == "rank":
        run_rank(args.model, args.out, args.steps, args.prompt_tokens, args.lanes)
    elif args.cmd == "measure":
        res = measure(args)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        print_measure(res)
    else:
        for name, key in (("ring", "ring (TCP over Thunderbolt)"), ("jaccl", "JACCL (RDMA over Thunderbolt 5)")):
            LINKS[key].update(latency=getattr(args, f"{name}_latency_us") * 1e-6,
                              bandwidth=getattr(args, f"{name}_gbps") * 1e9)
        print_cost_model(cost_model(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())

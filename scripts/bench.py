#!/usr/bin/env python
"""Our implementation side by side with mlx-vlm 0.7.10 and transformers on the same
checkpoint, in one process, one after the other; optionally our step split into its
pieces (`--breakdown`).

Takes every option of `mlx-diffgemma bench` (what is measured: mlx_diffgemma/bench.py)
plus the ones below; mlx-vlm runs the same arrays (shared), transformers runs them
dequantized to float32. Each run also checks that the implementations compute the same
function (decoder logits on one canvas). BENCHMARKS.md has the commands and results.

    python scripts/bench.py                      # preset "small", all three
    python scripts/bench.py --config real --impl ours,mlx-vlm --steps 48
    python scripts/bench.py --breakdown --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from mlx_diffgemma.bench import bench  # noqa: E402

IMPLS = ("ours", "mlx-vlm", "transformers")


def parser() -> argparse.ArgumentParser:
    p = bench.add_bench_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    peers = p.add_argument_group("peers")
    peers.add_argument("--impl", default=None,
                       help="comma-separated subset of ours,mlx-vlm,transformers (default: all "
                       "available; transformers is left out for --config real)")
    peers.add_argument("--no-check", action="store_true",
                       help="skip comparing the implementations' decoder logits")
    peers.add_argument("--breakdown", action="store_true", help="also time each piece of our step")
    peers.add_argument("--torch-threads", type=int, default=None,
                       help="torch intra-op threads (default: OMP_NUM_THREADS, else 1)")
    peers.add_argument("--torch-device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


def impls(args) -> List[str]:
    if args.impl:
        chosen = [x.strip() for x in args.impl.split(",") if x.strip()]
        bad = [x for x in chosen if x not in IMPLS]
        if bad:
            raise ValueError(f"unknown implementation(s) {bad}; choose from {', '.join(IMPLS)}")
        return chosen
    # The released shapes' float32 weights do not fit beside the quantized ones.
    return ["ours", "mlx-vlm"] if args.config == "real" and not args.model else list(IMPLS)


def peer_versions() -> Dict[str, Any]:
    info: Dict[str, Any] = {}
    try:
        import mlx_vlm

        info["mlx_vlm"] = mlx_vlm.__version__
    except ImportError:
        pass
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def set_torch_threads(args) -> None:
    try:
        import torch
    except ImportError:
        return
    # One intra-op thread unless told otherwise: on the 2-core machine of BENCHMARKS.md,
    # two threads made transformers' step 7x slower (OpenMP waits on a busy sibling core).
    torch.set_num_threads(args.torch_threads or int(os.environ.get("OMP_NUM_THREADS") or 1))


def make_runner(name: str, model, config, gen, args, report):
    import bench_peers as peers

    if name == "ours":
        return bench.OursRunner(model, gen, seed=args.seed)
    if name == "mlx-vlm":
        import mlx_vlm

        report["labels"]["mlx-vlm"] = f"mlx-vlm {mlx_vlm.__version__}"
        report["notes"].append(
            "mlx-vlm: step = the body of stream_diffusion_generate's loop for "
            "diffusion_sampler='entropy-bound', temperature=1.0, diffusion_full_canvas=True, "
            "with its own functions (decoder logits, schedule, argmax, categorical, entropy, "
            "self-conditioning input, acceptance, renoise, stable-and-confident check); "
            "generation = stream_diffusion_generate itself with those settings (its loop skips "
            "the sampler at the last step of a canvas)"
        )
        return peers.MLXVLMRunner(peers.build_mlx_vlm_model(model, config, gen), gen, seed=args.seed)
    if name == "transformers":
        import torch
        import transformers

        need = peers.torch_float_bytes(model)
        if need > 8e9 and not os.environ.get("BENCH_FORCE_TORCH"):
            raise RuntimeError(
                f"transformers needs the float32 weights ({need / 1e9:.0f} GB) in memory; "
                "skipped (set BENCH_FORCE_TORCH=1 to try)"
            )
        device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
        report["labels"]["transformers"] = f"transformers {transformers.__version__} ({device})"
        report["notes"].append(
            f"transformers: float32 weights (the quantized ones dequantized), "
            f"{torch.get_num_threads()} torch thread(s); step = TorchDenoiser.step "
            "(transformers' network + the reference sampler, as its generate() does it)"
        )
        return peers.TorchRunner(peers.build_torch_model(model, config, device), gen, seed=args.seed)
    raise ValueError(name)


def _ratio(ours, theirs, higher_is_better=False):
    if not ours or not theirs:
        return None
    return ours / theirs if higher_is_better else theirs / ours


def ratios(results: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Our speed-up over each peer per metric (>1: ours is faster)."""
    ours = results.get("ours")
    if not ours or "error" in ours:
        return {}
    return {
        name: {
            "prefill": _ratio(ours.get("prefill_s"), r.get("prefill_s")),
            "step": _ratio(ours.get("step_s"), r.get("step_s")),
            "canvas": _ratio(ours.get("canvas_s"), r.get("canvas_s")),
            "generate": _ratio(ours.get("generate_tps"), r.get("generate_tps"), True),
        }
        for name, r in results.items() if name != "ours" and "error" not in r
    }


def check_logits(runners, prompt: np.ndarray, vocab: int, canvas_length: int, seed: int, report) -> None:
    """Decoder logits of every peer against ours on one canvas after a short prompt."""
    canvas = np.random.default_rng(seed + 1).integers(0, vocab, (1, canvas_length))
    short = prompt[:, : min(prompt.shape[1], 64)]
    ref = runners["ours"].decoder_logits(short, canvas)
    report["check"] = {}
    for name, runner in runners.items():
        if name == "ours":
            continue
        try:
            other = runner.decoder_logits(short, canvas)
            report["check"][name] = {
                "max_abs_diff": float(np.abs(other - ref).max()),
                "argmax_agreement": float((other.argmax(-1) == ref.argmax(-1)).mean()),
            }
        except Exception as e:
            report["notes"].append(f"logit check for {name} failed: {e}")


def print_comparison(report: Dict[str, Any], console) -> None:
    rat = report["ratios"]

    def cells(name, metric):
        v = rat.get(name, {}).get(metric) if metric else None
        return [f"{v:.2f}x" if v else "-"]

    bench.print_report(
        report, console, extra=cells, extra_columns=["ours x"],
        title="DiffusionGemma bench (seconds unless noted; 'ours x' = our speed-up, >1 = faster)",
    )
    for n, c in (report.get("check") or {}).items():
        console.print(
            f"same checkpoint: {n} decoder logits vs ours max |diff| {c['max_abs_diff']:.2e}, "
            f"argmax agreement {c['argmax_agreement']:.4f}"
        )
    if report.get("breakdown"):
        from bench_breakdown import print_breakdown

        print_breakdown(report["breakdown"], console)


def main(argv=None) -> int:
    from rich.console import Console

    p = parser()
    args = p.parse_args(argv)
    console = Console(width=max(Console().width, 120))
    if args.memory_arithmetic:
        return bench.print_memory_arithmetic(args, console)
    try:
        chosen = impls(args)
    except ValueError as e:
        p.error(str(e))
    if "transformers" in chosen:
        set_torch_threads(args)
    also_skip = None
    if "mlx-vlm" in chosen:
        from bench_peers import mlx_vlm_special_ids as also_skip
    model, config, gen, prompt, report = bench.prepare(args, also_skip)
    report["machine"].update(peer_versions())
    runners = {}
    for name in chosen:
        try:
            runners[name] = make_runner(name, model, config, gen, args, report)
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            report["results"][name] = {"error": f"{type(e).__name__}: {e}"}
    bench.run_all(runners, report, prompt, args, console)
    report["results"] = {n: report["results"][n] for n in chosen}
    report["ratios"] = ratios(report["results"])
    if not args.no_check and "ours" in runners and len(runners) > 1:
        check_logits(runners, prompt, model.vocab_size, model.canvas_length, args.seed, report)
    if args.breakdown:
        from bench_breakdown import breakdown

        report["breakdown"] = breakdown(model, prompt, gen, iters=args.iters)
    print_comparison(report, console)
    bench.write_json(report, args.json, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())

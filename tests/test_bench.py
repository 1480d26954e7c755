"""The bench on a tiny synthetic checkpoint: `mlx-diffgemma bench` and the side-by-side
`scripts/bench.py` run end to end for every implementation and report what
BENCHMARKS.md relies on. No timing assertions (shared CI machines)."""

import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
from bench import main  # scripts/bench.py

from mlx_diffgemma.cli import main as cli_main

HAVE_VLM = importlib.util.find_spec("mlx_vlm") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    impls = ["ours"] + (["mlx-vlm"] if HAVE_VLM else []) + (["transformers"] if HAVE_TORCH else [])
    rc = main([
        "--config", "tiny", "--impl", ",".join(impls), "--steps", "2",
        "--iters", "1", "--warmup", "0", "--prompt-tokens", "40", "--gen-tokens", "64",
        "--breakdown", "--json", str(out),
    ])
    assert rc == 0
    return json.loads(out.read_text()), impls


def test_json_fields(report):
    rep, impls = report
    m = rep["machine"]
    assert m["cpu"] and m["mlx"] and "name" in m["blas"] and m["blas"]["sgemm_gflops"] > 0
    assert rep["model"]["quantized_bits"] == [4, 8]  # mixed-4
    assert rep["model"]["layers"] == 2 and rep["model"]["canvas"] == 32
    assert rep["settings"]["steps"] == 2 and rep["settings"]["gen_tokens"] == 64
    for name in impls:
        r = rep["results"][name]
        assert "error" not in r, r
        for key in ("prefill_s", "step_s", "canvas_s", "generate_tps"):
            assert r[key] > 0, (name, key)
        # Fixed step count: random weights never stop early, two canvases of 2 steps.
        assert r["generate_tokens"] == 64
    assert rep["results"]["ours"]["peak_gb"] > 0
    for name in impls[1:]:
        assert set(rep["ratios"][name]) == {"prefill", "step", "canvas", "generate"}
        assert all(v > 0 for v in rep["ratios"][name].values())


def test_cli_bench_runs_ours(tmp_path):
    out = tmp_path / "ours.json"
    rc = cli_main([
        "bench", "--config", "tiny", "--steps", "2", "--iters", "1", "--warmup", "0",
        "--prompt-tokens", "40", "--gen-tokens", "64", "--json", str(out),
    ])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert list(rep["results"]) == ["ours"]
    r = rep["results"]["ours"]
    assert r["generate_tokens"] == 64 and r["step_s"] > 0 and r["peak_gb"] > 0
    assert "target_gb" not in json.dumps(rep)


def test_cli_bench_takes_model_names_and_fits_the_prompt_to_the_context(tmp_path, capsys):
    """`--model` as the other commands take it (the packaged toy-sudoku, 512-token
    context): the default prompt shrinks to fit beside the generation, and one that
    cannot fit is refused in one line."""
    out = tmp_path / "toy.json"
    assert cli_main(["bench", "--model", "toy-sudoku", "--steps", "2", "--iters", "1", "--warmup", "0",
                     "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    r = rep["results"]["ours"]
    assert "error" not in r and r["prefill_s"] > 0 and r["generate_tokens"] == 48
    assert rep["settings"]["prompt_tokens"] == 512 - 48
    assert rep["settings"]["prompt"].endswith("fitted to the 512-token context")
    capsys.readouterr()
    assert cli_main(["bench", "--model", "toy-sudoku", "--prompt-tokens", "500"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--prompt-tokens 500 + 48 generated exceed the model's 512-token context; "
                                     "use --prompt-tokens 464 or less") in err


def test_cli_bench_fails_when_nothing_was_measured(monkeypatch, capsys):
    from mlx_diffgemma.bench import bench

    def broken(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(bench, "measure", broken)
    assert cli_main(["bench", "--config", "tiny", "--steps", "2", "--iters", "1", "--warmup", "0",
                     "--prompt-tokens", "40", "--gen-tokens", "64"]) == 2
    assert "nothing was measured: RuntimeError: the device went away" in capsys.readouterr().err


def test_peers_run_the_same_checkpoint(report):
    rep, impls = report
    for name in impls[1:]:
        c = rep["check"][name]
        assert c["max_abs_diff"] < 1e-3 and c["argmax_agreement"] == 1.0, (name, c)


def test_breakdown(report):
    rep, _ = report
    bd = rep["breakdown"]
    pieces = bd["pieces_s"]
    for key in ("attention", "experts (router + experts)", "dense MLP",
                "LM head (norm, matmul, softcap)"):
        assert pieces[key] > 0
    assert any(k.startswith("self-conditioning") for k in pieces)
    assert any(k.startswith("sampler") for k in pieces)
    assert bd["layer_counts"] == {"sliding_attention": 1, "full_attention": 1}


@pytest.mark.parametrize("lanes", [1, 2])
def test_compiled_decoder_matches_eager(lanes, monkeypatch):
    """The `compile_decode` switch (offset passed as an array, cache views as inputs) gives
    the eager logits bit for bit, across canvases (the trace is redone per context shape),
    on one lane and on two (lanes.py; 16-token lanes so the 32-token canvas splits)."""
    import mlx_diffgemma.models.lanes as lanes_mod
    from mlx_diffgemma.bench.synthetic import preset_args, synthetic_model

    monkeypatch.setattr(lanes_mod, "MIN_LANE_TOKENS", 16)
    args = preset_args("tiny")
    model = synthetic_model(args, seed=3)
    model.lanes = lanes
    assert len(model.lanes_for(args.canvas_length)) == lanes
    V, C = args.vocab_size, args.canvas_length
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, V, (1, 20))), cache)
    for _ in range(2):
        canvas = mx.array(rng.integers(0, V, (1, C)))
        sc = mx.array(rng.standard_normal((1, C, V)).astype(np.float32))
        out = {}
        for compiled in (False, True):
            model.compile_decode = compiled
            out[compiled] = [np.array(model.decode(canvas, cache, s)) for s in (None, sc)]
        for a, b in zip(out[False], out[True]):
            np.testing.assert_array_equal(a, b)
        model.encode(canvas, cache)  # next canvas: longer context


def test_memory_arithmetic_of_the_real_model():
    from mlx_diffgemma.bench.bench import memory_arithmetic
    from mlx_diffgemma.bench.synthetic import hf_config, preset_args

    mem = memory_arithmetic(hf_config(preset_args("real")))
    assert 15.0 < mem["weights_gb"] < 16.0  # mixed-4 of the 26B-A4B text model
    assert mem["unit_gb"] == pytest.approx(256 * 262144 * 4 / 1e9)
    assert mem["total_gb"] == pytest.approx(
        mem["weights_gb"] + mem["kv_cache_gb"] + mem["step_activations_gb"] + mem["layer_activations_gb"])


def test_lanes_keep_the_step_peak_of_one_lane(monkeypatch):
    """On lanes `decode` evaluates its logits before the sampler runs: in one graph with
    the sampler the concurrent lanes kept one more [canvas x vocab] array alive."""
    import mlx_diffgemma.models.lanes as lanes_mod
    from mlx_diffgemma.bench.bench import bench_generation
    from mlx_diffgemma.bench.synthetic import preset_args, synthetic_model
    from mlx_diffgemma.generation.denoiser import MLXDenoiser

    monkeypatch.setattr(lanes_mod, "MIN_LANE_TOKENS", 16)
    args = preset_args("tiny", vocab_size=16384)
    model = synthetic_model(args, recipe="fp32", seed=1)
    unit = args.canvas_length * args.vocab_size * 4
    peaks = {}
    for lanes in (1, 2):
        model.lanes = lanes
        assert len(model.lanes_for(args.canvas_length)) == lanes
        den = MLXDenoiser(model, bench_generation(8, args.canvas_length))
        den.encode(list(range(3, 40)))
        canvas = den.start_canvas(0)
        canvas = den.step(canvas, 0, 8)[0]
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        den.step(canvas, 0, 7)  # self-conditioned
        peaks[lanes] = (mx.get_peak_memory() - base) / unit
    assert peaks[2] <= peaks[1] + 0.25, peaks

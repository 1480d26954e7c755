"""The smaller recipes (mxfp4-mixed, 3bit-mixed, 2bit-mixed): each converts with the widths,
modes and record it promises, loads in ours and in mlx-vlm 0.7.10 with the same logits,
re-quantizes through `quantize`; the load-time memory check; loading holds one copy.

On the tiny `q64` checkpoint of tests/test_convert.py (every input dimension a multiple of
64, so the real group sizes apply)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from teacher_forcing import assert_argmax_where_certain
from test_convert import _args, _inputs, _kind, _our_logits, _tensors, _vlm_logits, assert_same_tensors

from mlx_diffgemma.convert.commands import convert
from mlx_diffgemma.convert.quantize import quantize
from mlx_diffgemma.convert.verify import VerifyError, compare_logits, verify
from mlx_diffgemma.models.model import expected_shapes
from mlx_diffgemma.models.recipes import RecipeError, check_quantization_record, make_recipe, module_quantization
from mlx_diffgemma.models.sizes import estimate

REPO = Path(__file__).resolve().parents[1]

# kind -> (bits, group, mode) each new recipe must give it
AFF8, AFF6 = (8, 64, "affine"), (6, 64, "affine")
NEW = {
    "mxfp4-mixed": dict(embedding=AFF8, attention=AFF8, dense_mlp=AFF8, router=AFF8,
                        experts=(4, 32, "mxfp4"), self_conditioning=(4, 32, "mxfp4")),
    "3bit-mixed": dict(embedding=AFF8, attention=AFF6, dense_mlp=AFF6, router=AFF8,
                       experts=(3, 64, "affine"), self_conditioning=(3, 64, "affine")),
    "2bit-mixed": dict(embedding=AFF6, attention=AFF6, dense_mlp=AFF6, router=AFF8,
                       experts=(2, 64, "affine"), self_conditioning=(2, 64, "affine")),
}


@pytest.fixture(scope="module")
def hf(ckpt_factory):
    return ckpt_factory("q64")


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    return {r: (root / r, convert(hf, root / r, recipe=r, progress=False, verbose=False)) for r in NEW}


@pytest.mark.parametrize("recipe", list(NEW))
def test_recipe_widths_modes_and_record(hf, converted, recipe):
    out, summary = converted[recipe]
    t = _tensors(out)
    cfg = json.loads((out / "config.json").read_text())
    record = cfg["quantization"]
    assert cfg["quantization_config"] == record
    check_quantization_record(record)
    want = NEW[recipe]
    assert (record["bits"], record["group_size"], record["mode"]) == want["experts"]
    seen = set()
    for name, shape in expected_shapes(_args(out)).items():
        kind, base = _kind(name), name[: -len(".weight")]
        if kind not in want:
            assert f"{base}.scales" not in t and t[name].dtype == "F32", name
            continue
        bits, group, mode = want[kind]
        w, sc = t[f"{base}.weight"], t[f"{base}.scales"]
        # read back from the files alone
        assert w.dtype == "U32" and w.shape[-1] * 32 // shape[-1] == bits, name
        assert shape[-1] // sc.shape[-1] == group, name
        if mode == "affine":
            assert sc.dtype == "F32" and t[f"{base}.biases"].shape == sc.shape, name
        else:
            assert sc.dtype == "U8" and f"{base}.biases" not in t, name
        # the record says the same, as the loaders read it (an entry without a mode is affine)
        assert module_quantization(record, base) == (bits, group, mode), name
        entry = record.get(base)
        if entry is not None and any(v[2] != "affine" for v in want.values()):
            assert entry["mode"] == mode
        seen.add(kind)
    assert seen == set(want)
    verify(out)
    e = estimate(json.loads((hf / "config.json").read_text()), recipe)
    assert e["bytes"] == summary["bytes"]


@pytest.mark.parametrize("recipe", list(NEW))
def test_recipe_loads_in_ours_and_mlx_vlm(hf, converted, recipe):
    import mlx_vlm  # noqa: F401  (installed by the test command; never skipped)

    out, summary = converted[recipe]
    prompt, canvas = _inputs(256)
    ours = _our_logits(out, prompt, canvas)
    vlm = _vlm_logits(out, prompt, canvas)
    assert np.abs(ours - vlm).max() < 1e-3
    assert_argmax_where_certain(ours, vlm, f"{recipe}: ours vs mlx-vlm")
    rep = compare_logits(out, hf, canvases=16, prompt_length=12)
    print(f"\n{recipe}: argmax agreement with float {rep['argmax_agreement']:.3f}, logit "
          f"correlation {rep['logit_correlation']:.4f}, {summary['bits_per_weight']:.2f} bits/weight")
    # A tiny random model is chaotic (see test_convert); still far above chance (1/256).
    assert rep["argmax_agreement"] >= {"mxfp4-mixed": 0.3, "3bit-mixed": 0.2, "2bit-mixed": 0.05}[recipe]
    assert rep["logit_correlation"] >= {"mxfp4-mixed": 0.8, "3bit-mixed": 0.6, "2bit-mixed": 0.3}[recipe]


def test_quantize_round_trips(hf, converted, tmp_path):
    src, _ = converted["mxfp4-mixed"]
    # the same recipe again: every tensor copied as it is
    same = tmp_path / "same"
    quantize(src, same, recipe="mxfp4-mixed", progress=False, verbose=False)
    assert_same_tensors(src, same)
    # MXFP4 -> float32 computes what the MXFP4 model does
    deq = tmp_path / "deq"
    quantize(src, deq, recipe="fp32", progress=False, verbose=False)
    assert "quantization" not in json.loads((deq / "config.json").read_text())
    prompt, canvas = _inputs(256)
    x, y = _our_logits(deq, prompt, canvas), _our_logits(src, prompt, canvas)
    assert np.abs(x - y).max() < 1e-3
    # MXFP4 -> 2bit-mixed (dequantize, re-quantize) and 3-bit affine -> MXFP4 both verify
    for s, r in ((src, "2bit-mixed"), (converted["3bit-mixed"][0], "mxfp4-mixed")):
        out = tmp_path / f"{s.name}-to-{r}"
        quantize(s, out, recipe=r, progress=False, verbose=False)
        verify(out)
        rec = json.loads((out / "config.json").read_text())["quantization"]
        assert rec["mode"] == NEW[r]["experts"][2]


def test_records_checked_per_mode():
    check_quantization_record({"bits": 4, "group_size": 32, "mode": "mxfp4",
                               "x": {"bits": 8, "group_size": 64, "mode": "affine"},
                               "y": {"bits": 4, "group_size": 16, "mode": "nvfp4"}})
    for bad in ({"bits": 4, "group_size": 64, "mode": "mxfp4"},
                {"bits": 4, "group_size": 32, "mode": "fp3"},
                {"bits": 4, "group_size": 64, "x": {"bits": 3, "group_size": 32, "mode": "mxfp8"}}):
        with pytest.raises(RecipeError):
            check_quantization_record(bad)
    with pytest.raises(RecipeError, match="q-bits"):
        make_recipe("2bit-mixed", q_bits=3)


def test_verify_catches_biases_in_mxfp4(converted, tmp_path):
    import shutil

    from mlx_diffgemma.models.checkpoint import INDEX_FILE

    src, _ = converted["mxfp4-mixed"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    for key in ("quantization", "quantization_config"):  # say affine where the files are mxfp4
        cfg[key]["mode"] = "affine"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert (bad / INDEX_FILE).exists()
    with pytest.raises(VerifyError, match="mxfp4|U8|scales"):
        verify(bad)


# -- the real model's sizes -----------------------------------------------------------------------------


def test_real_sizes_and_the_16gb_budget():
    from estimate_sizes import REAL_CONFIG

    from mlx_diffgemma.models.loader import runtime_bytes

    extra = runtime_bytes(REAL_CONFIG, 4096)
    resident = {r: estimate(REAL_CONFIG, r)["text_bytes"] + extra for r in ("mixed-4", *NEW)}
    assert resident["mixed-4"] > 16e9
    assert resident["mxfp4-mixed"] < resident["mixed-4"]
    assert resident["2bit-mixed"] <= 10.5e9 < resident["3bit-mixed"]


# -- load-time honesty ----------------------------------------------------------------------------------


def test_check_fits_names_a_recipe_that_fits(converted, monkeypatch, capsys):
    from mlx_diffgemma.models import loader

    path, _ = converted["mxfp4-mixed"]
    rep = loader.check_fits(path, out=sys.stdout)
    assert rep["fits"] and capsys.readouterr().out == ""  # fits this machine: silent
    # a device with room for the 2bit-mixed conversion but not for this one
    cfg = json.loads((path / "config.json").read_text())
    small = estimate(cfg, "2bit-mixed")["text_bytes"] + rep["runtime"]
    assert small < rep["need"]
    monkeypatch.setattr(loader.mx, "device_info",
                        lambda: {"max_recommended_working_set_size": small + 1}, raising=False)
    loader.load(path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recommended working set" in err[0]
    assert "--recipe 2bit-mixed" in err[0], err[0]
    # and a device too small for any recipe says so
    monkeypatch.setattr(loader.mx, "device_info", lambda: {"max_recommended_working_set_size": 1000},
                        raising=False)
    rep = loader.check_fits(path, out=sys.stdout)
    assert rep["suggestion"] is None and "no recipe fits" in capsys.readouterr().out


def test_check_fits_without_metal_uses_the_machine(monkeypatch):
    from mlx_diffgemma.models import loader

    monkeypatch.setattr(loader.mx, "device_info", lambda: {"device_name": "cpu"}, raising=False)
    limit, what = loader.memory_limit()
    assert what == "this machine's memory" and limit > 2**28


def test_loading_holds_one_copy(converted):
    """MLX's peak allocation while loading equals the weights loaded, once (no float
    init, no re-quantized copy, no second buffer per tensor)."""
    import mlx.core as mx

    from mlx_diffgemma.models.loader import load_model
    from mlx_diffgemma.models.weights import hf_to_mlx_name

    for recipe in ("mxfp4-mixed", "2bit-mixed"):
        path, _ = converted[recipe]
        size = sum(r.nbytes for k, r in _tensors(path).items() if hf_to_mlx_name(k) is not None)
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        model, _ = load_model(path)
        peak = mx.get_peak_memory() - before
        print(f"\n{recipe}: peak while loading {peak} B for {size} B of weights")
        assert size <= peak <= 1.1 * size + 4096, (peak, size)
        del model

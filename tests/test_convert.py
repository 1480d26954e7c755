"""Converter, recipes, verify, and compatibility with mlx-vlm 0.7.10's diffusion_gemma.

All on tiny float32 checkpoints made by transformers (tests/tiny_checkpoints.py), no
network. The `q64` shape added here has every quantized matrix's input dimension a
multiple of 64, so the recipes run at the real group size (64) as on the real model.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from teacher_forcing import assert_argmax_where_certain

from mlx_diffgemma.convert.commands import ConversionInterrupted, convert
from mlx_diffgemma.convert.quantize import quantize
from mlx_diffgemma.convert.verify import VerifyError, compare_logits, verify
from mlx_diffgemma.models.checkpoint import INDEX_FILE, ConversionError, header_bytes, read_header
from mlx_diffgemma.models.model import expected_shapes
from mlx_diffgemma.models.sizes import estimate

REPO = Path(__file__).resolve().parents[1]

# What each recipe must give each kind of matrix (None: unquantized).
KINDS = {
    "embed_tokens": "embedding",
    "self_attn": "attention",
    "mlp": "dense_mlp",
    "router.proj": "router",
    "experts": "experts",
    "self_conditioning": "self_conditioning",
}
RECIPE_BITS = {
    "mixed-4": dict(embedding=8, attention=8, dense_mlp=8, router=8, experts=4, self_conditioning=4),
    "4bit": dict.fromkeys(KINDS.values(), 4),
    "8bit": dict.fromkeys(KINDS.values(), 8),
    "bf16": {},
    "fp16": {},
    "fp32": {},
}
RECIPE_DTYPE = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
AGREEMENT = {}  # recipe -> (argmax agreement, correlation), printed at the end


def _kind(name: str):
    if not name.endswith(".weight") or not name.startswith("model.decoder."):
        return None
    for key, kind in KINDS.items():
        if key in name and not name.endswith("norm.weight"):
            return kind
    return None


@pytest.fixture(scope="module")
def hf(ckpt_factory):
    return ckpt_factory("q64")


def _tensors(path: Path):
    """name -> TensorRef over all shards of a directory (via its index)."""
    index = json.loads((path / INDEX_FILE).read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(read_header(path / f)[0])
    assert set(out) == set(index["weight_map"])
    return out


def _args(path):
    from mlx_diffgemma.models.config import ModelArgs

    return ModelArgs.from_dict(json.loads((Path(path) / "config.json").read_text()))


def _no_leftovers(parent: Path, name: str):
    left = [p.name for p in parent.iterdir() if p.name.startswith(name)]
    assert left == [], f"left behind: {left}"


def _same_bytes(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert (ta[k].dtype, ta[k].shape) == (tb[k].dtype, tb[k].shape), k
        with open(ta[k].file, "rb") as fa, open(tb[k].file, "rb") as fb:
            fa.seek(ta[k].begin)
            fb.seek(tb[k].begin)
            assert fa.read(ta[k].nbytes) == fb.read(tb[k].nbytes), k
    return ta


# -- round trip ------------------------------------------------------------------------------


def test_round_trip_unquantized(hf, tmp_path):
    out = tmp_path / "f32"
    s = convert(hf, out, progress=False, verbose=False, max_shard_size=200_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 1 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    t = _tensors(out)
    # layout: HF names, fused experts with .weight, no lm_head / tied copies, vision kept
    assert "lm_head.weight" not in t
    assert "model.decoder.layers.0.experts.gate_up_proj.weight" in t
    assert "model.decoder.layers.0.experts.gate_up_proj" not in t
    assert "model.encoder.language_model.layers.0.layer_scalar" in t
    assert not any(k.startswith("model.encoder.language_model.") and not k.endswith("layer_scalar") for k in t)
    vision = [k for k in t if k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))]
    assert vision and all(t[k].dtype == "F32" for k in vision)
    assert set(expected_shapes(_args(out))) <= set(t)
    # vision tower passed through byte for byte
    src = read_header(hf / "model.safetensors")[0]
    for k in vision:
        with open(src[k].file, "rb") as a, open(t[k].file, "rb") as b:
            a.seek(src[k].begin)
            b.seek(t[k].begin)
            assert a.read(src[k].nbytes) == b.read(t[k].nbytes)
    # side files and config
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / f).read_bytes() == (hf / f).read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg
    assert cfg["generation_config"]["max_denoising_steps"] == 48
    assert cfg["eos_token_id"] == [1, 106, 50]
    assert cfg["text_config"]["global_head_dim"] == 32
    assert cfg["text_config"]["num_global_key_value_heads"] == 1
    idx = json.loads((out / INDEX_FILE).read_text())
    assert idx["metadata"]["total_size"] == sum(r.nbytes for r in t.values()) == s["bytes"]
    # logits: the MLX dir against the HF dir, both loaded by the runtime
    rep = verify(out, against=hf, canvases=4, prompt_length=12)
    print(f"\nround trip: max |diff| {rep['max_abs_diff']:.3g}")
    assert rep["max_abs_diff"] <= 1e-5 and rep["argmax_agreement"] == 1.0


# -- recipes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(RECIPE_BITS))
def test_recipe_bits_and_logits(hf, tmp_path, recipe):
    out = tmp_path / recipe
    s = convert(hf, out, recipe=recipe, progress=False, verbose=False)
    t = _tensors(out)
    cfg = json.loads((out / "config.json").read_text())
    record = cfg.get("quantization")
    want_bits = RECIPE_BITS[recipe]
    assert (record is None) == (not want_bits)
    if record:
        assert cfg["quantization_config"] == record
        assert record["mode"] == "affine" and record["group_size"] == 64
    seen = set()
    for name, shape in expected_shapes(_args(out)).items():
        kind = _kind(name)
        base = name[: -len(".weight")]
        if kind in want_bits:
            w, sc, bi = t[f"{base}.weight"], t[f"{base}.scales"], t[f"{base}.biases"]
            # bits and group size read back from the files alone
            bits = w.shape[-1] * 32 // shape[-1]
            group = shape[-1] // sc.shape[-1]
            assert w.dtype == "U32" and (bits, group) == (want_bits[kind], 64), name
            assert sc.shape == bi.shape == tuple(shape[:-1]) + (shape[-1] // 64,)
            # ... and the record says the same (per-module entry, else the default)
            entry = record.get(base) or {"bits": record["bits"], "group_size": record["group_size"]}
            assert (entry["bits"], entry["group_size"]) == (bits, group), name
            seen.add(kind)
        else:
            assert name in t and f"{base}.scales" not in t, name
            assert t[name].dtype == RECIPE_DTYPE.get(recipe, "F32"), name
            assert t[name].shape == tuple(shape)
    assert seen == set(want_bits)
    vision = [r for k, r in t.items() if "vision" in k]
    assert vision and all(r.dtype == RECIPE_DTYPE.get(recipe, "F32") for r in vision)
    verify(out)
    if recipe in ("bf16", "fp16"):
        return  # MLX's CPU gather_mm is float32-only on Linux: no logits for these here
    rep = compare_logits(out, hf, canvases=16, prompt_length=12)
    AGREEMENT[recipe] = (rep["argmax_agreement"], rep["logit_correlation"], s["bits_per_weight"])
    print(f"\n{recipe}: argmax agreement {rep['argmax_agreement']:.3f} over {rep['positions']} "
          f"positions, logit correlation {rep['logit_correlation']:.4f}, max |diff| "
          f"{rep['max_abs_diff']:.3g}, {s['bits_per_weight']:.2f} bits/weight")
    if recipe == "fp32":
        assert rep["max_abs_diff"] <= 1e-5
    else:
        # Tiny random models are chaotic (attention scale 1.0, busy routing): small weight
        # errors flip routes and attention peaks, so agreement is far below what a trained
        # 26B model shows. Still far above chance (1/256) and strongly correlated.
        floor = {"8bit": 0.6, "mixed-4": 0.4, "4bit": 0.1}[recipe]
        assert rep["argmax_agreement"] >= floor
        assert rep["logit_correlation"] >= {"8bit": 0.95, "mixed-4": 0.9, "4bit": 0.6}[recipe]


def test_estimate_matches_the_bytes_written(hf, tmp_path):
    """estimate() (used for the real model's table) is exact on what convert writes."""
    cfg = json.loads((hf / "config.json").read_text())
    for recipe in ("mixed-4", "4bit", "bf16"):
        s = convert(hf, tmp_path / recipe, recipe=recipe, progress=False, verbose=False)
        e = estimate(cfg, recipe)
        assert e["bytes"] == s["bytes"], recipe
        assert e["params"] == s["params"]
        assert math.isclose(e["bits_per_weight"], s["bits_per_weight"])


def test_real_model_estimate():
    from estimate_sizes import REAL_CONFIG

    e = estimate(REAL_CONFIG, "mixed-4")
    kinds = e["by_kind"]
    assert abs(kinds["experts"]["params"] / 1e9 - 22.8) < 0.1  # real-config.md: ~22.8B
    assert abs(kinds["attention"]["params"] / 1e9 - 1.1) < 0.05
    assert abs(kinds["embedding"]["params"] / 1e9 - 0.74) < 0.01
    assert 15 < e["gb"] < 17.5  # mlx-community 4-bit: about 15-16 GB
    assert abs(estimate(REAL_CONFIG, "bf16")["gib"] - 48) < 1  # the ~48 GB bf16 release


# -- re-quantizing an MLX directory ----------------------------------------------------------------


def assert_same_tensors(x: Path, y: Path) -> None:
    """Both directories hold the same tensor names with byte-identical data."""
    a, b = _tensors(x), _tensors(y)
    assert set(a) == set(b)
    for k in a:
        with open(a[k].file, "rb") as fa, open(b[k].file, "rb") as fb:
            fa.seek(a[k].begin)
            fb.seek(b[k].begin)
            assert fa.read(a[k].nbytes) == fb.read(b[k].nbytes), k


def test_requantize(hf, tmp_path):
    mixed = tmp_path / "mixed"
    convert(hf, mixed, quantize=True, progress=False, verbose=False)
    # same recipe again: the packed tensors are copied as they are
    same = tmp_path / "same"
    quantize(mixed, same, recipe="mixed-4", progress=False, verbose=False)
    assert_same_tensors(mixed, same)
    # to 8 bit, and back to float32: the dequantized model computes what the 4-bit one does
    q8 = tmp_path / "q8"
    quantize(mixed, q8, recipe="8bit", progress=False, verbose=False)
    verify(q8)
    assert json.loads((q8 / "config.json").read_text())["quantization"]["bits"] == 8
    deq = tmp_path / "deq"
    quantize(mixed, deq, recipe="fp32", progress=False, verbose=False)
    assert "quantization" not in json.loads((deq / "config.json").read_text())
    # dequantized float matmuls vs quantized kernels: the same function to rounding
    prompt, canvas = _inputs(256)
    a, b = _our_logits(deq, prompt, canvas), _our_logits(mixed, prompt, canvas)
    assert np.abs(a - b).max() < 1e-3
    assert_argmax_where_certain(a, b, "dequantized vs 4-bit")


# -- compatibility with mlx-vlm 0.7.10 -----------------------------------------------------------------


def _vlm_logits(path, prompt, canvas):
    import mlx.core as mx
    from mlx_vlm.utils import load_model

    m = load_model(Path(path))
    cache = m.make_cache()
    m.diffusion_prefill_cache(
        mx.array(prompt), attention_mask=None, cache=cache, pixel_values=None,
        mm_token_type_ids=None, prefill_step_size=None, chunk_prefill=False,
    )
    return np.array(m.diffusion_decoder_logits(mx.array(canvas), cache).astype(mx.float32))


def _our_logits(path, prompt, canvas):
    from mlx_diffgemma import load
    from mlx_diffgemma.convert.verify import model_logits

    model, _ = load(path)
    return model_logits(model, prompt, canvas)


def _inputs(vocab, canvas_len=16):
    rng = np.random.default_rng(3)
    return rng.integers(0, vocab, size=(2, 12)), rng.integers(0, vocab, size=(2, canvas_len))


@pytest.mark.parametrize("recipe", ["mixed-4", None])
def test_our_directory_loads_in_mlx_vlm(hf, tmp_path, recipe):
    import mlx_vlm  # noqa: F401  (installed by the test command; never skipped)
    out = tmp_path / "ours"
    convert(hf, out, recipe=recipe, progress=False, verbose=False)
    prompt, canvas = _inputs(256)
    a, b = _vlm_logits(out, prompt, canvas), _our_logits(out, prompt, canvas)
    assert np.abs(a - b).max() < 1e-3
    assert_argmax_where_certain(b, a, "ours vs mlx-vlm")


def test_mlx_vlm_directory_loads_in_ours(hf, tmp_path, capsys):
    import mlx_vlm  # noqa: F401  (installed by the test command; never skipped)
    from mlx_vlm.convert import convert as vlm_convert

    # The released config.json spells out global_head_dim / num_global_key_value_heads,
    # which mlx-vlm reads (transformers' save_pretrained writes per_layer_config instead).
    src = tmp_path / "hf"
    shutil.copytree(hf, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(global_head_dim=32, num_global_key_value_heads=1)
    (src / "config.json").write_text(json.dumps(cfg))
    theirs = tmp_path / "vlm"
    vlm_convert(str(src), str(theirs), quantize=True)
    ours = tmp_path / "ours"
    convert(hf, ours, quantize=True, progress=False, verbose=False)

    # the same recipe gives the same bytes and the same record
    _same_bytes(theirs, ours)
    qa = json.loads((theirs / "config.json").read_text())["quantization"]
    qb = json.loads((ours / "config.json").read_text())["quantization"]
    assert qa == qb

    verify(theirs)
    prompt, canvas = _inputs(256)
    a, b = _vlm_logits(theirs, prompt, canvas), _our_logits(theirs, prompt, canvas)
    assert np.abs(a - b).max() < 1e-3
    # and ours re-converts theirs
    re = tmp_path / "re"
    quantize(theirs, re, recipe="8bit", progress=False, verbose=False)
    verify(re)


def test_bfloat16_source_like_the_release(ckpt_factory, tmp_path):
    """The release is bf16: unquantized output keeps the bits, mixed-4 gives bf16 scales
    and the same bytes as mlx-vlm's converter."""
    import mlx_vlm  # noqa: F401  (installed by the test command; never skipped)
    import torch
    from mlx_vlm.convert import convert as vlm_convert

    hf16 = ckpt_factory("q64", dtype=torch.bfloat16)
    plain = tmp_path / "plain"
    convert(hf16, plain, progress=False, verbose=False)
    src = read_header(hf16 / "model.safetensors")[0]
    out = _tensors(plain)
    for k, ref in src.items():
        name = k + ".weight" if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else k
        assert out[name].dtype == ref.dtype == "BF16"
        with open(ref.file, "rb") as fa, open(out[name].file, "rb") as fb:
            fa.seek(ref.begin)
            fb.seek(out[name].begin)
            assert fa.read(ref.nbytes) == fb.read(ref.nbytes), k
    srcp = tmp_path / "hf"
    shutil.copytree(hf16, srcp)
    cfg = json.loads((srcp / "config.json").read_text())
    cfg["text_config"].update(global_head_dim=32, num_global_key_value_heads=1)
    (srcp / "config.json").write_text(json.dumps(cfg))
    theirs, ours = tmp_path / "vlm", tmp_path / "ours"
    vlm_convert(str(srcp), str(theirs), quantize=True)
    convert(hf16, ours, quantize=True, progress=False, verbose=False)
    t = _same_bytes(theirs, ours)
    assert t["model.decoder.layers.0.experts.gate_up_proj.scales"].dtype == "BF16"
    verify(ours)


# -- memory ----------------------------------------------------------------------------------------


def _maxrss_bytes(v: int) -> int:
    return v if sys.platform == "darwin" else v * 1024


def test_peak_memory_bounded_by_largest_tensor(hf, tmp_path):
    """A checkpoint whose embedding is ~400 MB converts (quantized) in a subprocess whose
    peak RSS stays under 2x that tensor plus a fixed overhead."""
    big = tmp_path / "big"
    big.mkdir()
    for f in hf.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, big / f.name)
    vocab = 1_572_864  # x 64 x 4 bytes = 402.7 MB
    cfg = json.loads((big / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = vocab
    (big / "config.json").write_text(json.dumps(cfg))
    src = read_header(hf / "model.safetensors")[0]
    entries = [(k, r.dtype, r.shape) for k, r in sorted(src.items())]
    entries = [(k, d, (vocab, 64) if k == "model.decoder.embed_tokens.weight" else s) for k, d, s in entries]
    head, offsets, _ = header_bytes(entries)
    rng = np.random.default_rng(0)
    with open(big / "model.safetensors", "wb") as out, open(hf / "model.safetensors", "rb") as inp:
        out.write(head)
        for k, _, shape in entries:
            if k == "model.decoder.embed_tokens.weight":
                for r0 in range(0, vocab, 1 << 18):
                    n = min(1 << 18, vocab - r0)
                    out.write((rng.random((n, 64), dtype=np.float32) - 0.5).tobytes())
            else:
                inp.seek(src[k].begin)
                out.write(inp.read(src[k].nbytes))
    largest = vocab * 64 * 4

    # The conversion runs in a grandchild started by a small launcher: on Linux a child's
    # ru_maxrss includes the RSS of whatever process it was spawned from (the high-water
    # mark survives exec), and this pytest process is large. The launcher is small when
    # it spawns, so its RUSAGE_CHILDREN is the conversion's own peak.
    work = textwrap.dedent(
        f"""
        import json, resource
        from mlx_diffgemma.convert.commands import convert
        # A small conversion first: the libraries it imports (MLX, the tokenizer check's
        # transformers) are in the base, so the difference is the streaming alone.
        convert({str(hf)!r}, {str(tmp_path / 'warm')!r}, quantize=True, progress=False, verbose=False)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        convert({str(big)!r}, {str(tmp_path / 'big-q')!r}, quantize=True, progress=False, verbose=False)
        print(json.dumps({{"base": base}}))
        """
    )
    launcher = textwrap.dedent(
        f"""
        import json, resource, subprocess, sys
        r = subprocess.run([sys.executable, "-c", {work!r}], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["peak"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    peak, base = _maxrss_bytes(r["peak"]), _maxrss_bytes(r["base"])
    overhead = 300 << 20
    print(f"\npeak RSS of the conversion: {peak / 2**20:.0f} MiB (after a small one {base / 2**20:.0f} MiB); "
          f"largest tensor {largest / 2**20:.0f} MiB; bound {(2 * largest + overhead) / 2**20:.0f} MiB")
    assert peak < 2 * largest + overhead
    # streaming: what the conversion adds over the imports is less than one copy of the
    # largest tensor (blocks of rows, never a whole tensor)
    assert peak - base < largest
    verify(tmp_path / "big-q")


# -- bad input ---------------------------------------------------------------------------------------


def _copy(hf, tmp_path, name="src"):
    dst = tmp_path / name
    shutil.copytree(hf, dst)
    return dst


def _reshard(path: Path, n: int = 2):
    """Splits path/model.safetensors into n shards with an index, as the release is."""
    refs = read_header(path / "model.safetensors")[0]
    keys = sorted(refs)
    weight_map = {}
    with open(path / "model.safetensors", "rb") as f:
        for i in range(n):
            part = keys[i::n]
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            head, _, _ = header_bytes([(k, refs[k].dtype, refs[k].shape) for k in part], {"format": "pt"})
            with open(path / name, "wb") as out:
                out.write(head)
                for k in part:
                    f.seek(refs[k].begin)
                    out.write(f.read(refs[k].nbytes))
            weight_map.update({k: name for k in part})
    (path / "model.safetensors").unlink()
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _expect_error(src, out, match, **kw):
    with pytest.raises(ConversionError, match=match):
        convert(src, out, progress=False, verbose=False, **kw)
    assert not out.exists()
    _no_leftovers(out.parent, out.name)


def test_sharded_source_converts(hf, tmp_path):
    src = _copy(hf, tmp_path)
    _reshard(src, 3)
    out = tmp_path / "out"
    convert(src, out, quantize=True, progress=False, verbose=False)
    verify(out)


def test_missing_shard(hf, tmp_path):
    src = _copy(hf, tmp_path)
    _reshard(src, 2)
    (src / "model-00002-of-00002.safetensors").unlink()
    _expect_error(src, tmp_path / "out", r"missing shard model-00002-of-00002\.safetensors")


def test_truncated_safetensors(hf, tmp_path):
    src = _copy(hf, tmp_path)
    f = src / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    _expect_error(src, tmp_path / "out", r"model\.safetensors is truncated")
    os.truncate(f, 5)
    _expect_error(src, tmp_path / "out", r"truncated")


def test_wrong_model_type(hf, tmp_path):
    src = _copy(hf, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gemma4"
    (src / "config.json").write_text(json.dumps(cfg))
    _expect_error(src, tmp_path / "out", r"model_type is 'gemma4', expected 'diffusion_gemma'")


def test_missing_config(hf, tmp_path):
    src = _copy(hf, tmp_path)
    (src / "config.json").unlink()
    _expect_error(src, tmp_path / "out", r"config\.json not found")


def test_config_that_does_not_match_the_weights(hf, tmp_path):
    src = _copy(hf, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    _expect_error(src, tmp_path / "out", r"do not have the shape config\.json implies")


def test_existing_output_dir(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match=r"already exists; pass --force"):
        convert(hf, out, progress=False, verbose=False)
    assert (out / "keep.txt").read_text() == "mine"
    _no_leftovers(tmp_path, "out.")
    convert(hf, out, force=True, progress=False, verbose=False)
    assert not (out / "keep.txt").exists()
    verify(out)
    _no_leftovers(tmp_path, "out.")


def test_interrupt_and_disk_full_leave_nothing(hf, tmp_path, monkeypatch):
    import mlx_diffgemma.convert.write as conv

    real = conv._stream_job
    calls = {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "_stream_job", interrupt)
    out = tmp_path / "out"
    with pytest.raises(ConversionInterrupted, match="interrupted; removed the partial output"):
        convert(hf, out, progress=False, verbose=False)
    assert not out.exists()
    _no_leftovers(tmp_path, "out")

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(conv, "_stream_job", real)
    monkeypatch.setattr(conv, "_pwrite_all", full)
    _expect_error(hf, out, r"disk full while writing")


def test_verify_catches_damage(hf, tmp_path):
    out = tmp_path / "out"
    convert(hf, out, quantize=True, progress=False, verbose=False)
    shard = next(out.glob("*.safetensors"))
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(VerifyError, match="truncated"):
        verify(out)
    shard.unlink()
    with pytest.raises(VerifyError, match="missing shard"):
        verify(out)


# -- hub ids and the command line ------------------------------------------------------------------------


def test_hub_id_from_the_offline_cache(hf, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE and no network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = cache / "models--google--diffusiongemma-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(hf, snap)
    (cache / "models--google--diffusiongemma-tiny" / "refs").mkdir()
    (cache / "models--google--diffusiongemma-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    convert("google/diffusiongemma-tiny", out, progress=False, verbose=False)
    verify(out)
    _expect_error("google/not-in-the-cache", tmp_path / "out2", r"cannot fetch 'google/not-in-the-cache'")


def test_cli(hf, tmp_path, capsys):
    from mlx_diffgemma.cli import main as cli

    out = tmp_path / "out"
    assert cli(["convert", "--hf-path", str(hf), "--mlx-path", str(out), "-q", "--no-progress"]) == 0
    assert "bits per weight" in capsys.readouterr().err
    assert cli(["convert", "--hf-path", str(hf), "--mlx-path", str(out), "-q", "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["quantize", "--mlx-path", str(out), "--out", str(tmp_path / "q8"),
                "--recipe", "8bit", "--no-progress"]) == 0
    assert cli(["verify", str(tmp_path / "q8")]) == 0
    assert "ok" in capsys.readouterr().out
    # the thin scripts
    res = subprocess.run([sys.executable, str(REPO / "convert" / "convert.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--hf-path" in res.stdout

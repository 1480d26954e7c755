"""Images in: the vision tower and the encoder's image blocks held to transformers.

A tiny DiffusionGemma with a small vision tower in use (tiny_checkpoints' "vision"
shape: 3 tower layers with GQA, 2-D RoPE, 3x3 pooling, standardised output and clamped
linears; the 4-layer "wide" text model, sliding window 12, bidirectional image blocks) is
built by transformers, converted by our converter and loaded. Its inputs are the
reference's own: pixel_values / image_position_ids from transformers' Gemma-4 image
processor on synthetic images of three aspect ratios, prompts expanded to <|image>, one
image token per soft token, <image|>.
"""

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import hooked_generate, image_kwargs, reference_decoder_logits, reference_encoder_cache
from teacher_forcing import assert_argmax_where_certain, from_reference, replay
from tiny_checkpoints import VISION_TOKENS, load_reference

import mlx_diffgemma as md
from mlx_diffgemma.generation.denoiser import MLXDenoiser
from mlx_diffgemma.generation.events import Summary
from mlx_diffgemma.generation.loop import draft
from mlx_diffgemma.images.processor import ImageInputs
from mlx_diffgemma.models.config import GenerationConfig, ModelArgs
from mlx_diffgemma.models.model import Model
from mlx_diffgemma.models.tokenizer import image_blocks
from mlx_diffgemma.models.vision import chunk_bounds, soft_token_counts

ATOL = 1e-3  # raw logits (~20)
BOI, IMG, EOI = (VISION_TOKENS[t] for t in ("<|image>", "<|image|>", "<image|>"))
SIZES = {"square": (96, 96), "wide": (60, 150), "tall": (130, 70)}  # (height, width)


def _image(size, seed):
    """A synthetic RGB image: smooth gradients plus noise (PIL, as a user would pass)."""
    from PIL import Image

    h, w = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _process(names):
    """transformers' Gemma-4 image processor on the named images (numpy arrays)."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    proc = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    out = proc([_image(SIZES[n], i) for i, n in enumerate(names)], return_tensors="np")
    return out["pixel_values"], out["image_position_ids"], [int(n) for n in out["num_soft_tokens_per_image"]]


def _prompt(counts, seed, text=6):
    """<bos>, then per image some text and the expanded image, then text: ids avoiding
    the image tokens."""
    rng = np.random.default_rng(seed)
    words = [i for i in range(3, 384) if i not in VISION_TOKENS.values()]
    ids = [2]
    for n in counts:
        ids += rng.choice(words, text).tolist() + [BOI] + [IMG] * n + [EOI]
    return ids + rng.choice(words, text).tolist()


@pytest.fixture(scope="module")
def vision(ckpt_factory, tmp_path_factory):
    """(converted path, our model, the transformers reference)."""
    from mlx_diffgemma.convert.commands import convert

    src = ckpt_factory("vision")
    out = tmp_path_factory.mktemp("vision-mlx") / "model"
    convert(src, out, progress=False, verbose=False)
    model, _ = md.load(out)
    return out, model, load_reference(src)


def _cache_with(model, ids, pv, pos, **kw):
    cache = model.make_cache()
    model.encode(mx.array([ids]), cache, pixel_values=pv, image_position_ids=pos, **kw)
    return cache


def test_soft_tokens_match_reference(vision):
    import torch

    _, model, ref = vision
    assert model.has_vision and model.image_token_id == IMG
    assert (model.boi_token_id, model.eoi_token_id) == (BOI, EOI)
    assert (model.vision_args.patch_size, model.vision_args.pooling_kernel_size) == (4, 3)
    pv, pos, counts = _process(["square", "wide", "tall"])
    assert soft_token_counts(pos, 3) == counts and len(set(counts)) == 3
    with torch.no_grad():
        r = ref.model.encoder.get_image_features(torch.tensor(pv), torch.tensor(pos), return_dict=True)
    tower = np.concatenate([np.array(s) for s in model.vision_soft_tokens(pv, pos)])
    expected = r.last_hidden_state.numpy()
    assert tower.shape == expected.shape == (sum(counts), 32)
    # values reach ~50 (scaled by sqrt(hidden), standardised): a relative tolerance
    np.testing.assert_allclose(tower, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    feats = np.array(model.image_features(mx.array(pv), mx.array(pos)))  # mx inputs too
    np.testing.assert_allclose(feats, r.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


def test_mlx_vlm_directory_with_a_tower_loads_in_ours(vision, ckpt_factory, tmp_path):
    """A directory mlx-vlm 0.7.10's converter writes (mlx-community's layout), tower
    included: our loader takes its tower and the soft tokens equal our own conversion's."""
    import json
    import shutil

    from mlx_vlm.convert import convert as vlm_convert

    src = tmp_path / "hf"
    shutil.copytree(ckpt_factory("vision"), src)
    cfg = json.loads((src / "config.json").read_text())
    # The released config.json spells these out; mlx-vlm reads them (save_pretrained
    # writes them per layer only).
    cfg["text_config"].update(global_head_dim=24, num_global_key_value_heads=2)
    (src / "config.json").write_text(json.dumps(cfg))
    theirs = tmp_path / "vlm"
    vlm_convert(str(src), str(theirs))
    model, _ = md.load(theirs)
    assert model.has_vision
    pv, pos, _ = _process(["square", "wide"])
    ours = vision[1]
    for a, b in zip(model.vision_soft_tokens(pv, pos), ours.vision_soft_tokens(pv, pos)):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_bfloat16_tower_matches_reference(ckpt_factory):
    """The checkpoint's own dtype: bfloat16 soft tokens against transformers' bfloat16
    run (a few bfloat16 roundings apart), in the model's dtype."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    path = ckpt_factory("vision", dtype=torch.bfloat16)
    model, _ = md.load(path)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16).eval()
    pv, pos, _ = _process(["tall"])
    with torch.no_grad():
        r = ref.model.encoder.get_image_features(torch.tensor(pv), torch.tensor(pos), return_dict=True)
    feats = model.image_features(pv, pos)
    assert feats.dtype == mx.bfloat16
    expected = r.pooler_output.float().numpy()
    err = np.abs(np.array(feats.astype(mx.float32)) - expected)
    assert err.max() <= 0.02 * np.abs(expected).max(), err.max()
    assert err.mean() <= 0.01 * np.abs(expected).mean(), err.mean()


def test_tower_attention_in_query_blocks(vision, monkeypatch):
    """Long images attend in blocks of query rows (bounded score memory): same result."""
    import mlx_diffgemma.models.vision as vision_mod

    _, model, _ = vision
    pv, pos, _ = _process(["square"])
    whole = np.array(model.vision_soft_tokens(pv, pos)[0])
    monkeypatch.setattr(vision_mod, "QUERY_BLOCK", 100)  # 576 patches: 6 blocks
    blocked = np.array(model.vision_soft_tokens(pv, pos)[0])
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


@pytest.mark.parametrize("names", [["wide"], ["square", "tall"]])
def test_encoder_cache_matches_reference(names, vision):
    _, model, ref = vision
    pv, pos, counts = _process(names)
    ids = _prompt(counts, seed=len(names))
    cache = _cache_with(model, ids, pv, pos)
    expected = reference_encoder_cache(ref, [ids], images=image_kwargs(ref, [ids], pv, pos))
    worst = 0.0
    for layer, (k_ref, v_ref) in zip(cache.layers, expected):
        k, v = (np.array(a) for a in layer.view())
        assert k.shape == k_ref.shape
        worst = max(worst, float(np.abs(k - k_ref).max()), float(np.abs(v - v_ref).max()))
    # Keys reach ~7; the soft tokens enter within ~2e-6 of the reference's and the
    # float32 difference grows through the layers over 80-150 tokens (the last layer
    # lands near 1e-4; the text-only cache test holds 1e-4 over a third as many tokens).
    assert worst < 3e-4, worst

    # The image blocks do attend both ways: encoded causally, the full layers' keys of
    # the image tokens move far beyond that tolerance.
    causal_model = Model(ModelArgs(**{**model.args.__dict__, "use_bidirectional_attention": None}))
    causal_model.update(model.parameters())
    causal = _cache_with(causal_model, ids, pv, pos)
    k_causal = np.array(causal.layers[3].view()[0])
    assert np.abs(k_causal - expected[3][0]).max() > 1e-2


@pytest.mark.parametrize("names, prefix", [(["wide"], False), (["square", "tall"], True)])
def test_decoder_logits_after_images(names, prefix, vision):
    _, model, ref = vision
    pv, pos, counts = _process(names)
    ids = _prompt(counts, seed=7)
    rng = np.random.default_rng(3)
    C = model.canvas_length
    canvas = rng.integers(0, 512, (1, C))
    prefixes = [rng.integers(3, 200, (1, C))] if prefix else []
    cache = _cache_with(model, ids, pv, pos)
    for p in prefixes:
        model.encode(mx.array(p), cache)
    ours = np.array(model.decode(mx.array(canvas), cache))
    expected = reference_decoder_logits(ref, [ids], canvas, prefix_canvases=prefixes,
                                        images=image_kwargs(ref, [ids], pv, pos))
    assert np.abs(ours - expected).max() <= ATOL
    assert_argmax_where_certain(ours, expected, f"{names}")


def test_chunk_bounds_never_cut_an_image():
    blocks = [(5, 15), (20, 60)]
    assert chunk_bounds(70, 8, blocks) == [(0, 5), (5, 15), (15, 20), (20, 60), (60, 68), (68, 70)]
    assert chunk_bounds(70, 30, blocks) == [(0, 20), (20, 60), (60, 70)]
    assert image_blocks(np.array([0, 1, 1, 0, 1], bool)) == [(1, 3), (4, 5)]


@pytest.mark.parametrize("chunk", [12, 40])
def test_chunked_prefill_with_images_matches_whole(chunk, vision):
    """Chunk boundaries fall inside both images (12: the images are longer than a chunk;
    40: a boundary moves back to an image's start); the cache and the logits after it
    equal a whole prefill's within float tolerance."""
    _, model, _ = vision
    pv, pos, counts = _process(["square", "wide"])
    ids = _prompt(counts, seed=11, text=9)
    blocks = image_blocks(np.array(ids) == IMG)
    assert any(a < e < b for s, e in zip(range(0, len(ids), chunk), range(chunk, len(ids), chunk))
               for a, b in blocks)
    whole = _cache_with(model, ids, pv, pos, chunk_size=None)
    chunked = _cache_with(model, ids, pv, pos, chunk_size=chunk)
    assert chunked.offset == whole.offset == len(ids)
    for a, b in zip(chunked.layers, whole.layers):
        for x, y in zip(a.view(), b.view()):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=2e-5, rtol=1e-5)
    canvas = mx.array(np.random.default_rng(5).integers(0, 512, (1, model.canvas_length)))
    ours, expected = np.array(model.decode(canvas, chunked)), np.array(model.decode(canvas, whole))
    assert np.abs(ours - expected).max() <= ATOL
    assert_argmax_where_certain(ours, expected, f"chunk {chunk}")


def test_image_input_errors(vision, ckpt_factory, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    _, model, _ = vision
    pv, pos, counts = _process(["wide"])
    ids = mx.array([_prompt(counts, seed=1)])
    n = counts[0]
    with pytest.raises(ValueError, match=rf"hold {n + 1} image tokens .* give {n} soft tokens"):
        model.encode(mx.array([_prompt([n + 1], 1)]), model.make_cache(),
                     pixel_values=pv, image_position_ids=pos)
    with pytest.raises(ValueError, match=r"pixel_values have shape \(1, 630, 47\), expected \[images, patches, 48\]"):
        model.encode(ids, model.make_cache(), pixel_values=pv[..., :47], image_position_ids=pos)
    with pytest.raises(ValueError, match="need their image_position_ids"):
        model.encode(ids, model.make_cache(), pixel_values=pv)
    with pytest.raises(ValueError, match="one prompt at a time"):
        model.encode(mx.concatenate([ids, ids]), model.make_cache(), pixel_values=pv, image_position_ids=pos)

    # A directory whose weights leave the tower out loads text-only and says so.
    src = ckpt_factory("vision")
    text_only = tmp_path / "text-only"
    shutil.copytree(src, text_only)
    tensors = load_file(str(text_only / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".vision_tower." not in k and ".embed_vision." not in k},
              str(text_only / "model.safetensors"), metadata={"format": "pt"})
    bare, _ = md.load(text_only)
    assert not bare.has_vision
    no_tower = "has no vision tower .* use a DiffusionGemma directory that includes the tower"
    with pytest.raises(ValueError, match=no_tower):
        bare.encode(ids, bare.make_cache(), pixel_values=pv, image_position_ids=pos)


def _image_denoiser(model, gen, noise, pv, pos, counts) -> MLXDenoiser:
    """The MLX denoiser whose first encode (the prompt) carries the images."""
    den = MLXDenoiser(model, gen, noise=noise)
    den.images = ImageInputs(pv, pos, list(counts))
    return den


def test_generation_with_images_matches_reference(ckpt_factory):
    """A whole generation after a prompt holding two images, on a checkpoint whose
    self-conditioning is damped: the reference's trajectory replayed on ours (logits
    within 1e-3, every decision the measured difference cannot flip identical), and our
    own free run under the same noise token for token the reference's."""
    path = ckpt_factory("vision", sc_down_scale=0.02)
    ref = load_reference(path)
    model, _ = md.load(path)
    pv, pos, counts = _process(["tall", "wide"])
    prompt = _prompt(counts, seed=21)
    C = model.canvas_length
    kw = dict(max_new_tokens=2 * C, max_denoising_steps=10, eos_token_id=None,
              stability_threshold=1, confidence_threshold=0.9)
    noise = md.SeededNoise(3)
    result = hooked_generate(ref, np.array([prompt]), noise, record=True,
                             **kw, **image_kwargs(ref, [prompt], pv, pos))
    gen = GenerationConfig.from_model_dir(path, **kw)

    record = from_reference(result, prompt, C, gen.stability_threshold)
    report = replay(_image_denoiser(model, gen, noise, pv, pos, counts), record, noise,
                    from_numpy=mx.array)
    report.check(ATOL)

    events = list(draft(_image_denoiser(model, gen, noise, pv, pos, counts), prompt, gen))
    summary = events[-1]
    assert isinstance(summary, Summary)
    # MLX and torch round apart: the free run is held to the reference's tokens when no
    # decision on the reference's trajectory was too close to call under the measured
    # difference (on another CPU one may be; then the replay above is the check).
    if report.uncertain == 0:
        assert summary.tokens == result.tokens[0].tolist()
        assert summary.steps_per_canvas == result.steps_per_canvas


def test_released_tower_shapes_and_config_errors():
    """The released vision_config builds the tower whose tensors the size estimates
    count (sizes.vision_shapes), under the checkpoint's names; bad fields are one line."""
    from mlx.utils import tree_flatten

    from mlx_diffgemma.models.config import ConfigError
    from mlx_diffgemma.models.sizes import vision_shapes
    from mlx_diffgemma.models.weights import is_vision_tensor

    text = dict(hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704,
                num_experts=128, top_k_experts=8, num_hidden_layers=30,
                num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                vocab_size=262144, use_bidirectional_attention="vision")
    vision = dict(model_type="gemma4_vision", hidden_size=1152, num_hidden_layers=27,
                  intermediate_size=4304, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=72, patch_size=16, position_embedding_size=10240,
                  rope_parameters={"rope_theta": 100.0, "rope_type": "default"})
    config = dict(model_type="diffusion_gemma", text_config=text, vision_config=vision,
                  image_token_id=258880, boi_token_id=255999, eoi_token_id=258882,
                  vision_soft_tokens_per_image=280)
    model = Model(ModelArgs.from_dict(config))  # lazy: nothing is allocated
    assert (model.image_token_id, model.boi_token_id, model.eoi_token_id) == (258880, 255999, 258882)
    assert model.soft_tokens_per_image == 280 and model.vision_args.pooling_kernel_size == 3
    tower = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters()) if is_vision_tensor(k)}
    assert tower == vision_shapes(config)
    assert sum(np.prod(s) for s in tower.values()) == pytest.approx(0.57e9, rel=0.01)

    bad = dict(config, vision_config=dict(vision, head_dim=70))
    with pytest.raises(ConfigError, match=r"vision_config.head_dim must be a multiple of 4 \(got 70\)"):
        ModelArgs.from_dict(bad)
    bad = dict(config, vision_config=dict(vision, patch_size="16"))
    with pytest.raises(ConfigError, match=r"vision_config.patch_size must be a positive integer"):
        ModelArgs.from_dict(bad)


@pytest.mark.slow
def test_tower_read_on_first_image(tmp_path):
    """`load` leaves the tower's weights on disk (text-only use never holds them); the
    first image reads them."""
    import json

    from mlx.utils import tree_flatten

    text = dict(model_type="diffusion_gemma_text", hidden_size=64, intermediate_size=64,
                moe_intermediate_size=32, num_experts=4, top_k_experts=2, num_hidden_layers=2,
                layer_types=["sliding_attention", "full_attention"], num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, global_head_dim=64,
                num_global_key_value_heads=1, sliding_window=32, vocab_size=512,
                use_bidirectional_attention="vision")
    vision = dict(model_type="gemma4_vision", hidden_size=256, intermediate_size=1024,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  head_dim=64, patch_size=4, position_embedding_size=10240)
    config = dict(model_type="diffusion_gemma", text_config=text, vision_config=vision,
                  canvas_length=16, **{f"{k}_token_id": v for k, v in
                                       (("boi", BOI), ("image", IMG), ("eoi", EOI))})
    (tmp_path / "config.json").write_text(json.dumps(config))
    params = dict(tree_flatten(Model(ModelArgs.from_dict(config)).parameters()))
    mx.eval(params)
    tower_bytes = sum(v.nbytes for k, v in params.items() if ".vision_tower." in k)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), params)
    del params

    mx.synchronize()
    before = mx.get_active_memory()
    model, _ = md.load(tmp_path, check_memory=False)
    loaded = mx.get_active_memory() - before
    assert tower_bytes > 30e6 and loaded < tower_bytes / 4, (loaded, tower_bytes)
    pv, pos, _ = _process(["square"])
    model.image_features(pv, pos)
    mx.synchronize()
    assert mx.get_active_memory() - before >= loaded + tower_bytes


def test_quantizing_convert_keeps_the_tower_float(ckpt_factory, tmp_path):
    """A quantizing conversion leaves the tower and embedder as they were (group 32 would
    fit the tower's 32-wide inputs), and the converted model still reads images."""
    from safetensors.numpy import load_file

    from mlx_diffgemma.convert.commands import convert

    src = ckpt_factory("vision")
    out = tmp_path / "q"
    convert(src, out, quantize=True, q_bits=4, q_group_size=32, progress=False, verbose=False)
    source = load_file(str(src / "model.safetensors"))
    written = {}
    for f in out.glob("*.safetensors"):
        written.update(load_file(str(f)))
    vision = [k for k in source if ".vision_tower." in k or ".embed_vision." in k]
    assert len(vision) > 40
    for k in vision:
        assert not any(w.startswith(k.rsplit(".", 1)[0] + ".scales") for w in written), k
        np.testing.assert_array_equal(written[k], source[k], err_msg=k)
    model, _ = md.load(out)
    pv, pos, counts = _process(["wide"])
    assert model.image_features(pv, pos).shape == (counts[0], 48)

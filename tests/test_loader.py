"""Loading HF-format directories: sharded checkpoints, config variants and clear errors."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import load
from mlx_diffgemma.models.checkpoint import WeightsError
from mlx_diffgemma.models.config import ConfigError, ModelArgs


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, ref_mixed):
    """The mixed checkpoint saved in several shards with an index, as the release is."""
    path = tmp_path_factory.mktemp("sharded")
    ref_mixed.save_pretrained(path, max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


def test_sharded_checkpoint_loads_like_single_file(sharded, ckpt_mixed):
    a, _ = load(sharded)
    b, _ = load(ckpt_mixed)
    cache_a, cache_b = a.make_cache(), b.make_cache()
    ids = mx.array([[5, 6, 7, 8, 9]])
    a.encode(ids, cache_a)
    b.encode(ids, cache_b)
    canvas = mx.array(np.arange(16)[None])
    np.testing.assert_array_equal(np.array(a.decode(canvas, cache_a)), np.array(b.decode(canvas, cache_b)))


def test_encoder_layer_scalars_are_the_encoders_own(ckpt_mixed, ref_mixed):
    model, _ = load(ckpt_mixed)
    for i, layer in enumerate(ref_mixed.model.encoder.language_model.layers):
        ours = model.model.encoder.language_model.layers[i].layer_scalar
        np.testing.assert_allclose(np.array(ours), layer.layer_scalar.numpy())
        dec = ref_mixed.model.decoder.layers[i].layer_scalar.numpy()
        assert not np.allclose(np.array(ours), dec), "fixture should give encoder/decoder different scalars"


def test_tokenizer_is_none_without_tokenizer_files(tmp_path, ckpt_tiny):
    path = _copy(ckpt_tiny, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (path / f).unlink(missing_ok=True)
    model, tok = load(path)
    assert tok is None and model.vocab_size == 128


def test_wrong_model_type(tmp_path, ckpt_tiny):
    path = _copy(ckpt_tiny, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gemma4"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type is 'gemma4', expected 'diffusion_gemma'"):
        load(path)


def test_missing_shard(tmp_path, sharded):
    path = _copy(sharded, tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(WeightsError, match=f"missing shard {victim}"):
        load(path)


@pytest.mark.parametrize("weight_map, message", [
    ([], "field weight_map must map tensor names to shard files"),
    ({"model.decoder.norm.weight": 3}, r"field weight_map\['model.decoder.norm.weight'\] must be a shard file name"),
    ({"model.decoder.norm.weight": "/etc/passwd"}, "must be a shard file name in the same directory"),
])
def test_malformed_index(tmp_path, sharded, weight_map, message):
    path = _copy(sharded, tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightsError, match=message):
        load(path)


def test_tensor_of_the_wrong_shape(tmp_path, ckpt_tiny):
    from safetensors.numpy import load_file, save_file

    path = _copy(ckpt_tiny, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    name = "model.decoder.layers.0.mlp.up_proj.weight"
    tensors[name] = np.zeros((7, 32), np.float32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"tensor model.decoder.layers.0.mlp.up_proj.weight has shape \(7, 32\)"):
        load(path)


def test_missing_tensor(tmp_path, ckpt_tiny):
    from safetensors.numpy import load_file, save_file

    path = _copy(ckpt_tiny, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.decoder.layers.1.router.per_expert_scale"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="missing 1 tensor.*layers.1.router.per_expert_scale"):
        load(path)


def test_truncated_safetensors(tmp_path, ckpt_tiny):
    path = _copy(ckpt_tiny, tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load(path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")


def test_released_config_shapes():
    """The released config's keys (global_head_dim / num_global_key_value_heads) and
    transformers' saved form (per_layer_config) describe the same model."""
    released = {
        "model_type": "diffusion_gemma",
        "canvas_length": 256,
        "text_config": {
            "model_type": "diffusion_gemma_text",
            "hidden_size": 2816, "intermediate_size": 2112, "moe_intermediate_size": 704,
            "num_experts": 128, "top_k_experts": 8, "num_hidden_layers": 30,
            "num_attention_heads": 16, "num_key_value_heads": 8, "num_global_key_value_heads": 2,
            "head_dim": 256, "global_head_dim": 512, "sliding_window": 1024, "vocab_size": 262144,
            "use_bidirectional_attention": "vision",
        },
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 1152},
    }
    a = ModelArgs.from_dict(released)
    assert [i for i, t in enumerate(a.layer_types) if t == "full_attention"] == [5, 11, 17, 23, 29]
    assert (a.head_dim_of(5), a.kv_heads_of(5), a.head_dim_of(0), a.kv_heads_of(0)) == (512, 2, 256, 8)
    saved = json.loads(json.dumps(released))
    tc = saved["text_config"]
    del tc["global_head_dim"], tc["num_global_key_value_heads"]
    tc["per_layer_config"] = {str(i): {"head_dim": 512, "num_key_value_heads": 2} for i in (5, 11, 17, 23, 29)}
    b = ModelArgs.from_dict(saved)
    assert (b.global_head_dim, b.num_global_key_value_heads) == (512, 2)


def test_config_missing_keys():
    with pytest.raises(ConfigError, match="missing required keys: num_experts"):
        ModelArgs.from_dict({
            "model_type": "diffusion_gemma",
            "text_config": {
                "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 8,
                "vocab_size": 8, "top_k_experts": 1, "moe_intermediate_size": 8,
            },
        })

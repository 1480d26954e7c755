"""Loading a model directory (Hugging Face format or our MLX conversion) into the MLX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import infer_quant_config

from .config import ConfigError, GenerationConfig, ModelArgs, load_config
from .checkpoint import ConversionError, WeightsError, check_tokenizer_files, first_line, scan_checkpoint
from .model import Model
from .paths import resolve_model_path
from .weights import hf_to_mlx_name

def weight_files(model_path: Path) -> List[Path]:
    """The safetensors shards of a directory, every header checked as the converter
    checks it (cheap: headers only) and against the index when there is one, so a
    damaged or incomplete checkpoint never reaches mx.load."""
    try:
        tensors = scan_checkpoint(model_path)
    except ConversionError as e:
        raise WeightsError(str(e)) from e
    return sorted({ref.file for ref in tensors.values()})


def load_safetensors(path: Path) -> Dict[str, mx.array]:
    """mx.load (lazy: nothing is read until evaluated) with an error naming the file."""
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError with terse text
        raise WeightsError(
            f"cannot read {path} ({e}); the file is corrupt or truncated: download or "
            "convert it again"
        ) from e


def _check_float_labels(
    expected: Dict[str, mx.array], weights: Dict[str, mx.array], origin: Dict[str, Path]
) -> None:
    """Refuses an integer tensor where the model holds a float one (a damaged header that
    relabels the bytes would otherwise load as garbage of the right shape)."""
    files = {hf_to_mlx_name(k): f for k, f in origin.items()}
    for name, param in expected.items():
        if mx.issubdtype(param.dtype, mx.floating) and not mx.issubdtype(weights[name].dtype, mx.floating):
            raise WeightsError(
                f"{files.get(name, 'the checkpoint')}: tensor {name} is labelled "
                f"{str(weights[name].dtype).rsplit('.', 1)[-1]} "
                "but the model expects a float; the file is damaged: download or convert it again"
            )


def _quantize_like_checkpoint(model: Model, config: Dict[str, Any], weights: Dict[str, mx.array]):
    """Swaps Linear/Embedding/SwitchLinear modules for quantized ones as the checkpoint was
    saved: per-module settings from config['quantization'] (as mlx-lm and mlx-vlm record
    them), else inferred from the stored scales."""
    quantization = config.get("quantization") or config.get("quantization_config")
    if not quantization and not any(k.endswith(".scales") for k in weights):
        return

    quantization = quantization or {}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        if f"{path}.scales" not in weights:
            return False
        if isinstance(quantization.get(path), dict):
            return quantization[path]
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_model(model_path: Union[str, Path], lazy: bool = False) -> Tuple[Model, Dict[str, Any]]:
    model_path = Path(model_path)
    config = load_config(model_path)
    config_path = model_path / "config.json"
    args = ModelArgs.from_dict(config, source=str(config_path))
    for key in ("quantization", "quantization_config"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ConfigError(
                f"{config_path}: {key} must be an object (got {config[key]!r}); fix the file"
            )
    try:
        model = Model(args)
    except (ValueError, TypeError, KeyError) as e:  # e.g. a RoPE type mlx-lm does not know
        raise ConfigError(
            f"{config_path}: the config does not describe a buildable model ({e})"
        ) from None

    weights: Dict[str, mx.array] = {}
    origin: Dict[str, Path] = {}
    for f in weight_files(model_path):
        loaded = load_safetensors(f)
        weights.update(loaded)
        origin.update(dict.fromkeys(loaded, f))
    weights = model.sanitize(weights)

    _quantize_like_checkpoint(model, config, weights)

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise WeightsError(
            f"checkpoint {model_path} is missing {len(missing)} tensor(s) the config requires: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    if unexpected:
        raise WeightsError(
            f"checkpoint {model_path} has {len(unexpected)} tensor(s) this config does not use: "
            f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, param in expected.items():
        if weights[name].shape != param.shape:
            raise WeightsError(
                f"tensor {name} has shape {tuple(weights[name].shape)} but the config implies "
                f"{tuple(param.shape)}: the weights and config.json do not belong together"
            )
    _check_float_labels(expected, weights, origin)
    model.update(tree_unflatten(list(weights.items())))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def load_tokenizer(model_path: Union[str, Path], eos_token_ids=None):
    """mlx-lm's TokenizerWrapper (streaming detokenizer included), or None when the
    directory carries no tokenizer."""
    model_path = Path(model_path)
    if not any((model_path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    check_tokenizer_files(model_path)
    try:
        return load_mlx_tokenizer(model_path, eos_token_ids=eos_token_ids)
    except Exception as e:  # transformers' errors vary by file and version
        raise ConfigError(f"cannot load the tokenizer in {model_path} ({first_line(e)}); "
                          "re-download or re-convert the model") from e


def check_sidecars(path: Path) -> List[str]:
    """What `load` and chat need besides the weights, checked as they use it: the
    tokenizer loads and its chat templates compile (`load_tokenizer`), the
    generation parameters parse and are valid. Returns one line per problem (empty when
    all is well)."""

    problems = []
    try:
        if load_tokenizer(path) is None:
            problems.append(f"no tokenizer in {path} (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    except Exception as e:  # tokenizers/transformers raise many kinds on damaged files
        problems.append(f"the tokenizer in {path} cannot be loaded ({first_line(e)})")
    try:
        GenerationConfig.from_model_dir(path)  # what chat builds its parameters with
    except (ValueError, TypeError) as e:
        problems.append(f"generation parameters of {path} (generation_config.json, config.json): {first_line(e)}")
    return problems


def load(path_or_repo: Union[str, Path], lazy: bool = False):
    """Loads a DiffusionGemma model directory or hub id: returns (model, tokenizer), the
    tokenizer None when the directory has none."""
    model_path = resolve_model_path(path_or_repo)
    model, config = load_model(model_path, lazy=lazy)
    model.model_path = model_path
    # Read once here; every generation applies its overrides to these.
    model.generation_defaults = GenerationConfig.from_model_dir(model_path)
    tokenizer = load_tokenizer(model_path, eos_token_ids=model.generation_defaults.eos_token_id)
    return model, tokenizer

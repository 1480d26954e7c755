"""Loading a model directory (Hugging Face format or our MLX conversion) into the MLX model."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import infer_quant_config

from .config import ConfigError, GenerationConfig, ModelArgs, load_config
from .checkpoint import ConversionError, WeightsError, check_tokenizer_files, first_line, scan_checkpoint
from .model import Model
from .paths import resolve_model_path
from .weights import hf_to_mlx_name, is_vision_tensor

def _scan(model_path: Path):
    try:
        return scan_checkpoint(model_path)
    except ConversionError as e:
        raise WeightsError(str(e)) from e


def weight_files(model_path: Path) -> List[Path]:
    """The safetensors shards of a directory, every header checked as the converter
    checks it (cheap: headers only) and against the index when there is one, so a
    damaged or incomplete checkpoint never reaches mx.load."""
    return sorted({ref.file for ref in _scan(model_path).values()})


# -- will it fit? ------------------------------------------------------------------------------


def memory_limit() -> Tuple[int, str]:
    """(bytes, what they are) a model may use here: on Metal MLX's
    `max_recommended_working_set_size` (about 2/3 to 3/4 of a Mac's memory), elsewhere the
    machine's physical memory."""
    # mx.device_info where MLX has it (mx.metal.device_info is deprecated there).
    get = getattr(mx, "device_info", None) or getattr(getattr(mx, "metal", None), "device_info", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = get() if get is not None else {}
    except Exception:  # no Metal, or an MLX without the call
        info = {}
    limit = info.get("max_recommended_working_set_size")
    if limit:
        return int(limit), "the GPU's recommended working set"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def runtime_bytes(config: Dict[str, Any], context: int = 4096, ranks: int = 1) -> int:
    """What generation adds to the weights (sizes.generation_memory): the KV cache of a
    `context`-token prompt plus a canvas of new tokens, one denoising step's float32
    logits and sampler temporaries, and a layer's activations."""
    from .sizes import generation_memory

    g = generation_memory(config, prompt=context, ranks=ranks)
    return int(g["kv"] + g["step"] + g["layer_acts"])


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def check_fits(path_or_config: Union[str, Path, Dict[str, Any]], context: int = 4096,
               limit: Optional[int] = None, out=None, ranks: int = 1) -> Dict[str, Any]:
    """Whether a model directory (or, from its config alone, a conversion of it) fits
    this device: the text weights our runtime loads (the vision tower, read only when an
    image is encoded, is not counted) plus
    `runtime_bytes(context)` against `memory_limit()`. When it does not, prints one line
    to `out` (stderr) naming the widest recipe whose estimate would fit. Reads headers
    and config.json only. Returns the numbers and the line (None when it fits).
    `ranks` > 1: what one rank of a model split over that many holds (sharding.py)."""
    from .recipes import QUANTIZED_RECIPES
    from .sharding import is_split
    from .sizes import estimate

    if isinstance(path_or_config, dict):
        config, where = path_or_config, "this model"
        weights = estimate(config, None, ranks=ranks)["text_bytes"]
    else:
        where = Path(path_or_config)
        config = load_config(where)
        names = ((hf_to_mlx_name(k), r.nbytes) for k, r in _scan(where).items())
        weights = sum(n / ranks if is_split(k) else n for k, n in names if k is not None)
    extra = runtime_bytes(config, context, ranks)
    if limit is None:
        limit, what = memory_limit()
    else:
        what = "the given limit"
    need = weights + extra
    report: Dict[str, Any] = {"weights": weights, "runtime": extra, "need": need, "limit": limit,
                              "fits": need <= limit, "suggestion": None, "message": None}
    if report["fits"]:
        return report
    for r in QUANTIZED_RECIPES:
        size = estimate(config, r, ranks=ranks)["text_bytes"] + extra
        if size <= limit and size < need:
            report["suggestion"] = (r, size)
            break
    ctx = f"{context // 1024}K" if context % 1024 == 0 else str(context)
    advice = (f"convert with --recipe {report['suggestion'][0]} (about "
              f"{_gb(report['suggestion'][1])})" if report["suggestion"]
              else "no recipe fits; use a machine with more memory")
    each = f" on each of {ranks} ranks" if ranks > 1 else ""
    report["message"] = (
        f"warning: {where} needs about {_gb(need)}{each} (weights {_gb(weights)} + {ctx} context "
        f"and one step {_gb(extra)}) but {what} is {_gb(limit)}: {advice}")
    print(report["message"], file=out or sys.stderr)
    return report


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


def load_model(model_path: Union[str, Path], lazy: bool = False, group=None) -> Tuple[Model, Dict[str, Any]]:
    """Builds the model and installs the checkpoint's arrays without a second copy of any
    weight: Model(args)'s float init and nn.quantize's re-quantization of it are lazy and
    never evaluated (the modules' arrays are replaced before anything runs), mx.load is
    lazy, and `model.update` installs the loaded arrays themselves; evaluating the
    parameters then reads each tensor once (see tests/test_recipes.py).

    `group` (an mx.distributed group of more than one rank): the model comes split over
    it (`Model.shard`), and this rank reads only its slices of the split tensors
    (`sharding.local_weights`)."""
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
    loaded: Dict[str, mx.array] = {}
    for f in weight_files(model_path):
        loaded = load_safetensors(f)
        weights.update(loaded)
        origin.update(dict.fromkeys(loaded, f))
    del loaded  # `weights` alone holds the arrays: a split load lets each go once sliced
    if model.has_vision and not any(is_vision_tensor(k) for k in weights):
        # A config that describes a tower whose weights were left out: text-only.
        model = Model(replace(args, vision_config=None))
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
    if group is not None and group.size() > 1:
        from .sharding import local_weights, plan, set_sharded

        spans = plan(model, group.rank(), group.size())
        named = {hf_to_mlx_name(k, keep_vision=True): r for k, r in _scan(model_path).items()}
        weights = local_weights(model, spans, weights, named)
        set_sharded(model, group, spans)
    model.update(tree_unflatten(list(weights.items())))
    if not lazy:
        # The vision tower stays lazy (mx.load maps it, reads nothing) until the first
        # image: a text-only session never holds its ~1.1 GB (bf16, released size).
        mx.eval([v for k, v in tree_flatten(model.parameters()) if not is_vision_tensor(k)])
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


def load(path_or_repo: Union[str, Path], lazy: bool = False, check_memory: bool = True,
         group=None, tokenizer: bool = True):
    """Loads a DiffusionGemma model directory or hub id: returns (model, tokenizer), the
    tokenizer None when the directory has none (or `tokenizer=False`). First
    (`check_memory`) says in one line when the model will not fit this device
    (`check_fits`).

    `group` (an `mx.distributed` group, e.g. `mx.distributed.init()` under `mlx.launch`):
    every rank calls `load` with the same directory; the ranks first check that they
    hold the same model, then each reads only its share (`Model.shard`, sharding.py)
    and they run every later call together."""
    from .distributed import barrier, check_same_model, stage

    model_path = resolve_model_path(path_or_repo)
    group = group if group is not None and group.size() > 1 else None
    if group is not None:
        check_same_model(model_path, group)
    if check_memory:
        try:
            check_fits(model_path, ranks=group.size() if group is not None else 1)
        except (ConfigError, WeightsError, ValueError, TypeError, KeyError):
            pass  # load_model reports a broken directory properly
    model, config = load_model(model_path, lazy=lazy, group=group)
    if group is not None:
        barrier(group)  # every rank holds its share
        stage["loading"] = "loaded"
    model.model_path = model_path
    # Read once here; every generation applies its overrides to these.
    model.generation_defaults = GenerationConfig.from_model_dir(model_path)
    if not tokenizer:
        return model, None
    return model, load_tokenizer(model_path, eos_token_ids=model.generation_defaults.eos_token_id)

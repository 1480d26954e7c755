"""Loading a model directory (Hugging Face format or our MLX conversion) into the MLX model."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import infer_quant_config

from .config import ConfigError, ModelArgs, load_config, read_json_object
from .model import Model

INDEX_FILE = "model.safetensors.index.json"


class WeightsError(ValueError):
    """A checkpoint whose tensors do not match the model its config describes."""


def weight_files(model_path: Path) -> List[Path]:
    """The safetensors shards of a directory, checked against its index when it has one."""
    index_path = model_path / INDEX_FILE
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{index_path} is not valid JSON ({e})") from e
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if not (model_path / s).exists()]
        if missing:
            raise WeightsError(
                f"missing shard {', '.join(missing)} in {model_path}: {INDEX_FILE} lists "
                f"{len(shards)} shards; download or copy the missing file(s) again"
            )
        return [model_path / s for s in shards]
    files = sorted(Path(p) for p in glob.glob(str(model_path / "*.safetensors")))
    if not files:
        raise WeightsError(f"no .safetensors files in {model_path}")
    return files


def load_safetensors(path: Path) -> Dict[str, mx.array]:
    """mx.load with an error that names the file (truncated downloads are common)."""
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError with terse text
        raise WeightsError(
            f"cannot read {path} ({e}); the file is corrupt or truncated: download or "
            "convert it again"
        ) from e


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
    for f in weight_files(model_path):
        weights.update(load_safetensors(f))
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
    model.update(tree_unflatten(list(weights.items())))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def check_tokenizer_files(model_path: Path) -> None:
    """The tokenizer's JSON files and chat templates parse, else a ConfigError naming the
    file (transformers would fail later with a bare JSONDecodeError or TemplateSyntaxError)."""
    for name in TOKENIZER_JSON_FILES:
        if (model_path / name).exists():
            data = read_json_object(model_path / name)
            if name == "tokenizer_config.json" and data.get("chat_template") is not None:
                _check_chat_template(data["chat_template"], f"{model_path / name}: chat_template")
    template = model_path / CHAT_TEMPLATE_FILE
    if template.exists():
        try:
            text = template.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{template} is not UTF-8 text ({e.reason}); fix or remove it") from None
        _check_chat_template(text, str(template))


def _check_chat_template(template: Any, where: str) -> None:
    """A chat template (a string, or transformers' list of {name, template}) compiles."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("template"), str) for t in template
    ):
        sources = [t["template"] for t in template]
    elif isinstance(template, str):
        sources = [template]
    else:
        raise ConfigError(f"{where} must be a string or a list of {{name, template}} objects")
    for source in sources:
        try:
            _compile_jinja_template(source)
        except TemplateError as e:
            line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
            raise ConfigError(f"{where} is not a valid Jinja template ({e}{line}); fix it") from None


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
        raise ConfigError(f"cannot load the tokenizer in {model_path} ({_first_line(e)}); "
                          "re-download or re-convert the model") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# The default model of `mlx-diffgemma chat` / `generate`: mlx-community's 4-bit conversion
# of the released checkpoint, and that checkpoint itself (for the convert hint).
DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
ORIGINAL_MODEL = "google/diffusiongemma-26B-A4B-it"

# Models shipped inside the package (e.g. `toy-sudoku`): assets/<name>/ holding `hf/`
# (Hugging Face format) and/or an MLX conversion in a subfolder (`mlx/`, `mlx-*`) or at
# the top level.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# LM Studio keeps models at <root>/<publisher>/<model>/; this variable (one directory,
# or several separated by os.pathsep) replaces the default roots.
LMSTUDIO_ENV = "LMSTUDIO_MODELS_DIR"

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def convert_hint() -> str:
    return (
        "pass --model PATH|HUB_ID|NAME (a model directory, a Hugging Face id such as "
        f"{DEFAULT_MODEL}, or an LM Studio model name), or convert the original weights "
        f"yourself: mlx-diffgemma convert --hf-path {ORIGINAL_MODEL} "
        "--mlx-path ./diffusiongemma-26B-A4B-it-4bit -q"
    )


def lmstudio_roots() -> List[Path]:
    """LM Studio's model folders: $LMSTUDIO_MODELS_DIR when set, else
    ~/.lmstudio/models and ~/.cache/lm-studio/models."""
    env = os.environ.get(LMSTUDIO_ENV)
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def find_lmstudio_model(name: str) -> Optional[Path]:
    """`publisher/model` or a bare `model` in LM Studio's folders. A bare name held by
    several publishers resolves to mlx-community's copy, else is an error."""
    name = name.strip("/")
    roots = [r for r in lmstudio_roots() if r.is_dir()]
    if "/" in name:
        for root in roots:
            if _is_model_dir(root / name):
                return root / name
        return None
    matches: List[Path] = []
    for root in roots:
        for publisher in sorted(p for p in root.iterdir() if p.is_dir()):
            if _is_model_dir(publisher / name):
                matches.append(publisher / name)
    if not matches:  # LM Studio shows names case-insensitively
        for root in roots:
            for d in sorted(root.glob("*/*")):
                if d.name.lower() == name.lower() and _is_model_dir(d):
                    matches.append(d)
    if len(matches) > 1:
        preferred = [m for m in matches if m.parent.name == "mlx-community"]
        if len(preferred) == 1:
            return preferred[0]
        listing = ", ".join(f"{m.parent.name}/{m.name}" for m in matches)
        raise ValueError(
            f"model name {name!r} is ambiguous in LM Studio's folders ({listing}); "
            "pass publisher/name or the directory"
        )
    return matches[0] if matches else None


def packaged_model(name: str, prefer: str = "mlx") -> Optional[Path]:
    """A model shipped in the package's assets (e.g. `toy-sudoku`): its MLX conversion
    when present, else its `hf/` folder (`prefer="hf"` reverses the order)."""
    if not name or "/" in name or name.startswith("."):
        return None
    root = ASSETS_DIR / name
    if not root.is_dir():
        return None
    hf = [root / "hf"] if _is_model_dir(root / "hf") else []
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name != "hf")
    subdirs.sort(key=lambda d: (d.name != "mlx", not d.name.startswith("mlx")))
    mlx = [d for d in subdirs if _is_model_dir(d)]
    if _is_model_dir(root):
        mlx.append(root)
    order = hf + mlx if prefer == "hf" else mlx + hf
    if not order:
        raise FileNotFoundError(
            f"the packaged model {name!r} ({root}) holds no weights yet: neither an MLX "
            "conversion nor an hf/ folder with config.json"
        )
    return order[0]


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))


def resolve_model_path(path_or_repo: Union[str, Path], prefer: str = "mlx") -> Path:
    """Finds a model directory from what a user typed:

    - a local directory;
    - a packaged model name (`toy-sudoku`: its MLX conversion, else its `hf/` folder;
      `prefer="hf"` for backends that load Hugging Face checkpoints);
    - a bare name in LM Studio's folders (`<root>/<publisher>/<name>`, roots from
      $LMSTUDIO_MODELS_DIR or ~/.lmstudio/models and ~/.cache/lm-studio/models);
    - a Hugging Face hub id `org/name`: LM Studio's `<root>/org/name` when it holds it
      (no download of a model already on disk), else huggingface_hub's cache and hub
      (HF_HUB_OFFLINE=1 uses the cache only).
    """
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is a file; pass the model directory")
        return p
    text = str(path_or_repo).strip()
    looks_like_path = text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
    if not text or looks_like_path:
        raise FileNotFoundError(f"model directory {p} does not exist")

    if "/" not in text:
        asset = packaged_model(text, prefer=prefer)
        if asset is not None:
            return asset
        found = find_lmstudio_model(text)
        if found is not None:
            return found
        roots = ", ".join(str(r) for r in lmstudio_roots())
        raise FileNotFoundError(
            f"no model named {text!r}: not a directory, not a packaged model, and not in "
            f"LM Studio's folders ({roots}; set {LMSTUDIO_ENV} to look elsewhere); "
            + convert_hint()
        )

    found = find_lmstudio_model(text)
    if found is not None:
        return found
    try:
        return _hub_snapshot(text)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else (
            "on the Hugging Face hub or in the local cache"
        )
        what = "the default model " if text == DEFAULT_MODEL else ""
        raise FileNotFoundError(
            f"cannot find {what}{text!r} {where}, nor in LM Studio's folders "
            f"({_first_line(e)}); "
            + convert_hint()
        ) from e


def load(path_or_repo: Union[str, Path], lazy: bool = False):
    """Loads a DiffusionGemma model directory or hub id: returns (model, tokenizer), the
    tokenizer None when the directory has none."""
    model_path = resolve_model_path(path_or_repo)
    model, config = load_model(model_path, lazy=lazy)
    model.model_path = model_path
    from .config import GenerationConfig

    eos = GenerationConfig.from_model_dir(model_path).eos_token_id
    tokenizer = load_tokenizer(model_path, eos_token_ids=eos)
    return model, tokenizer

"""Where a model is: one resolver for what a user types after `--model` (a directory, a
model shipped in the package, an LM Studio name, a Hugging Face hub id). Imports no
array framework, so the torch path and the command line use it too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

from .checkpoint import first_line

# The default model of `mlx-diffgemma chat` / `generate`: mlx-community's 4-bit conversion
# of the released checkpoint, and that checkpoint itself (for the convert hint).
DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
ORIGINAL_MODEL = "google/diffusiongemma-26B-A4B-it"

# Models shipped inside the package (e.g. `toy-sudoku`): assets/<name>/ holding `hf/`
# (Hugging Face format) and/or an MLX conversion in a subfolder (`mlx/`, `mlx-*`) or at
# the top level.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

# LM Studio keeps models at <root>/<publisher>/<model>/; this variable (one directory,
# or several separated by os.pathsep) replaces the default roots.
LMSTUDIO_ENV = "LMSTUDIO_MODELS_DIR"

# What a model directory needs from the hub: weights, configs, tokenizer, chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


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


def hub_snapshot(repo_id: str, revision: Optional[str] = None) -> Path:
    """The model's files from the Hugging Face hub, or its local cache (HF_HUB_OFFLINE=1:
    the cache only)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))


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
        return hub_snapshot(text)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else (
            "on the Hugging Face hub or in the local cache"
        )
        what = "the default model " if text == DEFAULT_MODEL else ""
        raise FileNotFoundError(
            f"cannot find {what}{text!r} {where}, nor in LM Studio's folders "
            f"({first_line(e)}); "
            + convert_hint()
        ) from e

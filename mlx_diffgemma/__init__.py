"""mlx-diffgemma: Google's DiffusionGemma on Apple Silicon, with MLX.

The names below are imported on first use, so that `mlx_diffgemma.torch_backend` (and
the command line's `--help`) run without importing MLX.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load": "models.loader",
    "generate": "generation.api",
    "stream_generate": "generation.api",
    "infill": "generation.infilling",
    "stream_infill": "generation.infilling",
    "InfillSummary": "generation.infilling",
    "edit": "generation.editing",
    "stream_edit": "generation.editing",
    "speculative_generate": "generation.speculative",
    "speculative_stream_generate": "generation.speculative",
    "SpeculativeSummary": "generation.events",
    "Processor": "images.processor",
    "Draft": "generation.events",
    "Commit": "generation.events",
    "Summary": "generation.events",
    "NoiseSource": "generation.noise",
    "SeededNoise": "generation.noise",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value

"""mlx-diffgemma: Google's DiffusionGemma on Apple Silicon, with MLX."""

from .drafter import Commit, Draft, Summary, generate, stream_generate
from .loader import load
from .noise import NoiseSource, SeededNoise

__version__ = "0.1.0"

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "Draft",
    "Commit",
    "Summary",
    "NoiseSource",
    "SeededNoise",
    "__version__",
]

"""The torch reference path: our drafter on torch, the network from transformers.

Same loop, events and statistics as the MLX path (`drafter.draft`), with the per-step
array work written against torch tensors the way the reference writes it. Runs on CPU
or CUDA; loads Hugging Face-format directories (not MLX conversions).
"""

from .drafter import TorchDenoiser, generate, load, stream_generate
from .infilling import infill, stream_edit, stream_infill

__all__ = ["TorchDenoiser", "load", "generate", "stream_generate", "infill", "stream_infill", "stream_edit"]

"""The cache operations a chat needs, per backend: encode, snapshot, one `rollback`, a
fork for the server's branching conversations, and generation on the backend's own
`stream_generate`. `MLXBackend` holds our model and its `EncoderCache`;
`TorchBackend` transformers' network and its `DynamicCache` (session.ChatSession drives
either; speculative.py's backend builds on the MLX one). No array framework is imported
at module level.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence


class MLXBackend:
    """The MLX model and its `EncoderCache`.

    Going back to the stable boundary is a trim: the cache's sliding layers keep `slack`
    tokens beyond their window, sized to cover a turn's thought channel plus the
    canvases the drafter encodes, so no snapshot (and no copy of the cache) is needed.
    When a turn could outgrow the slack (max_new_tokens raised after the cache was
    made), that turn takes a snapshot and restores it instead.
    """

    name = "mlx"

    def __init__(self, model):
        import mlx.core as mx

        self.mx = mx
        self.model = model
        self.canvas_length = model.canvas_length
        self.max_context = int(model.args.max_position_embeddings)
        self.slack = 0

    def new_cache(self, max_new_tokens: int):
        C = self.canvas_length
        self.slack = math.ceil(max_new_tokens / C) * C + 64
        return self.model.make_cache(slack=self.slack)

    def encode(self, cache, ids: Sequence[int], images=None) -> None:
        kw = {} if images is None else images.encoder_kwargs()
        self.model.encode(self.mx.array([list(ids)], dtype=self.mx.int32), cache, **kw)

    # A snapshot is taken only for a turn that could outgrow the slack, and dropped once
    # used: the cache is the model's largest state after the weights.
    keeps_snapshots = False

    def needs_snapshot(self, turn_tokens: int) -> bool:
        return turn_tokens > self.slack

    def snapshot(self, cache):
        return cache.snapshot()

    def rollback(self, cache, length: int, snap):
        """The cache back at its first `length` tokens: trimmed when every layer holds the
        same tokens and the sliding layers' slack covers the cut, else restored from
        `snap` = (length, snapshot). None when neither is possible."""
        have = cache.offset
        aligned = all(layer.offset == have for layer in cache.layers)
        if have >= length and aligned and (have == length or cache.can_trim(have - length)):
            cache.trim(have - length)
            return cache
        if snap is not None and snap[0] == length:
            cache.restore(snap[1])
            return cache
        return None

    def fork(self, cache):
        """An independent cache holding what `cache` holds (the prompt cache branches a
        conversation off another one's prefix this way). The snapshot's arrays are new
        slices, so later writes to either cache do not reach the other."""
        new = self.model.make_cache(slack=self.slack)
        new.restore(cache.snapshot())
        return new

    def stream_generate(self, tokenizer, prompt, cache, noise, seed, gen_kwargs, images=None):
        from .generation import stream_generate

        return stream_generate(
            self.model, tokenizer, prompt, images=images, cache=cache, noise=noise, seed=seed,
            **gen_kwargs)

    def cache_bytes(self, cache) -> int:
        return cache.nbytes


class TorchBackend:
    """transformers' model and its DynamicCache.

    DynamicCache cannot roll back a sliding-window layer once its window is full
    (`crop` refuses), so the stable boundary is kept as a deep copy of the cache
    (`copy.deepcopy`), restored by copying it again: the reference path pays that
    memory, the MLX path trims instead.
    """

    name = "torch"

    def __init__(self, model):
        import torch

        self.torch = torch
        self.model = model
        self.canvas_length = int(model.config.canvas_length)
        self.max_context = int(model.config.get_text_config().max_position_embeddings)
        self.device = next(model.parameters()).device

    def new_cache(self, max_new_tokens: int):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def encode(self, cache, ids: Sequence[int], images=None) -> None:
        t = self.torch.as_tensor([list(ids)], dtype=self.torch.long, device=self.device)
        with self.torch.no_grad():
            from .images import torch_image_kwargs

            self.model.model.encoder(input_ids=t, past_key_values=cache,
                                     **torch_image_kwargs(self.model, t, images))

    # Every turn keeps a snapshot of its stable boundary: it is the only way back.
    keeps_snapshots = True

    def needs_snapshot(self, turn_tokens: int) -> bool:
        return True

    def snapshot(self, cache):
        return copy.deepcopy(cache)

    def rollback(self, cache, length: int, snap):
        """A copy of the snapshot taken at `length` tokens, or None without one."""
        if snap is not None and snap[0] == length:
            return copy.deepcopy(snap[1])
        return None

    def fork(self, cache):
        return copy.deepcopy(cache)

    def stream_generate(self, tokenizer, prompt, cache, noise, seed, gen_kwargs, images=None):
        from .torch_backend import stream_generate

        return stream_generate(
            self.model, tokenizer, prompt, images=images, cache=cache, noise=noise, seed=seed,
            **gen_kwargs)

    def cache_bytes(self, cache) -> int:
        total = 0
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if t is not None and hasattr(t, "numel"):
                    total += t.numel() * t.element_size()
        return total


def make_backend(model):
    if not hasattr(model, "make_cache"):
        return TorchBackend(model)
    if getattr(model, "group", None) is not None:  # split over ranks: rank 0 leads them
        from .distributed import leading

        return leading(MLXBackend(model))
    return MLXBackend(model)

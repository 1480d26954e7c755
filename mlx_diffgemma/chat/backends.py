"""The cache operations a chat needs, per backend: encode, snapshot, one `rollback`, a
fork for the server's branching conversations, and generation with a request's
`Settings`. `MLXBackend` holds our model and its `EncoderCache`; `TorchBackend`
transformers' network and its `DynamicCache`; `SpeculativeBackend` our model drafting
for an mlx-lm target (generation/speculative.py). session.ChatSession drives any of
them. No array framework is imported at module level.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

from ..generation.settings import Settings

# Rank 0 of a command-line run over several ranks (mirror.py) wraps its MLX backend in
# this, to lead the other ranks; None elsewhere.
lead = {"backend": None}


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

    def stream_generate(self, tokenizer, prompt, cache, settings: Settings, noise=None, images=None):
        from ..generation.api import run

        return run(self.model, tokenizer, prompt, settings, images=images, cache=cache, noise=noise)

    def stream_infill(self, tokenizer, prompt, suffix, cache, settings: Settings, noise=None, reply_prefix=None,
                      **infill):
        """Infill after `prompt` (ids): raw, or with `reply_prefix` starting the reply."""
        from ..generation.infilling import run

        return infill_after(run, self.model, tokenizer, prompt, suffix, cache, settings, noise, reply_prefix,
                            **infill)

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
            from ..torch_backend.drafter import torch_image_kwargs

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

    def stream_generate(self, tokenizer, prompt, cache, settings: Settings, noise=None, images=None):
        from ..torch_backend.drafter import run

        return run(self.model, tokenizer, prompt, settings, images=images, cache=cache, noise=noise)

    def stream_infill(self, tokenizer, prompt, suffix, cache, settings: Settings, noise=None, reply_prefix=None,
                      **infill):
        """Infill after `prompt` (ids): raw, or with `reply_prefix` starting the reply."""
        from ..torch_backend.infilling import run

        return infill_after(run, self.model, tokenizer, prompt, suffix, cache, settings, noise, reply_prefix,
                            **infill)

    def cache_bytes(self, cache) -> int:
        total = 0
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if t is not None and hasattr(t, "numel"):
                    total += t.numel() * t.element_size()
        return total


def infill_after(run, model, tokenizer, prompt, suffix, cache, settings: Settings, noise, reply_prefix, **infill):
    """An infill after `prompt` (ids) with a backend's infill `run`: raw, the prompt is the
    prefix; with `reply_prefix`, the prompt is a rendered conversation and the reply starts
    with it."""
    prefix, messages = (prompt, None) if reply_prefix is None else (reply_prefix, prompt)
    return run(model, tokenizer, prefix, suffix, settings, messages=messages, cache=cache, noise=noise, **infill)


# -- speculative drafting --------------------------------------------------------------------


NO_TARGET_IMAGES = ("images are not supported with a target model: the target verifies text only; "
                    "start the chat without --target to ask about an image")
NO_TARGET_INFILL = ("an infill needs block diffusion's canvases: a target model writes left to right; "
                    "start without --target to fill a middle")


class SpeculativeCache:
    """What a chat keeps per conversation: the drafter's and the target's caches, holding
    the same tokens."""

    def __init__(self, drafter, target: list):
        self.drafter = drafter
        self.target = target

    @property
    def offset(self) -> int:
        return self.drafter.offset


class SpeculativeBackend(MLXBackend):
    """The chat backend of speculative decoding: our model drafts `k` tokens per round
    (`adaptive_k`: 1 to k) in `settings.gen.max_denoising_steps` steps for the `target`,
    sampled at `settings.target_temperature`. Our model's cache goes back to a turn's
    start by trimming, as `MLXBackend`'s; the target's sliding-window layers cannot trim
    a whole turn, so each turn keeps their state at its start (no copy: their updates
    make new arrays) and restores it."""

    def __init__(self, model, target, target_tokenizer, *, k: int, adaptive_k: bool = False):
        from ..generation.speculative import target_context

        super().__init__(model)
        self.target, self.target_tokenizer = target, target_tokenizer
        self.k, self.adaptive_k = k, adaptive_k
        self.max_context = min(self.max_context, target_context(target) or self.max_context)
        self._drafter_snapshot = False

    def new_cache(self, max_new_tokens: int) -> SpeculativeCache:
        from ..generation.speculative import make_target_cache

        return SpeculativeCache(super().new_cache(max_new_tokens), make_target_cache(self.target))

    def encode(self, cache: SpeculativeCache, ids: Sequence[int], images=None) -> None:
        if images is not None:
            raise ValueError(NO_TARGET_IMAGES)
        from ..generation.speculative import Target

        super().encode(cache.drafter, ids)
        Target(self.target, cache=cache.target).prefill(ids)

    def needs_snapshot(self, turn_tokens: int) -> bool:
        # The drafter encodes every kept token: up to a canvas more than a diffusion turn.
        self._drafter_snapshot = super().needs_snapshot(turn_tokens + self.canvas_length)
        return True

    def snapshot(self, cache: SpeculativeCache):
        drafter = super().snapshot(cache.drafter) if self._drafter_snapshot else None
        return drafter, [c.state for c in cache.target]

    def rollback(self, cache: SpeculativeCache, length: int, snap):
        drafter_snap = None if snap is None or snap[1][0] is None else (snap[0], snap[1][0])
        if super().rollback(cache.drafter, length, drafter_snap) is None:
            return None
        have = cache.target[0].offset if cache.target else length
        if have > length and snap is not None and snap[0] == length:
            for c, state in zip(cache.target, snap[1][1]):
                c.state = state
        elif have != length:
            return None
        return cache

    def fork(self, cache: SpeculativeCache) -> SpeculativeCache:
        from ..generation.speculative import make_target_cache

        target = make_target_cache(self.target)
        for c, src in zip(target, cache.target):
            c.state = src.state
        return SpeculativeCache(super().fork(cache.drafter), target)

    def stream_generate(self, tokenizer, prompt, cache: SpeculativeCache, settings: Settings, noise=None,
                        images=None):
        from ..generation.speculative import speculate

        if images:
            raise ValueError(NO_TARGET_IMAGES)
        if noise is not None:
            raise ValueError("speculative decoding draws its own randomness: pass a seed, not a noise source")
        return speculate(self.target, self.target_tokenizer, self.model, tokenizer, prompt, settings, k=self.k,
                         adaptive_k=self.adaptive_k, cache=cache and cache.drafter,
                         target_cache=cache and cache.target)

    def stream_infill(self, *args, **kwargs):
        raise ValueError(NO_TARGET_INFILL)

    def cache_bytes(self, cache: SpeculativeCache) -> int:
        return cache.drafter.nbytes + sum(c.nbytes for c in cache.target)


def make_backend(model):
    if not hasattr(model, "make_cache"):
        return TorchBackend(model)
    if getattr(model, "group", None) is not None and lead["backend"] is not None:
        return lead["backend"](MLXBackend(model))  # split over ranks: rank 0 leads them
    return MLXBackend(model)

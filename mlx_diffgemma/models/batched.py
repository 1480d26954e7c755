"""The decoder over several sequences' canvases in one forward.

Each sequence keeps its own encoder cache (its own context length, its own sliding
window): the canvases are stacked [B, C, hidden] for everything that works per token
(projections, norms, the dense MLP, the routed experts, the LM head), and only the
attention core runs per sequence, over that sequence's cache view and its own canvas,
exactly as `Model.decode` runs it for one. No padded caches and no batch masks: the
decoder never writes a cache, sequences commit at different steps, and a padded copy
would be rebuilt at every commit (and would send masked attention down another kernel
than the solo run's).

Rotary positions differ per sequence (each canvas continues its own context):
`mx.fast.rope` takes the offsets as a [B] array and rotates each row as the solo
call with its integer offset does.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

from .cache import EncoderCache

View = Tuple[Optional[mx.array], Optional[mx.array]]


def cache_views(cache: EncoderCache) -> List[View]:
    """What each decoder layer reads of `cache`: a full layer's keys and values, the
    last `window - 1` of a sliding one's."""
    return [c.view() for c in cache.layers]


def decode_rows(model, h: mx.array, offsets: Sequence[int], views: Sequence[Sequence[View]],
                head: bool = True) -> mx.array:
    """The decoder on B canvases at once. `h` [B, C, hidden]: each canvas's input
    (`Model.decoder_input`); `offsets`: each canvas's first position (its cache's
    offset); `views[b]`: sequence b's `cache_views`. Returns float32 logits [B, C, V]
    (`head=False`: the last layer's hidden states)."""
    if model.group is not None:
        raise ValueError("a model split over ranks denoises one sequence at a time")
    B = h.shape[0]
    if len(offsets) != B or len(views) != B:
        raise ValueError(f"{B} canvases need {B} offsets and {B} cache views "
                         f"(got {len(offsets)} and {len(views)})")
    positions = mx.array(list(offsets), dtype=mx.int32)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(h), positions)
        mixed = []
        for b in range(B):
            keys, values = attn.keys_values(k[b:b + 1], v[b:b + 1], context=views[b][i])
            mixed.append(attn.mix(q[b:b + 1], keys, values, None))
        attended = attn.o_proj(mx.concatenate(mixed, axis=0))
        h = layer.finish_attended(h, attended, layer.layer_scalar)
    return model.head(h) if head else h

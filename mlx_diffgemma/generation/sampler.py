"""The reference sampler's pieces in MLX, as plain functions on device arrays.

Each mirrors a piece of transformers' `generation_diffusion_gemma.py`: the linear
temperature schedule, entropy-bound acceptance, renoising, the stable-and-confident
stopping rule and EOS padding. Nothing here syncs with the host.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx


def token_entropy(logits: mx.array) -> mx.array:
    """Entropy of softmax(logits) over the last axis, in float32 (Categorical.entropy)."""
    return _entropy(logits.astype(mx.float32))


@mx.compile
def _entropy(logits: mx.array) -> mx.array:
    # Compiled so that exp(logp) * logp is one fused pass: one [canvas x vocab] float32
    # temporary instead of two at the step's memory peak (same ops, same results).
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(mx.exp(logp) * logp).sum(axis=-1)


def entropy_bound_accept(entropy: mx.array, entropy_bound: float) -> mx.array:
    """Accepts the k lowest-entropy positions with sum(H_1..k) - max(H_1..k) <= bound.

    Sorted ascending, the running maximum is the current entry, so the test is
    cumsum - sorted <= bound; the mask goes back to canvas order through the inverse
    permutation of the sort.
    """
    order = mx.argsort(entropy, axis=-1)
    sorted_h = mx.take_along_axis(entropy, order, axis=-1)
    selected = (mx.cumsum(sorted_h, axis=-1) - sorted_h) <= entropy_bound
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(selected, inverse, axis=-1)


def stable_and_confident(
    argmax_canvas: mx.array,
    history: Optional[mx.array],
    entropy: mx.array,
    stability_threshold: int,
    confidence_threshold: float,
    open: Optional[mx.array] = None,
) -> Tuple[mx.array, Optional[mx.array]]:
    """The reference's StableAndConfidentStoppingCriteria.

    Stable: the argmax canvas equals each of the last `stability_threshold` argmax
    canvases (the history starts filled with -1, so never on the first step unless the
    threshold is 0). Confident: mean entropy of the processed logits below the threshold;
    with `open` (bool, as `entropy`), the mean over the open positions only (fixed.py).
    Returns (stop [batch] bool, updated history).
    """
    if stability_threshold == 0:
        stable = mx.ones(argmax_canvas.shape[:1], dtype=mx.bool_)
    else:
        if history is None:
            history = mx.full((stability_threshold, *argmax_canvas.shape), -1, argmax_canvas.dtype)
        stable = (history == argmax_canvas[None]).all(axis=-1).all(axis=0)
        history = mx.concatenate([history[1:], argmax_canvas[None]], axis=0)
    if open is None:
        confident = entropy.mean(axis=-1) < confidence_threshold
    else:
        weight = open.astype(entropy.dtype)
        confident = (entropy * weight).sum(axis=-1) / weight.sum(axis=-1) < confidence_threshold
    return stable & confident, history

"""The reference sampler's step with fixed canvas positions, on torch.

transformers' sampler has no fixed positions, so `TorchDenoiser` runs this instead of
its `EntropyBoundSampler` / `StableAndConfidentStoppingCriteria` calls when a canvas
holds some; the operations are theirs (Categorical entropy, sort, cumsum, scatter, the
history roll), with fixed positions sorted last, shown and kept as themselves, and the
stop's mean entropy over the open positions, as `fixed_sampling.py` does on MLX."""

from __future__ import annotations

import numpy as np
import torch

from ..generation.fixed import LOGIT_FLOOR, CanvasFixed


class TorchFixed:
    """A canvas's fixed positions as tensors ([1, C] mask and tokens, EOS ban)."""

    def __init__(self, cf: CanvasFixed, length: int, device):
        self.host = cf
        self.mask = torch.as_tensor(cf.mask(length)[None], device=device)
        self.tokens = torch.as_tensor(cf.full_tokens(length)[None], dtype=torch.long, device=device)
        ban = cf.ban_mask(length)
        self.ban = torch.as_tensor(ban[None], device=device) if ban.any() else None
        self.eos = torch.as_tensor(np.array(cf.eos, dtype=np.int64), device=device)
        self.anchor = None  # an edit's renoise targets, -1: random

    def place(self, canvas: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, self.tokens, canvas)

    def start(self, canvas: torch.Tensor) -> torch.Tensor:
        """As fixed_sampling.DeviceFixed.start, on torch."""
        if self.host.start is None:
            return self.place(canvas)
        begun, anchor = self.host.begin(canvas[0].cpu().numpy())
        self.anchor = torch.as_tensor(anchor[None], device=canvas.device)
        return torch.as_tensor(begun[None], device=canvas.device)


def ban_eos(processed: torch.Tensor, f: TorchFixed) -> torch.Tensor:
    """`processed` with the EOS logits of the banned positions floored."""
    if f.ban is None:
        return processed
    processed = processed.clone()
    cols = processed[:, :, f.eos]
    processed[:, :, f.eos] = torch.where(f.ban[..., None], torch.full_like(cols, LOGIT_FLOOR), cols)
    return processed


def accept_open(entropy: torch.Tensor, f: TorchFixed, bound: float) -> torch.Tensor:
    """The entropy-bound acceptance (transformers' accept_canvas) over the open positions:
    fixed ones carry entropy inf, sort last and are never selected (inf - inf is NaN)."""
    h = torch.where(f.mask, torch.full_like(entropy, float("inf")), entropy)
    sorted_h, order = torch.sort(h, dim=-1, descending=False)
    selected = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    accepted = torch.scatter(input=torch.zeros_like(selected), dim=-1, index=order, src=selected)
    return accepted & ~f.mask


def stop_open(stopper, argmax: torch.Tensor, entropy: torch.Tensor, f: TorchFixed) -> torch.Tensor:
    """transformers' stable-and-confident stop (its history kept in `stopper`), confident
    on the open positions' mean entropy."""
    if stopper.stability_threshold == 0:
        stable = torch.ones(argmax.shape[:1], device=argmax.device, dtype=torch.bool)
    else:
        if stopper.argmax_canvas_history is None:
            stopper.argmax_canvas_history = torch.full(
                (stopper.stability_threshold, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
        history = stopper.argmax_canvas_history
        stable = (history == argmax[None]).all(dim=-1).all(dim=0)
        history = torch.roll(history, shifts=-1, dims=0)
        history[-1] = argmax
        stopper.argmax_canvas_history = history
    weight = (~f.mask).to(entropy.dtype)
    return stable & ((entropy * weight).sum(dim=-1) / weight.sum(dim=-1) < stopper.confidence_threshold)


def step_fixed(processed: torch.Tensor, sample: torch.Tensor, fresh: torch.Tensor, f: TorchFixed,
               bound: float, stopper):
    """(next canvas, argmax, accepted or fixed, stop) of one step from the banned processed
    logits, the categorical `sample` and the renoise ids `fresh`."""
    argmax = f.place(processed.argmax(dim=-1))
    if f.anchor is not None:
        fresh = torch.where(f.anchor >= 0, f.anchor, fresh)
    entropy = torch.distributions.Categorical(logits=processed).entropy()
    accepted = accept_open(entropy, f, bound)
    next_canvas = f.place(torch.where(accepted, sample, fresh))
    stop = stop_open(stopper, argmax, entropy, f)
    return next_canvas, argmax, accepted | f.mask, stop

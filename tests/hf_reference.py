"""Run the transformers reference with injected noise, and record what it does.

`hooked_generate(model, input_ids, noise, ...)` calls the REAL
`DiffusionGemmaForBlockDiffusion.generate` (transformers 5.23,
`generation_diffusion_gemma.py`) with its three sources of randomness replaced by a
noise source (see `mlx_diffgemma.generation.noise`):

* canvas init  (`torch.randint` in `EntropyBoundSampler.initialize_canvas`)
      -> `noise.init_canvas(canvas_index, (B, C), V)`
* renoise      (`torch.randint` reached from `EntropyBoundSampler.renoise_canvas`)
      -> `noise.renoise(canvas_index, step, (B, C), V)`
* denoiser draw (`torch.multinomial(softmax(processed_logits))` in `_denoising_step`)
      -> `argmax(processed_logits + noise.gumbel(canvas_index, step, (B, C, V)))`

`canvas_index` counts canvases from 0 (the first canvas after the prompt); `step` is the
reference's `cur_step`, counting DOWN from `max_denoising_steps` to 1 (the temperature at
step n is t_min + (t_max - t_min) * n / N).

The helpers `reference_decoder_logits` / `reference_encoder_cache` run single encoder /
decoder passes exactly the way `generate` does (same cache class, masks, position ids),
for layer-level parity tests and teacher-forced replays.

Everything returned is NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence
from unittest import mock

import numpy as np
import torch

# --------------------------------------------------------------------------- records


@dataclass
class StepRecord:
    """One denoising step of one canvas, as the reference ran it (batch-first arrays).

    `processed_logits`, `denoiser_canvas`, `accepted_mask` and `renoise_ids` are what the
    step computed for every row; `argmax_canvas`, `next_canvas` and the `sc_logits` of the
    following step are what `generate` carried on, where rows that had already finished
    denoising (`finished_before`) keep their previous values.
    """

    canvas_index: int
    step: int  # cur_step: N..1
    temperature: float  # t_min + (t_max - t_min) * step / N, as the reference computed it (float32)
    canvas_in: np.ndarray  # [B, C] int64: the decoder_input_ids fed in
    sc_logits_in: Optional[np.ndarray]  # [B, C, V] float32 or None (first step of a canvas)
    processed_logits: np.ndarray  # [B, C, V] float32: decoder logits / temperature
    denoiser_canvas: np.ndarray  # [B, C] int64: argmax(processed + gumbel)
    accepted_mask: np.ndarray  # [B, C] bool: entropy-bound acceptance
    renoise_ids: np.ndarray  # [B, C] int64: the fresh ids drawn for this step
    argmax_canvas: np.ndarray  # [B, C] int64: argmax canvas carried on (frozen for finished rows)
    next_canvas: np.ndarray  # [B, C] int64: canvas fed to the next step (frozen for finished rows)
    finished_before: np.ndarray  # [B] bool: rows that had stopped denoising before this step
    finished_after: np.ndarray  # [B] bool: rows stopped after this step
    stop_fired: np.ndarray  # [B] bool: the stable-and-confident criterion stopped the row HERE

    @property
    def raw_logits(self) -> np.ndarray:
        """The decoder's (soft-capped) logits, recovered as processed * temperature."""
        return self.processed_logits * np.float32(self.temperature)


@dataclass
class HookedResult:
    tokens: np.ndarray  # [B, new] int64: generated tokens only (EOS padding applied)
    sequences: np.ndarray  # [B, prompt + new] int64: what generate returned
    steps_per_canvas: list  # [n_canvases] ints: denoising-loop iterations each canvas ran
    row_steps: np.ndarray  # [n_canvases, B] ints: steps in which each row was still denoising
    tokens_per_forward: np.ndarray  # [B] float: generate's own metric
    init_canvases: list  # [n_canvases] of [B, C] int64: the noise's initial canvas per canvas
    trajectory: Optional[list] = None  # [StepRecord] in execution order, when record=True

    @property
    def n_canvases(self) -> int:
        return len(self.steps_per_canvas)

    def canvas_steps(self, canvas_index: int) -> list:
        """The StepRecords of one canvas, in order (steps N, N-1, ...)."""
        assert self.trajectory is not None, "run hooked_generate(..., record=True)"
        return [r for r in self.trajectory if r.canvas_index == canvas_index]

    def committed(self, canvas_index: int, canvas_length: int) -> np.ndarray:
        """The tokens committed for one canvas (after EOS padding)."""
        return self.tokens[:, canvas_index * canvas_length : (canvas_index + 1) * canvas_length]


def _np(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    if t is None:
        return None
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float()
    return t.numpy().copy()


def _as_ids(x, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.long()
    else:
        t = torch.as_tensor(np.asarray(x), dtype=torch.long)
    if t.ndim == 1:
        t = t[None]
    return t.to(device) if device is not None else t


def _as_float(x, device=None, dtype=torch.float32) -> Optional[torch.Tensor]:
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim == 2:
        t = t[None]
    return t.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- generate


def hooked_generate(model, input_ids, noise, record: bool = False, **gen_kwargs) -> HookedResult:
    """`model.generate(input_ids, **gen_kwargs)` with its randomness taken from `noise`.

    `gen_kwargs` go to `generate` unchanged (e.g. `max_new_tokens`, `max_denoising_steps`,
    `stability_threshold`, `confidence_threshold`, `eos_token_id=None` to disable EOS,
    `decoder_input_ids`, `self_conditioning_logits`), except `entropy_bound`, which
    `generate` only takes inside a `sampler_config`. With `record=True` the result
    carries the full per-step trajectory. Only the dynamic cache is supported (a static
    cache makes `generate` torch.compile the sampler, which these hooks cannot enter).
    """
    from transformers.generation import LogitsProcessorList
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSampler

    if gen_kwargs.get("cache_implementation") not in (None, "dynamic"):
        raise ValueError("hooked_generate supports the dynamic cache only")
    if "entropy_bound" in gen_kwargs:
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        gen_kwargs["sampler_config"] = EntropyBoundSamplerConfig(
            entropy_bound=float(gen_kwargs.pop("entropy_bound"))
        )

    input_ids = _as_ids(input_ids, device=model.device)
    prompt_len = input_ids.shape[1]
    real_multinomial = torch.multinomial

    st: dict[str, Any] = dict(
        canvas_index=-1,
        step=None,
        processed=None,
        last_processed=None,
        denoiser=None,
        renoise=None,
        steps=[],
        row_steps=[],
        init=[],
        trajectory=[] if record else None,
    )

    class NoiseSampler(EntropyBoundSampler):
        """The reference sampler with `torch.randint` replaced by the noise source."""

        def initialize_canvas(self, batch_size, device):
            # Called once per canvas by `_prepare_denoiser_inputs` (eagerly, even when
            # `decoder_input_ids` is passed and the result is discarded).
            ids = noise.init_canvas(st["canvas_index"], (batch_size, self.canvas_length), self.vocab_size)
            t = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=device)
            st["init"].append(_np(t))
            return t

        def renoise_canvas(self, accepted_canvas, cur_step):
            step = int(cur_step)
            assert step == st["step"], (step, st["step"])
            b = accepted_canvas.shape[0]
            ids = noise.renoise(st["canvas_index"], step, (b, self.canvas_length), self.vocab_size)
            rnd = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=accepted_canvas.device)
            st["renoise"] = rnd
            return torch.where(~self.accepted_token_mask, rnd, accepted_canvas)

    class RecordingProcessors(LogitsProcessorList):
        """The reference's logits processors; remembers the processed logits of the step."""

        def __call__(self, input_ids, scores, **kwargs):
            out = super().__call__(input_ids, scores, **kwargs)
            st["processed"] = out  # consumed by the denoiser draw
            st["last_processed"] = out  # kept for the record
            return out

    def fake_multinomial(probs, num_samples=1, replacement=False, *, generator=None, out=None):
        processed = st["processed"]
        if processed is None or probs.ndim != 2 or num_samples != 1:
            return real_multinomial(probs, num_samples, replacement, generator=generator)
        b, c, v = processed.shape
        if tuple(probs.shape) != (b * c, v):
            return real_multinomial(probs, num_samples, replacement, generator=generator)
        g = noise.gumbel(st["canvas_index"], st["step"], (b, c, v))
        g = torch.as_tensor(np.asarray(g, dtype=np.float32), device=processed.device)
        draw = torch.argmax(processed.float() + g, dim=-1)  # [B, C]
        st["denoiser"] = draw
        st["processed"] = None  # one draw per step
        return draw.reshape(b * c, 1)

    orig_prepare_sampler = model._prepare_sampler
    orig_prepare_lp = model._prepare_logits_processor
    orig_prepare_denoiser = model._prepare_denoiser_inputs
    orig_step = model._denoising_step

    def prepare_sampler(generation_config):
        sampler = orig_prepare_sampler(generation_config)
        if type(sampler) is not EntropyBoundSampler:
            raise TypeError(f"unexpected sampler {type(sampler)}")
        sampler.__class__ = NoiseSampler
        return sampler

    def prepare_logits_processor(generation_config, logits_processor=None):
        return RecordingProcessors(orig_prepare_lp(generation_config, logits_processor))

    def prepare_denoiser_inputs(*args, **kwargs):
        st["canvas_index"] += 1
        st["steps"].append(0)
        st["row_steps"].append(None)
        return orig_prepare_denoiser(*args, **kwargs)

    def denoising_step(*args, **kwargs):
        assert not args, "the reference calls _denoising_step with keywords only"
        step = int(kwargs["cur_step"])
        st["step"] = step
        k = st["canvas_index"]
        finished_in = kwargs["finished_denoising"]
        finished_before = _np(finished_in)  # copy: the reference updates it in place
        if record:
            canvas_in = _np(kwargs["current_canvas"])
            sc_in = _np(kwargs["self_conditioning_logits"])
        new_canvas, new_argmax, sc_out, finished_after = orig_step(*args, **kwargs)
        st["steps"][k] += 1
        active = (~finished_before).astype(np.int64)
        st["row_steps"][k] = active if st["row_steps"][k] is None else st["row_steps"][k] + active
        if record:
            sampler = kwargs["sampler"]
            lp = kwargs["logits_processor"]
            temp = _temperature(lp, step)
            fin_after = _np(finished_after)
            st["trajectory"].append(
                StepRecord(
                    canvas_index=k,
                    step=step,
                    temperature=temp,
                    canvas_in=canvas_in,
                    sc_logits_in=sc_in,
                    processed_logits=_np(st["last_processed"]),
                    denoiser_canvas=_np(st["denoiser"]),
                    accepted_mask=_np(sampler.accepted_token_mask).astype(bool),
                    renoise_ids=_np(st["renoise"]),
                    argmax_canvas=_np(new_argmax),
                    next_canvas=_np(new_canvas),
                    finished_before=finished_before.astype(bool),
                    finished_after=fin_after.astype(bool),
                    stop_fired=fin_after.astype(bool) & ~finished_before.astype(bool),
                )
            )
        return new_canvas, new_argmax, sc_out, finished_after

    patches = [
        mock.patch.object(model, "_prepare_sampler", prepare_sampler),
        mock.patch.object(model, "_prepare_logits_processor", prepare_logits_processor),
        mock.patch.object(model, "_prepare_denoiser_inputs", prepare_denoiser_inputs),
        mock.patch.object(model, "_denoising_step", denoising_step),
        mock.patch("torch.multinomial", fake_multinomial),
    ]
    for p in patches:
        p.start()
    try:
        out = model.generate(input_ids, **gen_kwargs)
    finally:
        for p in reversed(patches):
            p.stop()

    sequences = out.sequences if hasattr(out, "sequences") else out
    tpf = getattr(out, "tokens_per_forward", None)
    n_canvases = len(st["steps"])
    b = input_ids.shape[0]
    row_steps = np.array(
        [r if r is not None else np.zeros(b, np.int64) for r in st["row_steps"]], dtype=np.int64
    ).reshape(n_canvases, b)
    return HookedResult(
        tokens=_np(sequences[:, prompt_len:]),
        sequences=_np(sequences),
        steps_per_canvas=list(st["steps"]),
        row_steps=row_steps,
        tokens_per_forward=_np(tpf) if isinstance(tpf, torch.Tensor) else np.asarray(tpf),
        init_canvases=list(st["init"]),
        trajectory=st["trajectory"],
    )


def _temperature(logits_processor, step: int) -> float:
    """The temperature the reference's LinearTemperatureScheduleLogitsProcessor used at
    `step`, computed the same way (a float32 tensor op on an int32 `cur_step`)."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import LinearTemperatureScheduleLogitsProcessor

    temp = 1.0
    for p in logits_processor:
        if isinstance(p, LinearTemperatureScheduleLogitsProcessor):
            cur = torch.tensor(step, dtype=torch.int32)
            t = p.t_min + ((p.t_max - p.t_min) * (cur / p.max_denoising_steps))
            temp = float(t)
    return temp


# ------------------------------------------------------------------ single passes


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config(decoder=True))


def image_kwargs(model, ids, pixel_values, image_position_ids) -> dict:
    """What `generate` (and the encoder) take beside a prompt holding images, as the
    Gemma-4 processor returns it: its pixel_values and image_position_ids, and
    mm_token_type_ids (1 at each image token, 0 elsewhere), as tensors."""
    ids = _as_ids(ids, model.device)
    return dict(
        pixel_values=torch.as_tensor(np.asarray(pixel_values), device=model.device),
        image_position_ids=torch.as_tensor(np.asarray(image_position_ids), device=model.device),
        mm_token_type_ids=(ids == model.config.image_token_id).long(),
    )


@torch.no_grad()
def _encode(model, cache, ids: torch.Tensor, seen: int, images: Optional[dict] = None) -> int:
    """Encode `ids` after `seen` cached tokens, exactly as `generate` does (`images`:
    `image_kwargs` of a prompt holding images); return the new number of seen tokens."""
    b, t = ids.shape
    images = images or {}
    pos = torch.arange(seen, seen + t, dtype=torch.int32, device=ids.device).unsqueeze(0)
    attention_mask = torch.ones((b, seen + t), dtype=torch.bool, device=ids.device)
    dummy = torch.empty((b, t, 0), dtype=model.dtype, device=ids.device)
    mask_mapping = model.model.encoder.create_masks_for_generate(
        config=model.config,
        inputs_embeds=dummy,
        attention_mask=attention_mask,
        past_key_values=cache,
        position_ids=pos,
        mm_token_type_ids=images.get("mm_token_type_ids"),
    )
    model.model.encoder(
        input_ids=ids.clone(memory_format=torch.contiguous_format),
        attention_mask=mask_mapping,
        past_key_values=cache,
        position_ids=pos,
        **images,
    )
    return seen + t


@torch.no_grad()
def encode_context(model, prompt_ids, prefix_canvases: Sequence = (), images: Optional[dict] = None):
    """A DynamicCache holding the prompt (with its `images`, see `image_kwargs`), then
    each prefix canvas, encoded one chunk at a time as `generate` does. Returns (cache,
    number of tokens seen)."""
    device = model.device
    cache = _new_cache(model)
    seen = _encode(model, cache, _as_ids(prompt_ids, device), 0, images)
    for canvas in prefix_canvases:
        seen = _encode(model, cache, _as_ids(canvas, device), seen)
    return cache, seen


@torch.no_grad()
def reference_decoder_logits(
    model, prompt_ids, canvas_ids, sc_logits=None, prefix_canvases: Sequence = (),
    images: Optional[dict] = None,
) -> np.ndarray:
    """The reference decoder's logits for `canvas_ids` [B, C] (float32 numpy [B, C, V]).

    The prompt, then each of `prefix_canvases`, is encoded into a fresh DynamicCache (one
    encoder call each, as in `generate`); the decoder then runs on the canvas at positions
    continuing after them, with optional self-conditioning logits `sc_logits` [B, C, V]
    (the previous step's processed logits; None on a canvas's first step). `images`: the
    prompt's (`image_kwargs`).
    """
    device = model.device
    cache, seen = encode_context(model, prompt_ids, prefix_canvases, images)
    canvas = _as_ids(canvas_ids, device)
    b, c = canvas.shape
    emb_dtype = model.model.decoder.embed_tokens.weight.dtype
    sc = _as_float(sc_logits, device=device, dtype=emb_dtype)
    decoder_attention_mask = torch.ones((b, seen + c), dtype=torch.bool, device=device)
    mask_mapping = model.model.decoder.create_diffusion_decoder_attention_mask(
        config=model.config,
        inputs_embeds=canvas.unsqueeze(-1),
        past_key_values=cache,
        decoder_attention_mask=decoder_attention_mask,
    )
    pos = torch.arange(seen, seen + c, dtype=torch.int32, device=device).unsqueeze(0)
    out = model(
        decoder_input_ids=canvas,
        self_conditioning_logits=sc,
        decoder_attention_mask=mask_mapping,
        past_key_values=cache,
        decoder_position_ids=pos,
    )
    return _np(out.logits.float())


@torch.no_grad()
def reference_encoder_cache(model, ids, chunks: Optional[Sequence[int]] = None,
                            images: Optional[dict] = None) -> list:
    """Per-layer (keys, values) numpy arrays [B, kv_heads, T_kept, head_dim] from the
    DynamicCache after encoding `ids` [B, T].

    `chunks` (sizes summing to T) encodes in several calls, like a prompt followed by
    canvases. Sliding layers keep only their last `sliding_window - 1` tokens; full
    layers keep everything. Keys are after k_norm and RoPE; values after v_norm.
    `images` (`image_kwargs`) go with the first chunk, which must hold all image tokens.
    """
    ids = _as_ids(ids, model.device)
    t = ids.shape[1]
    chunks = list(chunks) if chunks else [t]
    assert sum(chunks) == t, (chunks, t)
    cache = _new_cache(model)
    seen = 0
    for i, n in enumerate(chunks):
        seen = _encode(model, cache, ids[:, seen : seen + n], seen, images if i == 0 else None)
    return [(_np(layer.keys), _np(layer.values)) for layer in cache.layers]

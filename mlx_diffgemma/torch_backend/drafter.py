"""The drafter's per-step work on torch, around transformers' DiffusionGemmaForBlockDiffusion.

Imports torch and transformers only (no MLX): the reference path runs on a CUDA machine
without MLX installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from ..generation.events import Event
from ..generation.fixed import CanvasFixed
from ..generation.loop import collect, stream
from ..generation.noise import NoiseSource
from ..generation.prompt import prepare_prompt
from ..generation.settings import Settings, defaults, resolve
from ..models.checkpoint import WeightsError, check_tokenizer_files
from ..models.config import GenerationConfig, ModelArgs, load_config
from ..models.paths import resolve_model_path
from .fixed import TorchFixed, ban_eos, step_fixed


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(path_or_repo: Union[str, Path], device: Optional[str] = None, dtype=None):
    """(transformers model in eval mode, transformers tokenizer or None). Weights come
    from safetensors only: pickled `.bin` checkpoints can run code when loaded."""
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    path = resolve_model_path(path_or_repo)
    # The same checks as the MLX path, so a malformed file is one line naming it.
    cfg = load_config(path)
    ModelArgs.from_dict(cfg, source=str(path / "config.json"))
    generation_defaults = GenerationConfig.from_model_dir(path)
    if "quantization" in cfg:
        raise ValueError(
            f"{path} is an MLX quantized conversion; the torch backend loads Hugging Face "
            "checkpoints (pass the original model directory or hub id)"
        )
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin"))
        raise WeightsError(
            f"no .safetensors weights in {path}"
            + (f" (only {', '.join(found)}: pickled weights are not loaded)" if found else "")
            + "; use a checkpoint saved as safetensors"
        )
    device = device or _default_device()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        path, dtype=dtype or "auto", use_safetensors=True
    )
    model = model.to(device).eval()
    model.model_path = path
    model.generation_defaults = generation_defaults  # read once, at load
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        check_tokenizer_files(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


class _NoiseSampler(EntropyBoundSampler):
    """transformers' entropy-bound sampler (acceptance and renoising as the reference
    runs them) whose fresh ids come from the drafter's noise source or generator."""

    def __init__(self, gen: GenerationConfig, canvas_length: int, vocab_size: int, fresh_ids):
        super().__init__(EntropyBoundSamplerConfig(entropy_bound=float(gen.entropy_bound)),
                         canvas_length, vocab_size, gen.max_denoising_steps)
        self.fresh_ids = fresh_ids  # (batch, device) -> [batch, canvas] ids for this step

    def initialize_canvas(self, batch_size: int, device) -> torch.LongTensor:
        return self.fresh_ids(batch_size, device)


class TorchDenoiser:
    """transformers' network with a DynamicCache, stepped with transformers' own sampler
    pieces: the linear temperature schedule, the entropy-bound sampler and the
    stable-and-confident stop.

    With `noise`, the categorical draw is the Gumbel-max argmax(processed + g) and the
    canvas init / renoise ids come from the noise source; otherwise torch's own
    `randint` and `multinomial` are used (with `generator`), as the reference does.
    """

    def __init__(
        self,
        model,
        gen: GenerationConfig,
        cache=None,
        noise: Optional[NoiseSource] = None,
        generator: Optional[torch.Generator] = None,
    ):
        from transformers.cache_utils import DynamicCache

        self.model = model
        self.gen = gen
        self.noise = noise
        self.generator = generator
        self.device = next(model.parameters()).device
        self.cache = cache if cache is not None else DynamicCache(config=model.config.get_text_config(decoder=True))
        self.canvas_length = int(model.config.canvas_length)
        self.vocab_size = int(model.config.text_config.vocab_size)
        self.max_context = int(model.config.get_text_config().max_position_embeddings)
        self._embed_dtype = model.model.decoder.embed_tokens.weight.dtype
        self._temperature = LinearTemperatureScheduleLogitsProcessor(
            gen.t_min, gen.t_max, gen.max_denoising_steps)
        self._sampler = _NoiseSampler(gen, self.canvas_length, self.vocab_size, self._renoise_ids)
        self._stop = StableAndConfidentStoppingCriteria(gen.stability_threshold, gen.confidence_threshold)
        self._sc_logits = None
        self.images = None  # images.ImageInputs of the prompt: the next encode takes them
        self._where = (0, 0)  # (canvas, step) of the step being taken, for the noise source
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def cached_tokens(self) -> int:
        return int(self.cache.get_seq_length()) if len(self.cache.layers) else 0

    @property
    def _history(self):
        """The stop rule's argmax history (None at a canvas's first step)."""
        return self._stop.argmax_canvas_history

    @_history.setter
    def _history(self, value) -> None:
        self._stop.argmax_canvas_history = value

    def _ids(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=torch.long, device=self.device)

    def _random_ids(self, shape) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, shape, device=self.device, generator=self.generator)

    def _renoise_ids(self, batch: int, device) -> torch.Tensor:
        shape = (batch, self.canvas_length)
        if self.noise is None:
            return self._random_ids(shape)
        canvas_index, step = self._where
        return self._ids(self.noise.renoise(canvas_index, step, shape, self.vocab_size))

    @torch.no_grad()
    def encode(self, token_ids: Sequence[int]) -> None:
        ids = self._ids(np.asarray(token_ids).reshape(1, -1))
        images, self.images = self.images, None
        self.model.model.encoder(input_ids=ids, past_key_values=self.cache,
                                 **torch_image_kwargs(self.model, ids, images))

    _fixed: Optional[TorchFixed] = None  # this canvas's fixed positions (fixed.py)

    def start_canvas(self, canvas_index: int, fixed: Optional[CanvasFixed] = None) -> torch.Tensor:
        self._sc_logits = None
        self._stop.reset()
        shape = (1, self.canvas_length)
        if self.noise is not None:
            canvas = self._ids(self.noise.init_canvas(canvas_index, shape, self.vocab_size))
        else:
            canvas = self._random_ids(shape)
        self._fixed = None if fixed is None else TorchFixed(fixed, self.canvas_length, self.device)
        return canvas if fixed is None else self._fixed.start(canvas)

    @torch.no_grad()
    def step(self, canvas: torch.Tensor, canvas_index: int, step: int):
        logits = self.model(
            decoder_input_ids=canvas,
            past_key_values=self.cache,
            self_conditioning_logits=self._sc_logits,
        ).logits
        # The step as an int32 tensor, as generate() passes it: the schedule then runs in
        # float32 op by op, and the processed logits are generate()'s to the bit.
        cur_step = torch.tensor(step, dtype=torch.int32, device=self.device)
        processed = self._temperature(canvas, logits, cur_step=cur_step)
        if self._fixed is not None:
            processed = ban_eos(processed, self._fixed)
        B, C, V = processed.shape
        if self.noise is not None:
            g = torch.as_tensor(self.noise.gumbel(canvas_index, step, (B, C, V)), device=self.device)
            sample = (processed + g).argmax(dim=-1)
        else:
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
            sample = torch.multinomial(probs.view(-1, V), 1, generator=self.generator).view(B, C)
        self._where = (canvas_index, step)
        if self._fixed is not None:
            fresh = self._renoise_ids(B, self.device)
            next_canvas, argmax, accepted, stop = step_fixed(
                processed, sample, fresh, self._fixed, float(self.gen.entropy_bound), self._stop)
            self._sc_logits = processed.to(self._embed_dtype)
            return next_canvas, argmax[0], accepted[0], bool(stop.all())
        argmax = processed.argmax(dim=-1)
        accepted_canvas = self._sampler.accept_canvas(canvas, sample, processed, cur_step)
        next_canvas = self._sampler.renoise_canvas(accepted_canvas, cur_step)
        stop = bool(self._stop(argmax, processed).all())
        self._sc_logits = processed.to(self._embed_dtype)
        return next_canvas, argmax[0], self._sampler.accepted_token_mask[0], stop

    @torch.no_grad()
    def score(self, canvas: Sequence[int], positions: Sequence[int]) -> list:
        """As `MLXDenoiser.score`: the canvas's own tokens' log-probabilities at `positions`."""
        ids = self._ids(np.asarray(canvas).reshape(1, -1))
        logits = self.model(decoder_input_ids=ids, past_key_values=self.cache,
                            self_conditioning_logits=None).logits[0].float()
        idx = self._ids(np.asarray(positions))
        logp = torch.log_softmax(logits[idx], dim=-1)
        return logp.gather(-1, ids[0][idx][:, None])[:, 0].tolist()

    def to_list(self, row: torch.Tensor) -> list:
        return row.tolist()

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return 0.0


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int], Sequence[dict]],
    *,
    images: Optional[Sequence] = None,
    cache=None,
    noise: Optional[NoiseSource] = None,
    seed: Optional[int] = None,
    chat: bool = False,
    fixed: Optional[Mapping[int, int]] = None,
    **generation_kwargs,
) -> Iterator[Event]:
    """As `mlx_diffgemma.stream_generate`, on torch (images through transformers' tower;
    `fixed`: positions held at given tokens, generation/fixed.py)."""
    settings = resolve(defaults(model), backend="torch", seed=seed, **generation_kwargs)
    yield from run(model, tokenizer, prompt, settings, images=images, cache=cache, noise=noise, chat=chat,
                   fixed=fixed)


def run(model, tokenizer, prompt, settings: Settings, *, images=None, cache=None,
        noise: Optional[NoiseSource] = None, chat: bool = False,
        fixed: Optional[Mapping[int, int]] = None) -> Iterator[Event]:
    """`stream_generate` with its settings resolved: what the chat backend calls."""
    prompt, image_inputs = prepare_prompt(model, tokenizer, prompt, images, chat=chat)
    denoiser = seeded_denoiser(model, settings, cache=cache, noise=noise)
    denoiser.images = image_inputs
    yield from stream(denoiser, tokenizer, prompt, fixed=fixed)


def seeded_denoiser(model, settings: Settings, *, cache=None, noise: Optional[NoiseSource] = None) -> TorchDenoiser:
    """The torch denoiser of `settings`, its own generator seeded with `settings.seed`."""
    generator = None
    if settings.seed is not None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    return TorchDenoiser(model, settings.gen, cache=cache, noise=noise, generator=generator)


def generate(model, tokenizer, prompt, *, verbose: bool = False, **kwargs) -> str:
    return collect(stream_generate(model, tokenizer, prompt, **kwargs), verbose)


def torch_image_kwargs(model, ids, images) -> Dict[str, Any]:
    """transformers' encoder arguments for `images` (ImageInputs) inside `ids`: the
    arrays, and the token types that give each image its bidirectional block."""
    if images is None:
        return {}
    dev = ids.device
    return {"pixel_values": torch.as_tensor(images.pixel_values, device=dev),
            "image_position_ids": torch.as_tensor(images.image_position_ids, device=dev),
            "mm_token_type_ids": (ids == model.config.image_token_id).long()}

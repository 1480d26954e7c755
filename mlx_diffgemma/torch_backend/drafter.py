"""The drafter's per-step work on torch, around transformers' DiffusionGemmaForBlockDiffusion."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..config import GenerationConfig, ModelArgs, check_seed, load_config
from ..drafter import Event, _prompt_ids, draft, run_to_summary, text_decoder
from ..loader import WeightsError, check_tokenizer_files, resolve_model_path
from ..noise import NoiseSource


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
    GenerationConfig.from_model_dir(path)
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
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        check_tokenizer_files(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


class TorchDenoiser:
    """transformers' network with a DynamicCache; sampling as in the reference generate().

    With `noise`, the categorical draw is the Gumbel-max argmax(processed + g) and the
    canvas init / renoise ids come from the noise source; otherwise torch's own
    `randint` and `multinomial` are used, as the reference does.
    """

    def __init__(
        self,
        model,
        gen: GenerationConfig,
        cache=None,
        noise: Optional[NoiseSource] = None,
        batch_size: int = 1,
        generator: Optional[torch.Generator] = None,
    ):
        from transformers.cache_utils import DynamicCache

        self.model = model
        self.gen = gen
        self.noise = noise
        self.batch_size = batch_size
        self.generator = generator
        self.device = next(model.parameters()).device
        self.cache = cache or DynamicCache(config=model.config.get_text_config(decoder=True))
        self.canvas_length = model.config.canvas_length
        self.vocab_size = model.config.text_config.vocab_size
        self._embed_dtype = model.model.decoder.embed_tokens.weight.dtype
        self._sc_logits = None
        self._history = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _ids(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=torch.long, device=self.device)

    def _random_ids(self, shape) -> torch.Tensor:
        return torch.randint(
            0, self.vocab_size, shape, device=self.device, generator=self.generator
        )

    @torch.no_grad()
    def encode(self, token_ids: Sequence[int]) -> None:
        ids = self._ids(np.asarray(token_ids).reshape(self.batch_size, -1))
        self.model.model.encoder(input_ids=ids, past_key_values=self.cache)

    def start_canvas(self, canvas_index: int) -> torch.Tensor:
        self._sc_logits = None
        self._history = None
        shape = (self.batch_size, self.canvas_length)
        if self.noise is not None:
            return self._ids(self.noise.init_canvas(canvas_index, shape, self.vocab_size))
        return self._random_ids(shape)

    @torch.no_grad()
    def step(self, canvas: torch.Tensor, canvas_index: int, step: int):
        gen = self.gen
        logits = self.model(
            decoder_input_ids=canvas,
            past_key_values=self.cache,
            self_conditioning_logits=self._sc_logits,
        ).logits
        temperature = torch.tensor(gen.temperature(step), dtype=torch.float32, device=self.device)
        processed = logits / temperature
        argmax = processed.argmax(dim=-1)
        B, C, V = processed.shape
        if self.noise is not None:
            g = torch.as_tensor(self.noise.gumbel(canvas_index, step, (B, C, V)), device=self.device)
            sample = (processed + g).argmax(dim=-1)
            fresh = self._ids(self.noise.renoise(canvas_index, step, (B, C), V))
        else:
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
            sample = torch.multinomial(probs.view(-1, V), 1, generator=self.generator).view(B, C)
            fresh = self._random_ids((B, C))

        entropy = torch.distributions.Categorical(logits=processed).entropy()
        sorted_h, order = torch.sort(entropy, dim=-1)
        selected = (torch.cumsum(sorted_h, dim=-1) - sorted_h) <= gen.entropy_bound
        accepted = torch.zeros_like(selected).scatter(-1, order, selected)
        next_canvas = torch.where(accepted, sample, fresh)

        if gen.stability_threshold == 0:
            stable = torch.ones(B, dtype=torch.bool, device=self.device)
        else:
            if self._history is None:
                self._history = torch.full(
                    (gen.stability_threshold, B, C), -1, dtype=argmax.dtype, device=self.device
                )
            stable = (self._history == argmax[None]).all(dim=-1).all(dim=0)
            self._history = torch.cat([self._history[1:], argmax[None]], dim=0)
        confident = entropy.mean(dim=-1) < gen.confidence_threshold
        stop = bool((stable & confident).all())

        self._sc_logits = processed.to(self._embed_dtype)
        return next_canvas, argmax[0], accepted[0], stop

    def to_list(self, row: torch.Tensor) -> list:
        return row.tolist()

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return 0.0


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    *,
    cache=None,
    noise: Optional[NoiseSource] = None,
    seed: Optional[int] = None,
    **generation_kwargs,
) -> Iterator[Event]:
    """As `mlx_diffgemma.stream_generate`, on torch."""
    gen = GenerationConfig.from_model_dir(getattr(model, "model_path", None), **generation_kwargs)
    ids = _prompt_ids(tokenizer, prompt)
    generator = None
    if check_seed(seed) is not None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
    denoiser = TorchDenoiser(model, gen, cache=cache, noise=noise, generator=generator)
    yield from draft(denoiser, ids, gen, text_decoder(tokenizer))


def generate(model, tokenizer, prompt, **kwargs) -> str:
    return run_to_summary(stream_generate(model, tokenizer, prompt, **kwargs)).text

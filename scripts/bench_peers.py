"""The peers `scripts/bench.py` runs beside our implementation on one checkpoint, each
a runner with the operations of `mlx_diffgemma.bench.DenoiserRunner` (so `measure`
times all of them the same way) plus `decoder_logits` for the same-function check.

* `MLXVLMRunner`: mlx-vlm 0.7.10's `diffusion_gemma` model built from the same arrays
  (shared, not copied). Its `stream_diffusion_generate` does run the reference
  algorithm when asked: `diffusion_sampler="entropy-bound"`, `temperature=1.0` (the
  categorical draw from softmax(processed logits)), `diffusion_full_canvas=True`, the
  linear temperature schedule and stable-and-confident stop from the generation
  config. Its step is not a public function, so `step` runs the body of that loop for
  the entropy-bound sampler with mlx-vlm's own (private) functions, in its order (see
  `MLXVLMRunner.step`); `generate` calls `stream_diffusion_generate` itself.
* `TorchRunner`: transformers' `DiffusionGemmaForBlockDiffusion` in float32 with the
  checkpoint's weights dequantized, driven by our `TorchDenoiser` (whose `step` is
  transformers' network plus the reference sampler, as `generate()` has it).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffgemma.bench.bench import DenoiserRunner
from mlx_diffgemma.bench.synthetic import quantization_of
from mlx_diffgemma.models.config import GenerationConfig

# -- mlx-vlm -------------------------------------------------------------------------


def mlx_vlm_config(config: Dict[str, Any], gen: Optional[GenerationConfig] = None):
    """mlx-vlm's ModelConfig for `config` (an HF config.json dict), text only."""
    from mlx_vlm.models.diffusion_gemma import ModelConfig

    cfg = dict(config)
    cfg.pop("vision_config", None)  # text only, as ours
    if gen is not None:
        cfg["generation_config"] = mlx_vlm_generation_config(gen)
    return ModelConfig.from_dict(cfg)


def mlx_vlm_special_ids(config: Dict[str, Any]) -> set:
    """The token ids mlx-vlm's config gives a meaning (its image/video placeholders, which
    it replaces before the network sees them, and pad/BOS/EOS): a fair prompt avoids them."""
    cfg = mlx_vlm_config(config)
    ids = set()
    for section in (cfg, getattr(cfg, "text_config", None)):
        fields = section if isinstance(section, dict) else getattr(section, "__dict__", {})
        for k, v in fields.items():
            if k.endswith("_token_id"):
                ids |= set(v) if isinstance(v, list) else {v}
    return {i for i in ids if isinstance(i, int)}


def build_mlx_vlm_model(model, config: Dict[str, Any], gen: GenerationConfig):
    """mlx-vlm's diffusion_gemma `Model` for `config` (an HF config.json dict), quantized
    module by module as `model` is and holding `model`'s arrays (no copy)."""
    from mlx_vlm.models.diffusion_gemma import Model as VLMModel

    vm = VLMModel(mlx_vlm_config(config, gen))
    q = quantization_of(model)
    if q:
        nn.quantize(vm, class_predicate=lambda path, m: q.get(path, False))
    vm.load_weights(list(tree_flatten(model.parameters())), strict=True)
    vm.eval()
    return vm


def mlx_vlm_generation_config(gen: GenerationConfig) -> Dict[str, Any]:
    return {
        "max_denoising_steps": gen.max_denoising_steps,
        "max_new_tokens": gen.max_new_tokens,
        "sampler_config": {"entropy_bound": gen.entropy_bound},
        "t_min": gen.t_min,
        "t_max": gen.t_max,
        "stability_threshold": gen.stability_threshold,
        "confidence_threshold": gen.confidence_threshold,
    }


class _Detokenizer:
    """The streaming-detokenizer surface mlx-vlm's loop touches; token ids only."""

    last_segment = ""

    def reset(self):
        pass

    def add_token(self, token, skip_special_token_ids=None):
        pass

    def finalize(self):
        pass


class _Tokenizer:
    """A stand-in tokenizer for synthetic checkpoints: mlx-vlm's generation loop needs a
    detokenizer and a stopping criterion (EOS off, as for the others)."""

    def __init__(self):
        self.detokenizer = _Detokenizer()

    @staticmethod
    def stopping_criteria(token) -> bool:
        return False

    def decode(self, ids, **kw) -> str:
        return ""


class MLXVLMRunner:
    name = "mlx-vlm 0.7.10"

    def __init__(self, vlm_model, gen: GenerationConfig, seed: int = 0):
        import importlib

        # `mlx_vlm.generate` the attribute is a function; import the module by name.
        self.d = importlib.import_module("mlx_vlm.generate.diffusion")
        self.model = vlm_model
        self.gen = gen
        self.seed = seed
        self.cache = None

    def _prefill(self, ids: np.ndarray):
        cache = self.model.diffusion_prefill_cache(
            mx.array(ids), attention_mask=None, cache=self.model.make_cache(),
            pixel_values=None, mm_token_type_ids=None, prefill_step_size=None,
            chunk_prefill=False,
        )
        mx.eval([c.state for c in cache])
        return cache

    def prefill(self, ids: np.ndarray) -> None:
        self._prefill(ids)

    def set_context(self, ids: np.ndarray) -> None:
        mx.random.seed(self.seed)
        self.cache = self._prefill(ids)
        self.masks = None
        self.sc_context = self.model.diffusion_prepare_self_conditioning()

    def start(self):
        d, C = self.d, int(self.model.config.canvas_length)
        V = int(self.model.config.text_config.vocab_size)
        canvas = d._diffusion_initialize_canvas(1, C, V, mx.int32)
        self.masks = self.model.diffusion_decoder_masks(canvas, self.cache, None)
        self.self_conditioning = None
        self.history: List[mx.array] = []
        return canvas

    def step(self, canvas, n: int):
        """One pass of the body of `stream_diffusion_generate`'s step loop with
        diffusion_sampler="entropy-bound", temperature=1.0, diffusion_full_canvas=True
        and no visualisation, using mlx-vlm's functions in its order: decoder logits
        (self-conditioned from the previous step), / schedule temperature, argmax,
        categorical sample at temperature 1, token entropy, next self-conditioning
        input, entropy-bound acceptance mask, accepted canvas, renoise, the
        stable-and-confident check (host syncs, as in mlx-vlm). Its loop breaks before
        the sampler at the last step (n == 1); here every step does the full work."""
        d, m, gen = self.d, self.model, self.gen
        logits = m.diffusion_decoder_logits(
            canvas, cache=self.cache, self_conditioning=self.self_conditioning,
            decoder_attention_mask=self.masks,
        )
        t = d._diffusion_linear_temperature(
            n, gen.max_denoising_steps, {"t_min": gen.t_min, "t_max": gen.t_max}
        )
        processed = logits / t
        argmax = mx.argmax(processed, axis=-1).astype(mx.int32)
        sample = d._diffusion_sample_canvas(processed, mx.int32, 1.0)
        entropy = d._diffusion_token_entropy(processed)
        next_sc = m.diffusion_self_conditioning(processed, self.sc_context)
        accept = d._diffusion_entropy_transfer_mask(entropy, gen.entropy_bound)
        accepted = mx.where(accept, sample, canvas)
        C, V = canvas.shape[1], int(m.config.text_config.vocab_size)
        canvas = mx.where(accept, accepted, d._diffusion_initialize_canvas(1, C, V, mx.int32))
        d._diffusion_stable_and_confident(
            argmax, processed, self.history,
            {"stability_threshold": gen.stability_threshold,
             "confidence_threshold": gen.confidence_threshold},
        )
        self.self_conditioning = next_sc
        mx.eval(canvas, next_sc, argmax, accept)
        return canvas

    def generate(self, ids: np.ndarray, max_new_tokens: int, steps: int) -> Dict[str, Any]:
        mx.random.seed(self.seed)
        tok = _Tokenizer()
        n = 0
        canvases = 0
        for r in self.d.stream_diffusion_generate(
            self.model, tok, tok, mx.array(ids), None, None,
            max_tokens=max_new_tokens, skip_special_token_ids=[], temperature=1.0,
            max_denoising_steps=steps, diffusion_full_canvas=True,
            diffusion_sampler="entropy-bound",
        ):
            if r.diffusion_block_complete:
                canvases += 1
            n = r.generation_tokens
            steps_done = r.diffusion_denoising_steps
        return {"tokens": n, "steps_per_canvas": [steps_done / max(canvases, 1)] * canvases}

    def decoder_logits(self, ids: np.ndarray, canvas: np.ndarray) -> np.ndarray:
        cache = self._prefill(ids)
        masks = self.model.diffusion_decoder_masks(mx.array(canvas), cache, None)
        out = self.model.diffusion_decoder_logits(
            mx.array(canvas), cache=cache, self_conditioning=None, decoder_attention_mask=masks
        )
        return np.array(out)

    def reset_peak(self) -> None:
        mx.clear_cache()
        mx.reset_peak_memory()

    def peak_gb(self) -> Optional[float]:
        return mx.get_peak_memory() / 1e9


# -- transformers (torch) ------------------------------------------------------------

# The smallest Gemma-4 vision tower transformers accepts: it cannot build the model
# without one, and the text path never runs it.
_TINY_VISION = dict(
    model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4,
    position_embedding_size=16,
)


def torch_float_bytes(model) -> int:
    """float32 bytes transformers would need for `model`'s weights."""
    q = quantization_of(model)
    n = 0
    for key, v in tree_flatten(model.parameters()):
        path, name = key.rsplit(".", 1)
        if path in q:
            if name == "weight":
                n += v.size * 32 // q[path]["bits"]
        else:
            n += v.size
    return 4 * n


def dequantized_weights(model: nn.Module, dtype=mx.float32) -> Dict[str, mx.array]:
    """The model's parameters with every quantized matrix dequantized (name without the
    `.scales`/`.biases` siblings): the float checkpoint the quantized one stands for, for
    the torch path. Only for small shapes: this materialises float weights."""
    q = quantization_of(model)
    params = dict(tree_flatten(model.parameters()))
    out = {}
    for key, v in params.items():
        path, name = key.rsplit(".", 1)
        if path in q:
            if name != "weight":
                continue
            w = mx.dequantize(
                v, params[f"{path}.scales"], params[f"{path}.biases"],
                group_size=q[path]["group_size"], bits=q[path]["bits"],
            )
            out[key] = w.astype(dtype)
        else:
            out[key] = v.astype(dtype)
    return out


def build_torch_model(model, config: Dict[str, Any], device: str = "cpu"):
    """transformers' DiffusionGemmaForBlockDiffusion in float32 holding `model`'s weights
    (quantized ones dequantized): the float checkpoint the quantized one stands for."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.initialization import no_init_weights
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    text = dict(config["text_config"])
    cfg = DiffusionGemmaConfig(
        text_config=text, vision_config=dict(_TINY_VISION),
        canvas_length=config.get("canvas_length", 256),
    )
    with no_init_weights():  # the weights are about to be overwritten: skip the init
        tm = DiffusionGemmaForBlockDiffusion(cfg)
    tm.tie_weights()  # which no_init_weights leaves undone: encoder = decoder tensors
    state = {}
    for k, v in dequantized_weights(model, mx.float32).items():
        fused = k.endswith((".gate_up_proj.weight", ".down_proj.weight")) and ".experts." in k
        name = k[: -len(".weight")] if fused else k
        state[name] = torch.from_numpy(np.array(v))
    missing, unexpected = tm.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"transformers has no tensor(s) {unexpected[:4]}")
    # What stays unloaded must be tied copies (filled through the decoder's tensors) or
    # the vision tower the text path never runs.
    left = [
        k for k in missing
        if not k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.", "lm_head."))
        and not (k.startswith("model.encoder.language_model.") and not k.endswith("layer_scalar"))
    ]
    if left:
        raise ValueError(f"transformers model left without weights: {left[:4]}")
    enc0 = tm.model.encoder.language_model.layers[0]
    dec0 = tm.model.decoder.layers[0]
    assert enc0.self_attn.q_proj.weight is dec0.self_attn.q_proj.weight
    tm = tm.float().to(device).eval()
    return tm


class TorchRunner(DenoiserRunner):
    name = "transformers (torch)"

    def __init__(self, tmodel, gen: GenerationConfig, seed: int = 0):
        import torch

        from mlx_diffgemma.torch_backend.drafter import TorchDenoiser

        self.torch = torch
        self.TorchDenoiser = TorchDenoiser
        self.model = tmodel
        self.gen = gen
        self.seed = seed
        self.device = next(tmodel.parameters()).device

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def prefill(self, ids: np.ndarray) -> None:
        den = self.TorchDenoiser(self.model, self.gen)
        den.encode(np.asarray(ids).reshape(-1).tolist())
        self.sync()

    def set_context(self, ids: np.ndarray) -> None:
        g = self.torch.Generator(device=self.device).manual_seed(self.seed)
        self.den = self.TorchDenoiser(self.model, self.gen, generator=g)
        self.den.encode(np.asarray(ids).reshape(-1).tolist())
        self.sync()

    @staticmethod
    def stream(*args, **kwargs):
        from mlx_diffgemma.torch_backend.drafter import stream_generate as torch_stream

        return torch_stream(*args, **kwargs)

    def decoder_logits(self, ids: np.ndarray, canvas: np.ndarray) -> np.ndarray:
        from transformers.cache_utils import DynamicCache

        torch = self.torch
        with torch.no_grad():
            cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
            def t(a):
                return torch.as_tensor(np.asarray(a), dtype=torch.long, device=self.device)

            self.model.model.encoder(input_ids=t(ids), past_key_values=cache)
            out = self.model(decoder_input_ids=t(canvas), past_key_values=cache).logits
        return out.float().cpu().numpy()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> Optional[float]:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device) / 1e9
        return None  # the CPU allocator keeps no peak statistic

"""The DiffusionGemma denoiser in MLX.

One Gemma-4 MoE transformer used two ways with the same weights: a causal encoder
that appends the prompt and every committed canvas to the KV cache, and a
bidirectional decoder that denoises a fixed-length canvas while reading (never
writing) that cache. Parameter names are the Hugging Face names, so checkpoints
convert with renames only and our output matches the mlx-community layout.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from .cache import EncoderCache, LayerCache
from .config import ModelArgs
from .lanes import Lane, join_lanes, lane_masks, make_lanes, on_lanes, run_layer, split_lanes
from .sharding import all_sum_parts, owned_experts, shard_model
from .vision import (
    MultimodalEmbedder,
    VisionModel,
    as_image_arrays,
    block_ids,
    chunk_bounds,
    real_patches,
)
from .images import image_blocks
from .weights import CLIP_SUFFIXES, hf_to_mlx_name, is_vision_tensor


class RMSNormNoScale(nn.Module):
    """RMSNorm without a weight (v_norm, the self-conditioning post_norm)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, None, self.eps)


class MLP(nn.Module):
    """Gated GELU(tanh) MLP: the dense branch of every layer, and self-conditioning's body."""

    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Used in three pieces, `project`, `keys_values` and `attend` (see
    `DecoderLayer.__call__`), so that lanes can join their keys and values in between."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.is_sliding = args.layer_types[layer_idx] == "sliding_attention"
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.kv_heads_of(layer_idx)
        self.head_dim = args.head_dim_of(layer_idx)
        dim = args.hidden_size

        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        # Full-attention layers have no v_proj: values are the raw k_proj output.
        if self.is_sliding:
            self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.v_norm = RMSNormNoScale(args.rms_norm_eps)

        rope = args.rope_parameters[args.layer_types[layer_idx]]
        # "proportional" rotates the first part of each half of the full head with
        # frequencies theta^(-2i/head_dim), which mlx-lm's ProportionalRoPE implements.
        self.rope = initialize_rope(
            dims=self.head_dim,
            base=rope.get("rope_theta", 10_000.0),
            traditional=False,
            scaling_config=rope,
            max_position_embeddings=args.max_position_embeddings,
        )

    def project(self, x: mx.array, offset: Union[int, mx.array]):
        """Queries, keys and values of the tokens in `x` at positions offset, offset+1, ..:
        projected, normed and rotated, [batch, heads, tokens, head_dim]."""
        q, k, v = self.unrotated(x)
        return self.rope(q, offset=offset), self.rope(k, offset=offset), v

    def unrotated(self, x: mx.array):
        """Queries, keys and values projected and normed, before the rotary embedding
        (which depends on the positions: `project`, or fast.py's active set)."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim) if self.is_sliding else k
        k = self.k_norm(k)
        v = self.v_norm(v)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def keys_values(
        self,
        k: mx.array,
        v: mx.array,
        *,
        cache: Optional[LayerCache] = None,
        encode: bool = False,
        context: Optional[Tuple[mx.array, mx.array]] = None,
    ) -> Tuple[mx.array, mx.array]:
        """The keys and values the new tokens attend to. The encoder appends them to the
        cache; the decoder reads the cached context (`context`, the cache's view: a
        sliding layer's window only) before the whole canvas, unmasked."""
        if encode:
            return cache.update_and_fetch(k, v) if cache is not None else (k, v)
        if context is None and cache is not None:
            context = cache.view()
        if context is not None and context[0] is not None:
            k = mx.concatenate([context[0], k], axis=2)
            v = mx.concatenate([context[1], v], axis=2)
        return k, v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Any) -> mx.array:
        B, _, L, _ = q.shape
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Router(nn.Module):
    """Scale-free RMSNorm of the residual, times `scale` and hidden^-0.5, softmax over all
    experts in float32, top-k, renormalised, times `per_expert_scale`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k_experts
        self.eps = args.rms_norm_eps
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))
        self._root_size = args.hidden_size**-0.5

    def __call__(self, x: mx.array):
        h = mx.fast.rms_norm(x, None, self.eps) * (self.scale * self._root_size).astype(x.dtype)
        probs = mx.softmax(self.proj(h).astype(mx.float32), axis=-1)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(probs, indices, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        weights = weights * self.per_expert_scale[indices].astype(mx.float32)
        return indices, weights


class Experts(nn.Module):
    """The routed experts, stored fused as in the checkpoint: gate_up_proj [E, 2I, H]
    (gate first) and down_proj [E, H, I]. One gather_mm (or gather_qmm once quantized)
    for gate and up together instead of mlx-lm SwitchGLU's two: same math, one pass over
    the expert weights, and the checkpoint's layout kept as is."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, H, I = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_up_proj = SwitchLinear(H, 2 * I, E, bias=False)
        self.down_proj = SwitchLinear(I, H, E, bias=False)

    # The global id of this rank's first expert when the experts are split over ranks
    # (`Model.shard`); None: this module holds them all.
    first: Optional[int] = None

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        if self.first is not None:
            return owned_experts(self, x, indices, weights)
        x = mx.expand_dims(x, (-2, -3))
        # Many tokens: sort them by expert so each expert's weights are read once.
        do_sort = indices.size >= 64
        idx, inv_order = indices, None
        if do_sort:
            x, idx, inv_order = _gather_sort(x, indices)
        gate, up = mx.split(self.gate_up_proj(x, idx, sorted_indices=do_sort), 2, axis=-1)
        y = self.down_proj(nn.gelu_approx(gate) * up, idx, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv_order, indices.shape)
        y = y.squeeze(-2)
        return (y * mx.expand_dims(weights.astype(y.dtype), -1)).sum(axis=-2)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(H, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(H, eps=eps)
        self.layer_scalar = mx.ones((1,))

    # The group this layer's partial outputs are summed over once `Model.shard` split it
    # (attention heads, the dense MLP's width, the experts); None: a whole layer.
    group = None

    def __call__(
        self,
        x: mx.array,
        *,
        offset: Union[int, mx.array],
        layer_scalar: mx.array,
        cache: Optional[LayerCache] = None,
        encode: bool = False,
        mask: Any = None,
        context: Optional[Tuple[mx.array, mx.array]] = None,
    ) -> mx.array:
        """Encoding (`encode=True`): causal over the cache, appending to it. Decoding: the
        canvas attends to `context` (or the cache's view) and itself, unmasked."""
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(x), offset)
        k, v = attn.keys_values(k, v, cache=cache, encode=encode, context=context)
        return self.finish(x, q, k, v, mask if encode else None, layer_scalar)

    def finish(self, x, q, k, v, mask, layer_scalar) -> mx.array:
        """The layer after its keys and values are known: attention of the queries `q` of
        the tokens `x`, then the dense and routed feed-forward, all per token."""
        r = x + self.attention(q, k, v, mask)
        out = r + self.post_feedforward_layernorm(self.feed_forward(r))
        return out * layer_scalar.astype(out.dtype)

    def attention(self, q, k, v, mask) -> mx.array:
        """Attention of the queries `q` over `k`, `v`, with its output norm."""
        out = self.self_attn.attend(q, k, v, mask)
        if self.group is not None:  # each rank's heads gave a partial o_proj output
            out = mx.distributed.all_sum(out, group=self.group)
        return self.post_attention_layernorm(out)

    def feed_forward(self, r: mx.array) -> mx.array:
        """The dense and routed branches of the residual `r`, each with its norms."""
        if self.group is None:
            return self.dense(r) + self.moe(r)
        # Split: both branches are partial sums; one collective brings both back.
        dense = self.mlp(self.pre_feedforward_layernorm(r))
        indices, weights = self.router(r)
        moe = self.experts(self.pre_feedforward_layernorm_2(r), indices, weights)
        dense, moe = all_sum_parts([dense, moe], self.group)
        return self.post_feedforward_layernorm_1(dense) + self.post_feedforward_layernorm_2(moe)

    def dense(self, r: mx.array) -> mx.array:
        """The dense feed-forward branch of the residual `r`, with its norms."""
        return self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))

    def moe(self, r: mx.array) -> mx.array:
        """The routed branch of the residual `r`: router, experts and their norms."""
        # The router reads the residual un-normalised; the experts read it normalised.
        indices, weights = self.router(r)
        out = self.experts(self.pre_feedforward_layernorm_2(r), indices, weights)
        return self.post_feedforward_layernorm_2(out)


class SelfConditioning(nn.Module):
    """post_norm(embed(canvas) + MLP(pre_norm(soft embeddings of the previous logits)))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        H, I = args.hidden_size, args.intermediate_size
        self.pre_norm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.post_norm = RMSNormNoScale(args.rms_norm_eps)

    def __call__(self, embeds: mx.array, soft: Optional[mx.array]) -> mx.array:
        if soft is None:
            # Zero soft embeddings give an exactly zero signal (norm, gelu and the
            # projections all map 0 to 0): skip the work.
            return self.post_norm(embeds)
        n = self.pre_norm(soft)
        signal = self.down_proj(nn.gelu_approx(self.gate_proj(n)) * self.up_proj(n))
        return self.post_norm(embeds + signal)


def embedding_matmul(embed: nn.Module, probs: mx.array, rows: Optional[Tuple[int, int]] = None) -> mx.array:
    """probs [.., V] @ embedding weight [V, H], straight from the quantized table when the
    embedding is quantized (no dequantized copy of a 262K x 2816 matrix). `rows`: only
    the vocabulary rows [start, stop) (a split model's share of the product)."""
    cut = (lambda a: a) if rows is None else (lambda a: None if a is None else a[rows[0]:rows[1]])
    if rows is not None:
        probs = probs[..., rows[0]:rows[1]]
    if isinstance(embed, nn.QuantizedEmbedding):
        return mx.quantized_matmul(
            probs,
            cut(embed["weight"]),
            cut(embed["scales"]),
            cut(embed.get("biases")),
            transpose=False,
            group_size=embed.group_size,
            bits=embed.bits,
            mode=getattr(embed, "mode", "affine"),
        )
    return probs @ cut(embed.weight)


class Decoder(nn.Module):
    """The shared text stack (HF `model.decoder`): embedding, layers, final norm and the
    decoder-only self-conditioning block."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class EncoderLayerScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class _EncoderLanguageModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [EncoderLayerScalar() for _ in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    """The encoder's weights of its own: its per-layer `layer_scalar`s (HF keeps them as
    separate buffers, and they may differ from the decoder's) and, in a multimodal
    checkpoint, the vision tower and its embedder (images enter through the encoder only)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.language_model = _EncoderLanguageModel(args)
        vc = args.vision_config
        if vc is not None:
            self.vision_tower = VisionModel(vc)
            self.embed_vision = MultimodalEmbedder(vc.hidden_size, args.hidden_size, vc.rms_norm_eps)


class DiffusionGemmaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = Decoder(args)
        self.encoder = Encoder(args)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DiffusionGemmaModel(args)
        self.embed_scale = args.hidden_size**0.5

    # The group this model is split over (`shard`), and this rank's vocabulary rows of
    # the self-conditioning product; None: the whole model in one process.
    group = None
    vocab_span = None

    def shard(self, group: Optional[mx.distributed.Group] = None) -> None:
        """Splits this model in place over `group` (default: `mx.distributed.init()`), as
        mlx-lm's models do: attention by heads, the dense MLP by its width, the routed
        experts by expert, the rest replicated (sharding.py says what each rank keeps).
        Every rank then runs the same calls in step. `load(path, group=...)` reads only
        this rank's slices instead of loading the whole model first."""
        shard_model(self, group or mx.distributed.init())

    # -- public contract -------------------------------------------------------------

    @property
    def layers(self):
        return self.model.decoder.layers

    @property
    def canvas_length(self) -> int:
        return self.args.canvas_length

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (the embedding's, scales' dtype when quantized)."""
        e = self.model.decoder.embed_tokens
        return e.scales.dtype if isinstance(e, nn.QuantizedEmbedding) else e.weight.dtype

    def make_cache(self, slack: Optional[int] = None) -> EncoderCache:
        """An empty encoder cache. Sliding layers keep `slack` tokens beyond their window
        (default: one canvas) so a chat can trim back over recent tokens."""
        slack = self.args.canvas_length if slack is None else slack
        return EncoderCache(self.args.layer_types, self.args.sliding_window, slack)

    def encode(
        self,
        input_ids: mx.array,
        cache: EncoderCache,
        chunk_size: Optional[int] = 2048,
        *,
        pixel_values: Any = None,
        image_position_ids: Any = None,
    ) -> None:
        """Runs the causal encoder over `input_ids` [batch, tokens], appending their keys
        and values to `cache`. Long inputs go in chunks of `chunk_size` tokens, each
        evaluated before the next, so prefill memory stays bounded.

        Images: `input_ids` (one prompt) hold each image already expanded (<|image>, one
        `image_token_id` per soft token, <image|>), and `pixel_values` /
        `image_position_ids` are the image processor's arrays (numpy, mx or torch). The
        image tokens' embeddings are replaced by the tower's soft tokens, in order, and
        with `use_bidirectional_attention: "vision"` the tokens of each image attend to
        each other both ways on top of the causal (and sliding-window) mask. A chunk
        never cuts an image: a boundary inside one moves to the image's start (or, for
        an image longer than a chunk, its end), so a chunk holds at most
        max(chunk_size, soft tokens of one image) tokens: with the default 2048 and
        280 (at most 1120) soft tokens per image, chunks are never longer than usual.
        The tower runs one image at a time before the first chunk (its activations are
        freed before the text layers run); the soft tokens kept meanwhile cost
        tokens x hidden x 2 bytes (1.6 MB per 280-token image at the real width)."""
        input_ids = mx.array(input_ids) if not isinstance(input_ids, mx.array) else input_ids
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        T = input_ids.shape[1]
        step = T if not chunk_size else chunk_size
        if pixel_values is None:
            for s in range(0, T, step):
                self._encode_chunk(input_ids[:, s : s + step], cache)
                mx.eval(cache.state_arrays())
            return
        images = self._image_inputs(input_ids, pixel_values, image_position_ids)
        for s, e in chunk_bounds(T, step, image_blocks(images["is_image"])):
            part = {k: v[s:e] for k, v in images.items() if k != "features"}
            if not part["is_image"].any():
                part = None
            else:
                part["features"] = images["features"]
            self._encode_chunk(input_ids[:, s:e], cache, part)
            mx.eval(cache.state_arrays())

    # -- images --------------------------------------------------------------------------

    @property
    def has_vision(self) -> bool:
        """Whether this model holds a vision tower (and so takes images)."""
        return "vision_tower" in self.model.encoder

    @property
    def image_token_id(self) -> int:
        """The id each soft token of an image takes in the prompt (<|image|>)."""
        return self.args.image_token_id

    @property
    def boi_token_id(self) -> int:
        """The id that opens an image in the prompt (<|image>)."""
        return self.args.boi_token_id

    @property
    def eoi_token_id(self) -> int:
        """The id that closes an image in the prompt (<image|>)."""
        return self.args.eoi_token_id

    @property
    def soft_tokens_per_image(self) -> int:
        """The checkpoint's default soft-token budget per image (the processor's
        `max_soft_tokens`; 280 for the released model)."""
        return self.args.vision_soft_tokens_per_image

    @property
    def vision_args(self):
        """The tower's VisionArgs (patch_size, pooling_kernel_size, ...), or None."""
        return self.args.vision_config if self.has_vision else None

    def require_vision(self) -> None:
        """ValueError naming the fix when this model has no vision tower."""
        if not self.has_vision:
            where = getattr(self, "model_path", None) or "this model"
            raise ValueError(
                f"{where} has no vision tower (no vision_config in its config.json, or no "
                "model.encoder.vision_tower.* weights), so it takes no images: use a "
                "DiffusionGemma directory that includes the tower (mlx-diffgemma convert "
                "keeps it), or leave the images out"
            )

    def vision_soft_tokens(self, pixel_values: Any, image_position_ids: Any) -> List[mx.array]:
        """The tower's output per image, [soft tokens, vision hidden] each (before the
        embedder), one image at a time, each evaluated."""
        self.require_vision()
        vc = self.args.vision_config
        pv, pos = as_image_arrays(pixel_values, image_position_ids, vc)
        tower = self.model.encoder.vision_tower
        out = []
        for i in range(pv.shape[0]):
            patches, positions = real_patches(pv, pos, i, vc)
            out.append(tower(mx.array(patches), positions))
            mx.eval(out[-1])  # one image's activations at a time
        return out

    def image_features(self, pixel_values: Any, image_position_ids: Any) -> mx.array:
        """The soft tokens of all images in the text model's width, [soft tokens, hidden]
        in the model's dtype: what replaces the image tokens' embeddings."""
        soft = mx.concatenate(self.vision_soft_tokens(pixel_values, image_position_ids), axis=0)
        feats = self.model.encoder.embed_vision(soft).astype(self.dtype)
        mx.eval(feats)
        return feats

    def _image_inputs(self, input_ids: mx.array, pixel_values, image_position_ids) -> Dict[str, Any]:
        """Per-token numpy arrays for an encode with images (is_image, the soft-token
        row of each image token, block ids or None) and the soft tokens themselves."""
        self.require_vision()
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"images take one prompt at a time (got a batch of {input_ids.shape[0]}); "
                "encode each prompt with its own images"
            )
        ids = np.array(input_ids[0])
        is_image = ids == self.image_token_id
        features = self.image_features(pixel_values, image_position_ids)
        n, m = int(is_image.sum()), features.shape[0]
        if n != m:
            raise ValueError(
                f"input_ids hold {n} image tokens (id {self.image_token_id}) but the images "
                f"give {m} soft tokens: expand each image in the prompt to <|image>, its "
                "soft tokens (num_soft_tokens_per_image from the processor), <image|>"
            )
        bidirectional = self.args.use_bidirectional_attention == "vision"
        return {
            "is_image": is_image,
            "rows": np.maximum(np.cumsum(is_image) - 1, 0),
            "blocks": block_ids(is_image) if bidirectional else np.full(len(ids), -1),
            "features": features,
        }

    def decode(
        self,
        canvas_ids: mx.array,
        cache: EncoderCache,
        self_conditioning_logits: Optional[mx.array] = None,
    ) -> mx.array:
        """Denoiser forward over a canvas [batch, canvas] whose positions continue after
        what `cache` holds; returns float32 soft-capped logits [batch, canvas, vocab].
        Reads the cache, never writes it."""
        # What each layer reads from the cache: its view (a sliding layer's window).
        views = [c.view() for c in cache.layers]
        present = tuple(k is not None for k, _ in views)
        context = [a for (k, v), p in zip(views, present) if p for a in (k, v)]
        sc = self_conditioning_logits
        inputs = ([] if sc is None else [sc]) + context
        # The lanes are part of the key: a compiled trace bakes in their streams.
        n_lanes = len(self.lanes_for(canvas_ids.shape[1]))
        key = (sc is not None, present, n_lanes)
        if not self.compile_decode or self.group is not None:
            # (A split model reads its experts' routing on the host: not traceable.)
            logits = self._decode(key, canvas_ids, cache.offset, *inputs)
        else:
            # The position offset goes in as an array so a compiled trace serves every
            # canvas whose context has the same shapes.
            offset = mx.array(cache.offset, dtype=mx.int32)
            fns = self.__dict__.setdefault("_decode_fns", {})
            if key not in fns:
                # One trace per (self-conditioned?, which layers hold context, lanes); MLX
                # retraces when the context grows (a new canvas), never between steps.
                # The weights are read through `inputs=self.state`, so a later `update`
                # of the model is seen.
                fns[key] = mx.compile(partial(self._decode, key), inputs=self.state)
            logits = fns[key](canvas_ids, offset, *inputs)
        if n_lanes > 1:
            # Evaluated here, on lanes: run in one graph with what the caller does next
            # (the sampler), the lanes kept one more [canvas x vocab] array alive at the
            # step's peak (measured: 4.05 units instead of 3.10 at the real vocab).
            mx.eval(logits)
        return logits

    # Compile the decoder step (see `decode`). Off: on MLX's CPU backend it measured
    # 0.4-4% slower than eager, with identical logits (BENCHMARKS.md); a switch so that a
    # Metal/CUDA run can measure it (`mlx-diffgemma bench --compile-decode`).
    compile_decode = False

    # How many lanes a forward splits its tokens into (lanes.py); None: one per CPU core
    # on the CPU backend, one on a GPU.
    lanes: Optional[int] = None

    def lanes_for(self, tokens: int) -> List[Lane]:
        """The lanes a forward over `tokens` tokens runs on (lanes.py). One for a split
        model: collectives built on several streams are paired across ranks in whatever
        order the streams run them (measured: wrong sums), and its ranks already share
        the machine's cores."""
        return make_lanes(tokens, 1 if self.group is not None else self.lanes)

    def _decode(self, key, canvas_ids, offset, *inputs):
        has_sc, present, n_lanes = key
        dec = self.model.decoder
        lanes = make_lanes(canvas_ids.shape[1], n_lanes)

        sc = inputs[0] if has_sc else None
        hs = on_lanes(
            lanes,
            lambda ids, sc: self.self_conditioned(self.embed(ids), sc),
            split_lanes(canvas_ids, lanes),
            split_lanes(sc, lanes),
        )
        it = iter(inputs[1:] if has_sc else inputs)
        for layer, p in zip(dec.layers, present):
            kv = (next(it), next(it)) if p else None
            hs = run_layer(layer, hs, lanes, offset=offset, layer_scalar=layer.layer_scalar, context=kv)
        return join_lanes(on_lanes(lanes, self.head, hs))

    # -- the decoder's pieces (each as the forward runs it) ------------------------------

    def embed(self, ids: mx.array) -> mx.array:
        """The scaled token embeddings of `ids`."""
        h = self.model.decoder.embed_tokens(ids)
        # The reference multiplies by sqrt(hidden) cast to the weight dtype.
        return h * mx.array(self.embed_scale, dtype=h.dtype)

    def self_conditioned(self, h: mx.array, sc_logits: Optional[mx.array]) -> mx.array:
        """The decoder's input: embeddings `h` with the self-conditioning signal of the
        previous step's logits (softmax, then the product with the embedding table)."""
        dec = self.model.decoder
        soft = None
        if sc_logits is not None:
            probs = mx.softmax(sc_logits.astype(mx.float32), axis=-1)
            span = self.vocab_span
            rows = None if span is None else (span.start, span.stop)
            soft = embedding_matmul(dec.embed_tokens, probs.astype(h.dtype), rows)
            if self.group is not None:  # each rank multiplied its rows of the vocabulary
                soft = mx.distributed.all_sum(soft, group=self.group)
            soft = soft * mx.array(self.embed_scale, dtype=h.dtype)
        return dec.self_conditioning(h, soft)

    def head(self, h: mx.array) -> mx.array:
        """Final norm, LM head and soft-capping: float32 logits of the hidden states `h`."""
        return self._logits(self.model.decoder.norm(h))

    # -- internals -------------------------------------------------------------------

    def _logits(self, h: mx.array) -> mx.array:
        logits = self.model.decoder.embed_tokens.as_linear(h).astype(mx.float32)
        cap = self.args.final_logit_softcapping
        if cap:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def _encode_chunk(self, ids: mx.array, cache: EncoderCache, image=None) -> None:
        """One chunk through the encoder. `image` (a chunk holding image tokens): the
        per-token arrays of `_image_inputs`, sliced to the chunk, plus all soft tokens."""
        dec = self.model.decoder
        offset = cache.offset
        L = ids.shape[1]
        lanes = self.lanes_for(L)
        if image is None:
            hs = on_lanes(lanes, self.embed, split_lanes(ids, lanes))
        else:
            hs = split_lanes(_embed_with_images(self.embed, ids, image), lanes)
        masks: Dict[str, List[Any]] = {}
        for i, (layer, c) in enumerate(zip(dec.layers, cache.layers)):
            kind = self.args.layer_types[i]
            if kind not in masks:
                if image is not None and (image["blocks"] >= 0).any():
                    mask = _image_block_mask(L, offset, c, image["blocks"])
                else:
                    mask = _encoder_mask(L, offset, c)
                masks[kind] = lane_masks(mask, L, c.retained + L, lanes)
            scalar = self.model.encoder.language_model.layers[i].layer_scalar
            hs = run_layer(layer, hs, lanes, offset=offset, layer_scalar=scalar, cache=c,
                           encode=True, masks=masks[kind])
        # The encoder's output states are not used for generation: its product is the
        # cache. Keep the last layer's work in the graph via the cache arrays only.

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Maps checkpoint tensors (HF or MLX layout) to this module tree: adds `.weight` to
        the fused expert tensors, drops lm_head (tied) and the encoder's tied copies. The
        vision tower and its embedder are kept when this model has a tower (their clamp
        buffers only when the tower uses them), dropped otherwise."""
        vision = self.has_vision
        clipped = vision and self.args.vision_config.use_clipped_linears
        out = {}
        for k, v in weights.items():
            name = hf_to_mlx_name(k, keep_vision=vision)
            if name is not None and not (is_vision_tensor(name) and not clipped
                                         and name.endswith(CLIP_SUFFIXES)):
                out[name] = v
        return out


def _embed_with_images(embed, ids: mx.array, image: Dict[str, Any]) -> mx.array:
    """The chunk's embeddings with each image token's row replaced by its soft token
    (in order, as the reference's masked_scatter does; soft tokens are not scaled)."""
    is_image = mx.array(image["is_image"])[None]
    # Image ids may lie outside the text vocabulary: embed a pad id in their place.
    h = embed(mx.where(is_image, 0, ids))
    soft = image["features"][mx.array(image["rows"])][None].astype(h.dtype)
    return mx.where(is_image[..., None], soft, h)


def _image_block_mask(L: int, offset: int, cache: LayerCache, blocks: np.ndarray) -> mx.array:
    """The encoder mask of a chunk holding images: causal (windowed on sliding layers)
    over the retained keys and the new ones, or-ed with "same image block" among the new
    tokens (`blocks`: -1 for text), as transformers' blockwise overlay does. Retained
    keys are never in a new token's block: chunks do not cut images."""
    retained = cache.retained
    q = mx.arange(offset, offset + L)[:, None]
    k = mx.arange(offset - retained, offset + L)[None]
    mask = k <= q
    if cache.is_sliding:
        mask = mask & (q - k < cache.window)
    b = mx.array(blocks)
    same = (b[:, None] == b[None, :]) & (b[:, None] >= 0)
    if retained:
        same = mx.concatenate([mx.zeros((L, retained), dtype=mx.bool_), same], axis=1)
    return mask | same


def _encoder_mask(L: int, offset: int, cache: LayerCache):
    """Causal (and, for sliding layers, windowed) mask of L new tokens at `offset` over the
    retained keys plus the new ones. None/"causal" where the fast path is exact."""
    if not cache.is_sliding:
        return "causal" if L > 1 else None
    retained = cache.retained
    window = cache.window
    if retained == 0 and L <= window:
        return "causal" if L > 1 else None
    q = mx.arange(offset, offset + L)[:, None]
    k = mx.arange(offset - retained, offset + L)[None]
    return (k <= q) & (q - k < window)


def expected_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Every text parameter of the module tree with its (unquantized) shape, as implied by
    the config (the vision tower's are left out: `sizes.vision_shapes`). Read off a
    freshly built model: MLX arrays are lazy, so even the 26B shapes cost no memory
    (nothing is evaluated), and the module tree stays the one source of truth for the
    converter, `verify` and the size estimates."""
    params = tree_flatten(Model(args).parameters())
    return {k: tuple(v.shape) for k, v in params if not is_vision_tensor(k)}

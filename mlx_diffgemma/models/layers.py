"""The layers of the DiffusionGemma denoiser (model.py assembles them): attention,
router, fused experts, the dense MLP, the decoder layer and self-conditioning, as
Hugging Face names them."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from .cache import LayerCache
from .config import ModelArgs
from .sharding import all_sum_parts, owned_experts


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
        return self.o_proj(self.mix(q, k, v, mask))

    def mix(self, q: mx.array, k: mx.array, v: mx.array, mask: Any) -> mx.array:
        """The attention core before `o_proj`: [batch, tokens, heads x head_dim]."""
        B, _, L, _ = q.shape
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


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
        return self.finish_attended(x, self.self_attn.attend(q, k, v, mask), layer_scalar)

    def finish_attended(self, x, attended, layer_scalar) -> mx.array:
        """The layer after attention: `attended` is its `o_proj` output for the tokens
        `x`; then the dense and routed feed-forward, all per token (models/batched.py
        runs the attention per sequence and this on all of them at once)."""
        r = x + self.attention_output(attended)
        out = r + self.post_feedforward_layernorm(self.feed_forward(r))
        return out * layer_scalar.astype(out.dtype)

    def at_positions(self, x: mx.array, idx: mx.array, length: int, offset: int, cache: LayerCache,
                     kv: List[Optional[Tuple[mx.array, mx.array]]], i: int) -> mx.array:
        """The decoder layer for the canvas positions `idx` (of a canvas of `length`) only:
        their keys and values are written into the layer's canvas buffers `kv[i]`
        ([1, heads, length, dim], made on first use), and their queries attend to the
        cached context and the whole buffer (what earlier calls wrote elsewhere)."""
        attn = self.self_attn
        q, k, v = attn.unrotated(self.input_layernorm(x))
        q = rope_at(attn.rope, q, idx, length, offset)
        k = rope_at(attn.rope, k, idx, length, offset)
        if kv[i] is None:
            B, H, _, D = k.shape
            kv[i] = (mx.zeros((B, H, length, D), k.dtype), mx.zeros((B, H, length, D), v.dtype))
        kb, vb = mx.array(kv[i][0]), mx.array(kv[i][1])
        kb[:, :, idx] = k
        vb[:, :, idx] = v
        kv[i] = (kb, vb)
        keys, values = attn.keys_values(kb, vb, cache=cache)
        return self.finish(x, q, keys, values, None, self.layer_scalar)

    def attention(self, q, k, v, mask) -> mx.array:
        """Attention of the queries `q` over `k`, `v`, with its output norm."""
        return self.attention_output(self.self_attn.attend(q, k, v, mask))

    def attention_output(self, out: mx.array) -> mx.array:
        """The attention's `o_proj` output `out` summed over ranks and normed."""
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


def rope_at(rope, x: mx.array, idx: mx.array, length: int, offset: int) -> mx.array:
    """`x` [batch, heads, A, dim] of the canvas positions `idx`, rotated as in the whole
    canvas: the rotary embedding is per position, so the tokens are placed in a canvas
    of zeros, rotated there with the same operation the full decoder uses, and taken
    back."""
    B, H, _, D = x.shape
    full = mx.zeros((B, H, length, D), dtype=x.dtype)
    full[:, :, idx] = x
    return rope(full, offset=offset)[:, :, idx]


def sparse_soft_embedding(embed, probs: mx.array, ids: mx.array, scale: float) -> mx.array:
    """sum_k probs[k] * E[ids[k]] * scale over the top-K ids [.., K]: the self-conditioning
    input from the kept probabilities only (not renormalised)."""
    rows = embed(ids)  # [.., K, hidden]; a quantized table dequantizes only these rows
    soft = (probs[..., None].astype(rows.dtype) * rows).sum(axis=-2)
    return soft * mx.array(scale, dtype=rows.dtype)

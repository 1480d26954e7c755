"""The Gemma-4 vision tower and the multimodal embedder in MLX.

An image reaches the model as the arrays transformers' Gemma-4 image processor returns:
`pixel_values` [images, max_patches, 3 * patch**2] (each row one patch, pixels in [0, 1],
channels last) and `image_position_ids` [images, max_patches, 2] (each patch's (x, y) on
the patch grid; (-1, -1) marks padding rows). The tower embeds the patches (a linear
projection plus learned x and y position embeddings), runs a bidirectional transformer
with 2-D RoPE over them, averages each `pooling_kernel_size`-square of patches into one
soft token and scales by sqrt(hidden); the embedder (`embed_vision`) RMS-normalises the
soft tokens and projects them to the text model's width. Those rows replace the image
tokens' embeddings in the encoder's input.

Parameter names are transformers' (`model.encoder.vision_tower.*`,
`model.encoder.embed_vision.*`), which is also how mlx-vlm's converter stores them: the
patch projection is a plain linear layer in both, so nothing is transposed.

Padding rows are dropped before the tower runs: they are masked out of every key and
pooled with weight zero in the reference, so the real patches' results do not depend on
them, and each image costs only its own patches.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionArgs

# Query rows per attention block in the tower (see VisionAttention).
QUERY_BLOCK = 1024


class ClippableLinear(nn.Module):
    """A bias-free linear layer held as `.linear` (the reference's layout), with the
    optional input/output clamps some Gemma-4 towers ship (`use_clipped_linears`)."""

    def __init__(self, dims: int, out_dims: int, clipped: bool = False):
        super().__init__()
        self.linear = nn.Linear(dims, out_dims, bias=False)
        if clipped:
            self.input_min = mx.array(-float("inf"))
            self.input_max = mx.array(float("inf"))
            self.output_min = mx.array(-float("inf"))
            self.output_max = mx.array(float("inf"))
        self.clipped = clipped

    def __call__(self, x: mx.array) -> mx.array:
        if self.clipped:
            x = mx.clip(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = mx.clip(x, self.output_min, self.output_max)
        return x


def rope_2d(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """The reference's multidimensional RoPE with two axes: the first half of each head
    rotates by the patch's x, the second half by its y, each half split in two
    (rotate-half style). `cos`/`sin` [.., tokens, 1, head_dim] are laid out x, x, y, y."""
    a, b, c, d = mx.split(x, 4, axis=-1)
    rotated = mx.concatenate([-b, a, -d, c], axis=-1)
    return x * cos + rotated * sin


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        dims, clip, eps = args.hidden_size, args.use_clipped_linears, args.rms_norm_eps
        self.q_proj = ClippableLinear(dims, self.n_heads * hd, clip)
        self.k_proj = ClippableLinear(dims, self.n_kv_heads * hd, clip)
        self.v_proj = ClippableLinear(dims, self.n_kv_heads * hd, clip)
        self.o_proj = ClippableLinear(self.n_heads * hd, dims, clip)
        self.q_norm = nn.RMSNorm(hd, eps=eps)
        self.k_norm = nn.RMSNorm(hd, eps=eps)
        self.eps = eps

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        B, L, _ = x.shape
        q = rope_2d(self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)), cos, sin)
        k = rope_2d(self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)), cos, sin)
        v = mx.fast.rms_norm(self.v_proj(x).reshape(B, L, self.n_kv_heads, -1), None, self.eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        # Every patch sees every patch of its image (padding rows were dropped). Where
        # attention is not fused (the CPU; a GPU without a kernel for this head size)
        # the scores are materialised, heads x queries x patches float32: 367 MB for a 280-token image's
        # 2394 patches, 6.5 GB at the 1120-token budget. Long images go in blocks of
        # query rows, each evaluated before the next (left to itself MLX schedules the
        # independent blocks together, all their scores alive at once); each row's
        # arithmetic is unchanged.
        blk = QUERY_BLOCK
        if L <= blk:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            parts = []
            for i in range(0, L, blk):
                rows = q[:, :, i : i + blk]
                parts.append(mx.fast.scaled_dot_product_attention(rows, k, v, scale=1.0))
                mx.eval(parts[-1])
            out = mx.concatenate(parts, axis=2)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        H, I, clip = args.hidden_size, args.intermediate_size, args.use_clipped_linears
        self.gate_proj = ClippableLinear(H, I, clip)
        self.up_proj = ClippableLinear(H, I, clip)
        self.down_proj = ClippableLinear(I, H, clip)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(H, eps=eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [VisionEncoderLayer(args) for _ in range(args.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    """Patches [.., 3 * patch**2] in [0, 1] -> hidden, plus the x and y embeddings."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        # The reference maps pixels to [-1, 1] here rather than in the processor.
        h = self.input_proj((2 * (patches - 0.5)).astype(self.input_proj.weight.dtype))
        table = self.position_embedding_table
        return h + (table[0][positions[..., 0]] + table[1][positions[..., 1]])


class VisionModel(nn.Module):
    """The tower (HF `Gemma4VisionModel`): one image's real patches in, its soft tokens
    out, [soft tokens, vision hidden] in the tower's dtype."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = VisionEncoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))
        half = args.head_dim // 2
        self._inv_freq = 1.0 / (args.rope_theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half))

    def rope(self, positions: mx.array, dtype: mx.Dtype) -> Tuple[mx.array, mx.array]:
        """cos and sin [1, n, 1, head_dim] of the patches at `positions` [1, n, 2]."""
        freqs = positions[..., None].astype(mx.float32) * self._inv_freq  # [1, n, 2, hd/4]
        fx, fy = freqs[:, :, 0], freqs[:, :, 1]
        angles = mx.concatenate([fx, fx, fy, fy], axis=-1)[:, :, None]
        return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)

    def __call__(self, patches: mx.array, positions: np.ndarray) -> mx.array:
        """`patches` [n, 3 * patch**2] and their grid `positions` [n, 2] (numpy ints; no
        padding rows) of one image -> its soft tokens [n // kernel**2, hidden]."""
        pos = mx.array(positions.astype(np.int32))[None]
        h = self.patch_embedder(patches[None], pos)
        cos, sin = self.rope(pos, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        # Averaged in float32 and rounded to the tower's dtype, then scaled and
        # standardised in float32 (the scale can pass float16's range) and rounded
        # again: the reference's order of roundings.
        pooled = pooling_matrix(positions, self.args.pooling_kernel_size) @ h[0].astype(mx.float32)
        pooled = pooled.astype(h.dtype).astype(mx.float32) * (self.args.hidden_size**0.5)
        if self.args.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(h.dtype)


def pooling_matrix(positions: np.ndarray, k: int) -> mx.array:
    """[soft tokens, patches] float32: each soft token the mean of its k x k cell of
    patches, cells numbered row-major over the grid (the reference's order)."""
    cells = cell_indices(positions, k)
    rows = np.unique(cells)
    weights = (cells[None, :] == rows[:, None]).astype(np.float32) / np.float32(k * k)
    return mx.array(weights)


def cell_indices(positions: np.ndarray, k: int) -> np.ndarray:
    """The pooling cell of each real patch: x // k + (grid width // k) * (y // k)."""
    width = int(positions[:, 0].max()) + 1
    return positions[:, 0] // k + (width // k) * (positions[:, 1] // k)


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> the text model's width: scale-free RMSNorm, then a projection."""

    def __init__(self, vision_hidden: int, text_hidden: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(vision_hidden, text_hidden, bias=False)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))


# -- the processor's arrays ------------------------------------------------------------


def as_image_arrays(pixel_values: Any, image_position_ids: Any, args: VisionArgs):
    """The processor's `pixel_values` and `image_position_ids` (numpy, mx or torch; one
    image or a batch) as numpy [images, patches, 3 * patch**2] float32 and
    [images, patches, 2] int64, checked against the tower. ValueError naming the fix."""
    fix = "pass the arrays the model's image processor returns"
    if image_position_ids is None:
        raise ValueError(f"pixel_values need their image_position_ids; {fix}")
    pv = np.asarray(_to_numpy(pixel_values), dtype=np.float32)
    pos = np.asarray(_to_numpy(image_position_ids))
    if pv.ndim == 2:
        pv = pv[None]
    if pos.ndim == 2:
        pos = pos[None]
    width = 3 * args.patch_size**2
    if pv.ndim != 3 or pv.shape[-1] != width:
        raise ValueError(
            f"pixel_values have shape {tuple(pv.shape)}, expected [images, patches, {width}] "
            f"(patches of {args.patch_size}x{args.patch_size} pixels, 3 channels); {fix}"
        )
    if pos.shape != pv.shape[:2] + (2,) or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(
            f"image_position_ids have shape {tuple(pos.shape)} ({pos.dtype}), expected integer "
            f"[{pv.shape[0]}, {pv.shape[1]}, 2] beside pixel_values; {fix}"
        )
    if not np.isfinite(pv).all():
        raise ValueError(f"pixel_values hold NaN or infinite values; {fix}")
    return pv, pos.astype(np.int64)


def real_patches(pv: np.ndarray, pos: np.ndarray, i: int, args: VisionArgs):
    """Image `i`'s real patches and positions (padding rows, (-1, -1), dropped)."""
    keep = ~(pos[i] == -1).all(-1)
    p = pos[i][keep]
    if len(p) == 0:
        raise ValueError(f"image {i} has no patches (every image_position_ids row is padding)")
    k = args.pooling_kernel_size
    if p.min() < 0 or p.max() >= args.position_embedding_size:
        raise ValueError(
            f"image {i} has patch positions outside [0, {args.position_embedding_size}) "
            "(the tower's position table); the image is too large for this tower: resize it"
        )
    width, height = int(p[:, 0].max()) + 1, int(p[:, 1].max()) + 1
    if width % k or height % k or len(p) != width * height:
        raise ValueError(
            f"image {i}'s patches do not tile a grid of {k}x{k} cells (grid {width}x{height}, "
            f"{len(p)} patches); pass the arrays the model's image processor returns"
        )
    return pv[i][keep], p


def soft_token_counts(image_position_ids: Any, pooling_kernel_size: int) -> List[int]:
    """Soft tokens of each image (what its prompt expands to between <|image> and
    <image|>), read from `image_position_ids` as the tower pools them."""
    pos = np.asarray(_to_numpy(image_position_ids))
    pos = pos[None] if pos.ndim == 2 else pos
    counts = []
    for p in pos:
        p = p[~(p == -1).all(-1)]
        counts.append(len(np.unique(cell_indices(p, pooling_kernel_size))) if len(p) else 0)
    return counts


def _to_numpy(x: Any) -> Any:
    if isinstance(x, mx.array):
        return np.array(x)
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        return x.detach().cpu().numpy()
    return x


def block_ids(is_image: np.ndarray) -> np.ndarray:
    """-1 for text, else the index of the token's image block (as the reference's
    `block_sequence_ids`)."""
    starts = is_image & ~np.concatenate([[False], is_image[:-1]])
    return np.where(is_image, np.cumsum(starts) - 1, -1)


def chunk_bounds(T: int, step: int, blocks: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Chunks of at most `step` tokens that never cut an image block: a boundary inside
    a block moves back to the block's start, or, when the block starts the chunk (a block
    longer than `step`), forward to its end. A chunk is thus at most
    max(step, longest block) tokens."""
    bounds = []
    s = 0
    while s < T:
        e = min(s + step, T)
        for a, b in blocks:
            if a < e < b:
                e = a if a > s else b
                break
        bounds.append((s, e))
        s = e
    return bounds

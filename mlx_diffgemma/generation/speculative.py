"""Speculative decoding: DiffusionGemma drafts blocks for an autoregressive Gemma 4 target
run by mlx-lm, and the output is the target's.

Each round our model (its encoder cache holds every kept token) denoises a
k-token canvas continuing the context for a few steps and proposes its tokens; the
target (an mlx-lm model with its own cache) scores [last kept token + the k drafts] in one
forward; the longest prefix it agrees with is kept, plus one token of its own; the
target's cache is trimmed back to what was kept and the drafter encodes the kept tokens.

Greedy (`temperature=0`): a draft is kept while it is the target's argmax, so the output
is the target's greedy output. Sampling: the standard speculative rule (Leviathan et al.,
Chen et al.): draft x_i is drawn from the drafter's distribution q_i at that position (its
last denoising step's logits at `temperature`), kept with probability min(1, p_i(x_i) /
q_i(x_i)) where p_i is the target's at `temperature`; at the first rejection a token is
drawn from norm(max(0, p_i - q_i)); when every draft is kept, a bonus token from the
target's next distribution. Each kept token is then distributed exactly as the target
samples it. Only the temperature is applied to the target's logits: top-p, top-k or
penalties would need the same filter on both sides and are not offered.
"""

from __future__ import annotations

import time
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from .api import make_denoiser, on_device
from .events import Commit, Draft, Event, SpeculativeSummary
from .fast import FastOptions
from .loop import collect, text_decoder
from .prompt import prompt_ids
from .settings import Settings, check_reserve, defaults, resolve

# -- the target's cache ----------------------------------------------------------------


class WindowKVCache(RotatingKVCache):
    """mlx-lm's sliding-window cache, always in temporal order so that it can be trimmed
    after it wraps. mlx-lm's RotatingKVCache cannot trim once it has rotated (its
    speculative decoding refuses Gemma 4 past the window); here every update takes its
    concatenating path, which keeps the last `max_size - 1` tokens in order and appends the
    new ones, and a trim drops the newest tokens (a verify forward's rejected drafts) as
    long as the window stays covered. The attention mask is mlx-lm's, unchanged."""

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return self._update_concat(keys, values)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        if n <= 0:
            return 0
        if self._idx - n < min(self.offset - n, self.max_size - 1):
            raise ValueError(f"cannot trim {n} tokens: the sliding window would lose tokens it still needs")
        self.keys = self.keys[..., : self._idx - n, :]
        self.values = self.values[..., : self._idx - n, :]
        self._idx -= n
        self.offset -= n
        return n


def make_target_cache(model) -> list:
    """mlx-lm's prompt cache for `model`, its sliding-window layers as `WindowKVCache`."""
    cache = [WindowKVCache(c.max_size, c.keep) if type(c) is RotatingKVCache else c
             for c in make_prompt_cache(model)]
    if not can_trim_prompt_cache(cache):
        kinds = sorted({type(c).__name__ for c in cache if not c.is_trimmable()})
        raise ValueError(f"the target's cache cannot be rolled back ({', '.join(kinds)}); "
                         "use a Gemma 4 (attention-only) target")
    return cache


class Target:
    """The mlx-lm target: its cache holds every kept token but the last, which opens the
    next verify forward."""

    def __init__(self, model, cache: Optional[list] = None, prefill_step_size: int = 2048):
        self.model = model
        self.cache = make_target_cache(model) if cache is None else cache
        self.prefill_step_size = prefill_step_size
        self.forwards = 0

    def prefill(self, ids: Sequence[int]) -> None:
        step = self.prefill_step_size
        for s in range(0, len(ids), step):
            self.model(mx.array(ids[s : s + step], dtype=mx.int32)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])

    def verify(self, ids: Sequence[int]) -> mx.array:
        """Float32 logits [len(ids), vocab]: row i is the next-token logits after ids[i]."""
        self.forwards += 1
        return self.model(mx.array(ids, dtype=mx.int32)[None], cache=self.cache)[0].astype(mx.float32)

    def rewind(self, n: int) -> None:
        trim_prompt_cache(self.cache, n)

    @property
    def max_context(self) -> Optional[int]:
        return target_context(self.model)


def target_context(model) -> Optional[int]:
    """An mlx-lm model's context in tokens, when its config says (a text model's args or
    a multimodal one's text_config)."""
    args = getattr(model, "args", None)
    limit = getattr(args, "max_position_embeddings", None)
    if limit is None and isinstance(getattr(args, "text_config", None), dict):
        limit = args.text_config.get("max_position_embeddings")
    return limit


# -- the proposals ----------------------------------------------------------------------


class Proposer:
    """Our model proposing blocks: a k-token canvas after what its cache holds, denoised
    for up to `gen.max_denoising_steps` steps by the usual denoiser (reference or fast
    mode; the decoder runs any canvas length)."""

    def __init__(self, model, settings: Settings, cache=None):
        if settings.fast is not None and settings.fast.active_set:
            raise ValueError("speculative drafting reads every position's logits: use fast options "
                             "without active_set")
        self.denoiser = make_denoiser(model, settings, cache=cache)
        self.denoiser.keep_logits = True
        self.forwards = 0

    def encode(self, ids: Sequence[int]) -> None:
        self.denoiser.encode(ids)

    def accept(self, ids: Sequence[int]) -> None:
        """The kept tokens join our model's context (one encoder forward)."""
        self.encode(ids)
        self.forwards += 1

    def propose(self, k: int, index: int, temperature: float):
        """-> (k draft tokens, their distributions' logits [k, vocab] float32, Draft events).
        Greedy: the committed canvas (the last step's argmax). Sampling: each token drawn
        from softmax(last logits / temperature), the q of the acceptance rule."""
        d = self.denoiser
        d.canvas_length = k
        canvas = d.start_canvas(index)
        events, argmax = [], None
        for step in range(d.gen.max_denoising_steps, 0, -1):
            canvas, argmax, accepted, stop = d.step(canvas, index, step)
            self.forwards += 1
            events.append(Draft(index, step, d.to_list(argmax), [bool(a) for a in d.to_list(accepted)]))
            if stop:
                break
        logits = d.last_logits[0].astype(mx.float32)
        if temperature == 0:
            return d.to_list(argmax), logits, events
        return mx.random.categorical(logits / temperature).tolist(), logits, events


# -- verification -----------------------------------------------------------------------


def accept_block(target_logits: mx.array, drafts: Sequence[int], draft_logits: Optional[mx.array],
                 temperature: float) -> Tuple[int, int]:
    """-> (how many drafts are kept, the target's own next token after them).
    `target_logits` [k+1, V]: the target's logits after the last kept token and after each
    draft; `draft_logits` [k, V]: the drafter's, whose softmax at `temperature` the drafts
    were drawn from (unused when greedy)."""
    k = len(drafts)
    if temperature == 0:
        best = mx.argmax(target_logits, axis=-1).tolist()
        n = 0
        while n < k and drafts[n] == best[n]:
            n += 1
        return n, best[n]
    p = mx.softmax(target_logits / temperature, axis=-1)
    n = 0
    if k:
        q = mx.softmax(draft_logits / temperature, axis=-1)
        x = mx.array(drafts, dtype=mx.int32)[:, None]
        px = mx.take_along_axis(p[:k], x, axis=-1)[:, 0]
        qx = mx.take_along_axis(q, x, axis=-1)[:, 0]
        # u < p/q, written without the division: kept with probability min(1, p/q).
        kept = (mx.random.uniform(shape=(k,)) * qx < px).tolist()
        n = kept.index(False) if False in kept else k
    dist = p[n]
    if n < k:
        residual = mx.maximum(p[n] - q[n], 0.0)
        # All zero only when p == q exactly, where a rejection cannot happen; guard anyway.
        if residual.sum().item() > 0:
            dist = residual
    return n, int(mx.random.categorical(mx.log(dist)).item())


# -- the generator ----------------------------------------------------------------------


def check_tokenizers(target_tokenizer, tokenizer) -> None:
    """Raises unless both tokenizers map the same tokens to the same ids."""
    a, b = _vocab(target_tokenizer), _vocab(tokenizer)
    if a == b:
        return
    ia = {i: t for t, i in a.items()}
    ib = {i: t for t, i in b.items()}
    first = min(i for i in set(ia) | set(ib) if ia.get(i) != ib.get(i))
    raise ValueError(
        f"the target's tokenizer differs from the drafter's ({len(a)} vs {len(b)} tokens; id {first} "
        f"is {ia.get(first)!r} in the target's, {ib.get(first)!r} in the drafter's): use a Gemma 4 "
        "target, whose tokenizer DiffusionGemma shares"
    )


def _vocab(tokenizer) -> dict:
    if tokenizer is None:
        raise ValueError("speculative decoding needs both models' tokenizers, to check they agree")
    return getattr(tokenizer, "_tokenizer", tokenizer).get_vocab()


def _check_contexts(n_prompt: int, reserve: int, drafter_limit: int, target_limit: Optional[int]) -> None:
    """The prompt plus every token a run may generate (and one block beyond the last
    kept token, which both models read) must fit both models' contexts."""
    fix = "shorten the prompt or lower max_new_tokens"
    check_reserve(n_prompt, reserve, drafter_limit, fix, whose="drafter's ")
    if target_limit is not None:
        check_reserve(n_prompt, reserve, int(target_limit), fix, whose="target's ")


def speculative_stream_generate(
    target,
    target_tokenizer,
    model,
    tokenizer,
    prompt,
    *,
    k: int = 8,
    draft_steps: int = 1,
    temperature: float = 0.0,
    adaptive_k: bool = False,
    max_new_tokens: int = 256,
    seed: Optional[int] = None,
    mode: str = "fast",
    fast: Optional[FastOptions] = None,
    max_context: Optional[int] = None,
    cache=None,
    target_cache: Optional[list] = None,
    **generation_kwargs,
) -> Iterator[Event]:
    """Generates the target's output (an mlx-lm model, `mlx_lm.load`) with `model` (ours)
    drafting blocks of `k` tokens in up to `draft_steps` denoising steps each (with
    `adaptive_k`, blocks of 1 to `k` tokens, sized by `next_block_size`).

    `temperature` 0 is the target's greedy output; above 0, samples from the target's
    softmax(logits / temperature). Yields `Draft` per denoising step, `Commit` per round
    (the tokens kept) and a final `SpeculativeSummary`. `prompt`: text (encoded as is) or
    token ids. `mode`/`fast` and `generation_kwargs` configure our model's denoiser
    (as `stream_generate`'s). Stops at the target tokenizer's EOS or `max_new_tokens`.
    `max_context` caps both models' contexts. `cache` (our model's `EncoderCache`) and
    `target_cache` (`make_target_cache`), given together, hold the same context: then
    `prompt` is only the tokens that follow it; both are left past the context, holding
    generated tokens (a chat trims them back).
    """
    if "fixed" in generation_kwargs:
        raise ValueError("fixed positions need block diffusion's own canvases; speculative drafting "
                         "verifies left to right: use stream_generate(..., fixed=...)")
    check_tokenizers(target_tokenizer, tokenizer)
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k (draft tokens per round) must be an integer >= 1 (got {k!r})")
    settings = resolve(defaults(model), max_denoising_steps=draft_steps, max_new_tokens=max_new_tokens,
                       mode=mode, fast=fast, seed=seed, target_temperature=temperature, **generation_kwargs)
    yield from speculate(target, target_tokenizer, model, tokenizer, prompt, settings, k=k, adaptive_k=adaptive_k,
                         max_context=max_context, cache=cache, target_cache=target_cache)


def speculate(target, target_tokenizer, model, tokenizer, prompt, settings: Settings, *, k: int,
              adaptive_k: bool = False, max_context: Optional[int] = None, cache=None,
              target_cache: Optional[list] = None) -> Iterator[Event]:
    """`speculative_stream_generate` with its settings resolved (the chat backend's call):
    `settings.gen` is our model's (its max_denoising_steps: the steps per proposal),
    `settings.target_temperature` the target's (None: greedy)."""
    ids = prompt_ids(target_tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty: the target needs at least one token to continue")
    if (cache is None) != (target_cache is None):
        raise ValueError("pass both caches (our model's and the target's, holding the same context) or neither")
    proposer = Proposer(model, settings, cache=cache)
    tgt = Target(target, cache=target_cache)
    limits = [proposer.denoiser.max_context, tgt.max_context]
    if max_context is not None:
        limits = [min(x, max_context) if x is not None else max_context for x in limits]
    max_new_tokens = settings.gen.max_new_tokens
    _check_contexts(proposer.denoiser.cached_tokens + len(ids), max_new_tokens + k, *limits)
    if settings.seed is not None:
        mx.random.seed(settings.seed)
    eos = set(int(e) for e in getattr(target_tokenizer, "eos_token_ids", None) or [])
    with on_device(model):
        yield from _rounds(tgt, proposer, ids, k, float(settings.target_temperature or 0.0), max_new_tokens,
                           eos, text_decoder(target_tokenizer), adaptive_k)


def next_block_size(size: int, kept: int, proposed: int, k: int) -> int:
    """Adaptive k, as transformers' "heuristic" schedule sizes an assistant model's
    proposals: two more drafts after a round that kept all it proposed, one fewer after a
    round that did not, within 1..k. Each rejected draft costs a drafter position and a
    verify position (and, on an MoE target, the experts it routes to), so a context where
    the drafter guesses badly gets shorter blocks."""
    if proposed and kept >= proposed:
        return min(size + 2, k)
    return max(1, size - 1)


def _rounds(tgt: Target, blocks: Proposer, ids: List[int], k: int, temperature: float,
            max_new_tokens: int, eos: set, decode, adaptive_k: bool = False) -> Iterator[Event]:
    tic = time.perf_counter()
    blocks.encode(ids)
    tgt.prefill(ids[:-1])
    prompt_time = time.perf_counter() - tic

    tic = time.perf_counter()
    generated: List[int] = []
    steps: List[int] = []
    text, finish, last, kept = "", "length", ids[-1], []
    size = k
    while len(generated) < max_new_tokens:
        if kept:
            blocks.accept(kept)  # the last round's tokens join the drafter's context
        n_draft = min(size, max_new_tokens - len(generated) - 1)
        drafts, q_logits, events = [], None, []
        if n_draft:
            drafts, q_logits, events = blocks.propose(n_draft, len(steps), temperature)
        yield from events
        logits = tgt.verify([last] + drafts)
        if logits.shape[-1] != blocks.denoiser.vocab_size:
            raise ValueError(f"the target scores {logits.shape[-1]} tokens, the drafter "
                             f"{blocks.denoiser.vocab_size}: use a Gemma 4 target of the same vocabulary")
        n, token = accept_block(logits, drafts, q_logits, temperature)
        tgt.rewind(len(drafts) - n)
        if adaptive_k:
            size = next_block_size(size, n, len(drafts), k)
        kept = drafts[:n] + [token]
        stop = next((i for i, t in enumerate(kept) if t in eos), None)
        if stop is not None:
            kept = kept[: stop + 1]
        generated.extend(kept)
        steps.append(len(events))
        new_text = ""
        if decode is not None:
            full = decode([t for t in generated if t not in eos])
            new_text, text = full[len(text):], full
        yield Commit(len(steps) - 1, kept, new_text, len(events), stop is not None)
        if stop is not None:
            finish = "eos"
            break
        last = kept[-1]
    gen_time = time.perf_counter() - tic
    yield _summary(generated, text, len(ids), steps, prompt_time, gen_time, finish, k, tgt, blocks)


def _summary(generated, text, n_prompt, steps, prompt_time, gen_time, finish, k, tgt, blocks):
    rounds = max(len(steps), 1)
    return SpeculativeSummary(
        tokens=generated,
        text=text,
        prompt_tokens=n_prompt,
        canvases=len(steps),
        steps_per_canvas=steps,
        tokens_per_forward=len(generated) / max(tgt.forwards, 1),
        prompt_time=prompt_time,
        prompt_tps=n_prompt / prompt_time if prompt_time > 0 else 0.0,
        generation_time=gen_time,
        generation_tps=len(generated) / gen_time if gen_time > 0 else 0.0,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
        block_size=k,
        acceptance_length=len(generated) / rounds,
        target_forwards=tgt.forwards,
        drafter_forwards=blocks.forwards,
    )


def speculative_generate(target, target_tokenizer, model, tokenizer, prompt, *, verbose: bool = False,
                         **kwargs) -> str:
    """`speculative_stream_generate`'s text."""
    return collect(speculative_stream_generate(target, target_tokenizer, model, tokenizer, prompt, **kwargs),
                   verbose)

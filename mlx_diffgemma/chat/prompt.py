"""A conversation's prompt and its stable part: `split_prompt` renders the chat template
and finds, without knowing the template, where the tokens that stay valid once this
turn is history end.

KV-cache reuse across turns
---------------------------
The Gemma 4 template ends the active turn's generation prompt with an empty thought
channel (`<|turn>model\\n<|channel>thought\\n<channel|>`), but renders the same turn as
history without it (`<|turn>model\\n{reply}<turn|>\\n`). The conversation-stable part of
a rendered prompt therefore ends right after the last `<|turn>model\\n`; everything after
it (the thought channel, then the reply's canvases that the drafter encodes while it
generates) is thrown away when the turn ends. The boundary is found without knowing the
template: render the conversation with a placeholder reply followed by one more user
turn (the reply is then history) and take the common prefix of that text, cut at the
placeholder, and the generation-prompt rendering (see `split_prompt`).

Per turn: the cache is back at the previous stable boundary; the new render must start
with the tokens the cache holds (else the cache is rolled back to the common prefix, or
reset and the whole conversation re-encoded, and the turn says so); only the new stable
tokens are encoded; the drafter gets the suffix (the thought channel) as its prompt; at
the end, interrupted or not, the cache goes back to the new stable boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..images.processor import render_with_images, split_image_parts
from ..models.tokenizer import encode_text, min_tokens, render

_PLACEHOLDER = "MLXDGREPLYPLACEHOLDER"


def common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class PromptSplit:
    ids: List[int]  # the full prompt, generation prompt included, images expanded
    stable: int  # ids[:stable] stay valid once this turn is history
    images: Any = None  # images.ImageInputs of the image blocks, in order
    blocks: List[Tuple[int, int]] = field(default_factory=list)  # [start, end) per image

    @property
    def suffix(self) -> List[int]:
        return self.ids[self.stable :]

    @property
    def keys(self) -> List[int]:
        """The ids as the cache remembers them: each image's tokens replaced by a
        negative number drawn from its pixels, so that a cached image is reused only
        for the same image (its token ids alone are the same for any image)."""
        if not self.blocks:
            return self.ids
        keys = list(self.ids)
        for (s, e), digest in zip(self.blocks, self.images.digests):
            keys[s:e] = [-1 - int(digest[:15], 16)] * (e - s)
        return keys

    def chunks(self, start: int, end: int, size: int) -> Iterator[Tuple[int, int, Any]]:
        """Encoder calls over ids[start:end]: (s, e, the images of ids[s:e] or None), of
        about `size` tokens, never cutting an image (its tokens attend to each other)."""
        s = start
        while s < end:
            e = min(s + size, end)
            for bs, be in self.blocks:
                if bs < e < be:
                    e = bs if bs > s else be
            inside = [k for k, (bs, be) in enumerate(self.blocks) if s <= bs and be <= e]
            yield s, e, self.images.select(inside) if inside else None
            s = e

    def block_start(self, i: int) -> int:
        """`i`, or the start of the image block it falls inside."""
        return next((bs for bs, be in self.blocks if bs < i < be), i)


def split_prompt(tokenizer, messages: Sequence[Dict[str, Any]],
                 tools: Optional[List[Dict[str, Any]]] = None, processor=None,
                 fits: Optional[Callable[[int], None]] = None) -> PromptSplit:
    """The generation prompt of `messages`, and how much of it is conversation-stable:
    the longest prefix that the next turn's rendering (this turn as history) repeats.
    Image content parts (`{"type": "image", "image": ...}`) are expanded by `processor`
    (images.Processor); the stable part holds them. `fits(n)`, when given, is called
    with a lower bound on the prompt's tokens before anything is tokenized (and raises
    when that is already too many: a huge prompt costs no tokenization)."""
    messages, sources = split_image_parts(messages)
    if sources and processor is None:
        raise ValueError("this conversation holds images but the model takes none")
    if sources:
        messages, full_text = render_with_images(tokenizer, messages, processor.tokens.image,
                                                 len(sources), tools=tools)
    else:
        full_text = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    if fits is not None:
        fits(min_tokens(tokenizer, full_text))
    history = list(messages) + [
        {"role": "assistant", "content": _PLACEHOLDER},
        {"role": "user", "content": "x"},
    ]
    try:
        hist_text = render(tokenizer, history, add_generation_prompt=False, tools=tools)
        cut = hist_text.find(_PLACEHOLDER)
    except Exception:  # a template that rejects the probe: no reuse of the model turn
        hist_text, cut = "", -1
    if cut < 0:
        hist_text = render(tokenizer, messages, add_generation_prompt=False, tools=tools)
        cut = len(hist_text)
    stable_text = full_text[: common_prefix_len(full_text, hist_text[:cut])]
    ids = encode_text(tokenizer, full_text)
    stable = common_prefix_len(ids, encode_text(tokenizer, stable_text))
    if not sources:
        return PromptSplit(ids, stable)
    prompt = processor(ids, sources)
    # Each placeholder before the boundary became its image's soft tokens plus two.
    placeholders = [i for i, t in enumerate(ids) if t == processor.tokens.image_id]
    stable += sum(n + 1 for i, n in zip(placeholders, prompt.images.num_soft_tokens) if i < stable)
    return PromptSplit(prompt.ids, stable, prompt.images, prompt.blocks)

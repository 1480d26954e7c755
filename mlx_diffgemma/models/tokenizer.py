"""The tokenizer and its chat template: loading it, rendering a conversation to text,
text to token ids, a cheap lower bound on a text's tokens, and where a prompt's images
sit. No MLX at import (mlx-lm's tokenizer wrapper is loaded when a tokenizer is)."""

from __future__ import annotations

import json
import math
import re
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .checkpoint import check_tokenizer_files, first_line
from .config import ConfigError

# Used only when a tokenizer ships no chat template at all (the released model has one).
GEMMA4_FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<turn|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n<|channel>thought\\n<channel|>' }}{% endif %}"
)


def load_tokenizer(model_path: Union[str, Path], eos_token_ids=None):
    """mlx-lm's TokenizerWrapper (streaming detokenizer included), or None when the
    directory carries no tokenizer."""
    model_path = Path(model_path)
    if not any((model_path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    check_tokenizer_files(model_path)
    try:
        return load_mlx_tokenizer(model_path, eos_token_ids=eos_token_ids)
    except Exception as e:  # transformers' errors vary by file and version
        raise ConfigError(f"cannot load the tokenizer in {model_path} ({first_line(e)}); "
                          "re-download or re-convert the model") from e


def _hf_tokenizer(tokenizer):
    """The transformers tokenizer inside mlx-lm's TokenizerWrapper (or the tokenizer)."""
    try:
        from mlx_lm.tokenizer_utils import TokenizerWrapper
    except ImportError:  # the torch path without mlx-lm
        return tokenizer
    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def ensure_chat_template(tokenizer, model_path: Optional[Path]) -> str:
    """Makes sure the tokenizer has a chat template: transformers reads an external
    `chat_template.jinja` next to tokenizer_config.json itself; older stacks do not, so
    it is loaded here when missing. Returns where the template came from."""
    hf = _hf_tokenizer(tokenizer)
    if getattr(hf, "chat_template", None):
        return "tokenizer"
    if model_path is not None and (Path(model_path) / "chat_template.jinja").exists():
        hf.chat_template = (Path(model_path) / "chat_template.jinja").read_text()
        return "chat_template.jinja"
    hf.chat_template = GEMMA4_FALLBACK_TEMPLATE
    return "built-in Gemma 4 template"


def render(tokenizer, messages: Sequence[Dict[str, Any]], add_generation_prompt: bool,
           tools: Optional[List[Dict[str, Any]]] = None) -> str:
    """The chat template applied to `messages` (and `tools`, the OpenAI-style function
    schemas the template renders into the prompt)."""
    from jinja2 import TemplateError

    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        )
    except TemplateError as e:  # e.g. the template's raise_exception on a role it refuses
        raise ValueError(f"the chat template rejects this conversation: {e}") from None
    except RecursionError:  # a template recursing into deeply nested tool schemas
        raise ValueError("the chat template cannot render this conversation: it nests too "
                         "deeply") from None


def check_text(text: str, what: str) -> str:
    """`text`, when it can be encoded: undecodable input bytes reach Python as lone
    surrogates (surrogateescape), which no tokenizer or terminal takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text; type or paste it again") from None
    return text


def encode_text(tokenizer, text: str) -> List[int]:
    """Token ids of already-templated text: no BOS added (the template wrote it)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return [int(t) for t in ids]


# -- a cheap lower bound on a text's token count ----------------------------------------------

# tokenizers' normalizers and pre-tokenizers that never shorten a text: they replace one
# character by one or more, split, or add.
_KEEPS_LENGTH = {"Prepend", "Lowercase", "NFD", "NFKD", "ByteLevel", "Metaspace", "Digits",
                 "Punctuation", "UnicodeScripts", "CharDelimiterSplit"}
_REGEX_CHARS = set("\\.^$*+?{}[]|()")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_MAX_TOKEN_CHARS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _shrink_factor(spec: Optional[Dict[str, Any]]) -> Optional[float]:
    """How many times shorter a normalizer or pre-tokenizer (tokenizer.json's spec) can
    make a text: 1 for those that only replace, split or add; None when unknown or when
    it may drop characters (strip, accents, whitespace splitting)."""
    if spec is None:
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1.0
        for part in spec.get("normalizers") or spec.get("pretokenizers") or []:
            f = _shrink_factor(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Replace":
        pattern = spec.get("pattern") or {}
        text = pattern.get("String", pattern.get("Regex"))
        if not isinstance(text, str) or not text or ("Regex" in pattern and _REGEX_CHARS & set(text)):
            return None  # a real regular expression: any length may be replaced
        content = spec.get("content") or ""
        return max(1.0, len(text) / len(content)) if content else None
    if kind == "Split":
        return None if spec.get("behavior") == "Removed" else 1.0
    return 1.0 if kind in _KEEPS_LENGTH else None


def max_token_chars(tokenizer) -> Optional[float]:
    """The most input characters one token of `tokenizer` can stand for (its longest
    vocabulary entry, special tokens included, a byte-fallback token counting one, times
    what normalization may shorten), or None when that cannot be known (no `tokenizers`
    BPE backend, or a normalizer that may drop characters). Computed once per tokenizer."""
    hf = _hf_tokenizer(tokenizer)
    try:
        return _MAX_TOKEN_CHARS[hf]
    except (KeyError, TypeError):
        pass
    backend = getattr(hf, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    value = None
    # BPE only: there a character without a token becomes byte tokens, or one <unk> each
    # unless fuse_unk (one <unk> for a whole run, of any length); Unigram and WordPiece
    # fuse unknown runs or words.
    if type(model).__name__ == "BPE" and (model.byte_fallback or not model.fuse_unk):
        specs = [json.loads(p.__getstate__()) if p is not None else None
                 for p in (backend.normalizer, backend.pre_tokenizer)]
        factors = [_shrink_factor(s) for s in specs]
        if None not in factors:
            longest = max((1 if _BYTE_TOKEN.fullmatch(t) else len(t)
                           for t in backend.get_vocab(with_added_tokens=True)), default=0)
            value = float(max(longest, 1) * factors[0] * factors[1])
    try:
        _MAX_TOKEN_CHARS[hf] = value
    except TypeError:  # not weakly referenceable: computed again next time
        pass
    return value


def min_tokens(tokenizer, text: str) -> int:
    """A lower bound on the tokens `text` encodes to, without encoding it: no token stands
    for more than `max_token_chars` characters. Lets a prompt far over the context be
    refused at once instead of tokenized whole (which for a 15 MB text takes tens of
    seconds and gigabytes). 0 when the tokenizer gives no such bound."""
    chars = max_token_chars(tokenizer)
    if not chars:
        return 0
    return math.ceil(len(text) / chars)


def image_blocks(is_image: np.ndarray) -> List[Tuple[int, int]]:
    """[start, end) of each contiguous run of True in a 1-D mask (the image tokens of a
    prompt: the processor's expansion and the encoder's bidirectional blocks)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(is_image, dtype=np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]

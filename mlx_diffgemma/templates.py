"""Chat templates: rendering a conversation to text and text to token ids (no MLX).
Used by the chat session (session.py) and the image processor (images.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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

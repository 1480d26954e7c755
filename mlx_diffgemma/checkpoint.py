"""The files of a model directory other than the weights' bytes: checks that the
tokenizer files and chat templates parse, shared by the MLX loader, the torch path and
`verify`. Imports no array framework."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError, read_json_object


class WeightsError(ValueError):
    """A checkpoint whose tensors do not match the model its config describes, or whose
    weight files are missing or damaged."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors that wrap another."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def check_tokenizer_files(model_path: Path) -> None:
    """The tokenizer's JSON files and chat templates parse, else a ConfigError naming the
    file (transformers would fail later with a bare JSONDecodeError or TemplateSyntaxError)."""
    for name in TOKENIZER_JSON_FILES:
        if (model_path / name).exists():
            data = read_json_object(model_path / name)
            if name == "tokenizer_config.json" and data.get("chat_template") is not None:
                _check_chat_template(data["chat_template"], f"{model_path / name}: chat_template")
    template = model_path / CHAT_TEMPLATE_FILE
    if template.exists():
        try:
            text = template.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{template} is not UTF-8 text ({e.reason}); fix or remove it") from None
        _check_chat_template(text, str(template))


def _check_chat_template(template: Any, where: str) -> None:
    """A chat template (a string, or transformers' list of {name, template}) compiles."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("template"), str) for t in template
    ):
        sources = [t["template"] for t in template]
    elif isinstance(template, str):
        sources = [template]
    else:
        raise ConfigError(f"{where} must be a string or a list of {{name, template}} objects")
    for source in sources:
        try:
            _compile_jinja_template(source)
        except TemplateError as e:
            line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
            raise ConfigError(f"{where} is not a valid Jinja template ({e}{line}); fix it") from None

"""OpenAI request bodies -> what a generation needs, with every client mistake turned into
an `APIError` (OpenAI's error shape, a 4xx status). No HTTP and no model calls here.

Sampling knobs: this sampler has no nucleus (top_p) and no single temperature; each
denoising step samples at a temperature on a linear schedule from `t_max` (first step)
to `t_min` (last). OpenAI's `temperature` T scales that schedule: T=1 is the
checkpoint's own (0.8 -> 0.4 for the release), T=0.5 halves both ends, and so on
(0 < T <= 2; 0 is refused because the last step divides the logits by t_min).
`top_p` must be 1, `n` 1, penalties 0; anything else is refused, never ignored. The
diffusion knobs (`max_denoising_steps`, `entropy_bound`, `stability_threshold`,
`confidence_threshold`, `t_min`, `t_max`) are accepted as extra fields, as are
`stream_drafts`, `ignore_eos` and `mode` ("reference" or "fast").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import unquote

from ..models.config import SEED_MAX, GenerationConfig
from ..generation.loop import MODES

ROLES = ("system", "developer", "user", "assistant", "tool")
GEN_EXTRAS = {
    "max_denoising_steps": int,
    "entropy_bound": float,
    "stability_threshold": int,
    "confidence_threshold": float,
    "t_min": float,
    "t_max": float,
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param, code)


# Deeper JSON is refused: no request needs it, and the parser and the chat template recurse.
MAX_DEPTH = 64


def parse_json(raw: bytes) -> Dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise bad(f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    check_values(body)
    return body


def check_values(body: Dict[str, Any]) -> None:
    """Refuses what valid JSON can hold but no request may: nesting deeper than
    MAX_DEPTH, and strings that are no text (a lone UTF-16 surrogate such as "\\ud800",
    which JSON's escapes allow and no tokenizer takes). Walks the body without recursion."""
    stack: List[tuple] = [(body, "", 0, None)]  # (value, where it is, depth, top-level key)
    while stack:
        value, where, depth, param = stack.pop()
        if depth > MAX_DEPTH:
            raise bad(f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
        if isinstance(value, str):
            _check_text(value, where, param)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"a key of {where or 'the body'}", param)
                stack.append((item, f"{where}.{key}" if where else key, depth + 1, param or key))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1, param) for i, item in enumerate(value))


def _check_text(text: str, where: str, param: Optional[str]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{where} is not valid text: it holds a lone UTF-16 surrogate "
                  f"({text[e.start]!r} at character {e.start}); send valid Unicode", param) from None


def number(body: Dict[str, Any], key: str, kind: type, lo=None, hi=None, lo_open=False):
    """body[key] as `kind` (None when absent or null), held to [lo, hi]."""
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or (kind is float and not math.isfinite(value)):
        raise bad(f"{key} must be {'an integer' if kind is int else 'a number'} (got {value!r})", key)
    value = kind(value)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        span = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise bad(f"{key} must be {span} (got {value!r})", key)
    return value


def flag(body: Dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{key} must be true or false (got {value!r})", key)
    return value


def check_unsupported(body: Dict[str, Any]) -> None:
    """OpenAI fields this sampler cannot honour: refused unless at their neutral value."""
    if body.get("mode") is not None and body.get("mode") not in MODES:
        raise bad(f"mode must be one of {', '.join(MODES)} (got {body.get('mode')!r})", "mode")
    for key, neutral in (("top_p", 1), ("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0)):
        if body.get(key) is not None and body.get(key) != neutral:
            raise bad(f"{key}={body.get(key)!r} is not supported: the block-diffusion sampler "
                      f"has no such control (only {key}={neutral})", key)
    for key in ("logprobs", "top_logprobs", "echo", "logit_bias", "suffix"):
        if body.get(key) not in (None, False, 0, {}, ""):
            raise bad(f"{key} is not supported by this server", key)
    if body.get("best_of") not in (None, 1):
        raise bad("best_of is not supported by this server", "best_of")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("response_format other than {\"type\": \"text\"} is not supported: this "
                  "sampler cannot constrain its output", "response_format")


def stop_strings(body: Dict[str, Any]) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not 1 <= len(stops) <= 4
            or not all(isinstance(s, str) and s for s in stops)):
        raise bad("stop must be a non-empty string or a list of 1 to 4 of them", "stop")
    return stops


def generation_overrides(body: Dict[str, Any], defaults: GenerationConfig) -> Dict[str, Any]:
    """GenerationConfig overrides from a request: the diffusion knobs, max_tokens and
    the temperature scaling; validated together (ValueError -> 400)."""
    out: Dict[str, Any] = {}
    for key, kind in GEN_EXTRAS.items():
        value = number(body, key, kind)
        if value is not None:
            out[key] = value
    for key in ("max_completion_tokens", "max_tokens"):
        value = number(body, key, int, lo=1)
        if value is not None:
            out["max_new_tokens"] = value
            break
    temperature = number(body, "temperature", float, lo=0, hi=2, lo_open=True)
    if flag(body, "ignore_eos"):
        out["eos_token_id"] = None
    try:
        gen = defaults.with_overrides(**out)
        if temperature is not None:
            out["t_min"], out["t_max"] = gen.t_min * temperature, gen.t_max * temperature
            gen = defaults.with_overrides(**out)
    except ValueError as e:
        raise bad(str(e), "temperature" if temperature is not None else None) from None
    return out


def seed_of(body: Dict[str, Any]) -> Optional[int]:
    return number(body, "seed", int, lo=0, hi=SEED_MAX)


@dataclass
class Options:
    """What every generation request carries besides its prompt."""

    gen_kwargs: Dict[str, Any]
    max_tokens: int
    seed: Optional[int]
    stop: List[str]
    stream: bool
    include_usage: bool
    stream_drafts: bool
    mode: Optional[str] = None  # None: the server's
    target_temperature: Optional[float] = None  # with a target model: its temperature


def options(body: Dict[str, Any], defaults: GenerationConfig, target: bool = False) -> Options:
    """A request's options. With a `target` model, `temperature` is the target's sampling
    temperature (0 to 2; 0: greedy), not a scale of the denoising schedule."""
    check_unsupported(body)
    target_temperature = None
    if target:
        target_temperature = number(body, "temperature", float, lo=0, hi=2)
        body = {k: v for k, v in body.items() if k != "temperature"}
    gen_kwargs = generation_overrides(body, defaults)
    max_tokens = gen_kwargs.get("max_new_tokens", defaults.max_new_tokens)
    stream = flag(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options must be an object", "stream_options")
    include_usage = flag(so or {}, "include_usage")
    return Options(gen_kwargs, max_tokens, seed_of(body), stop_strings(body), stream,
                   include_usage, flag(body, "stream_drafts"), body.get("mode"), target_temperature)


# -- messages and tools ------------------------------------------------------------------


def image_source(part: Dict[str, Any], where: str, image_dirs: Sequence[Path] = ()) -> str:
    """The image of an OpenAI `image_url` content part: a data URL as is, or a local
    file (file:// URL or absolute path) inside one of `image_dirs`, as its resolved path.
    Remote URLs are never fetched; without `image_dirs` no local file is read."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url:
        raise bad(f"{where}: an image_url part needs {{\"image_url\": {{\"url\": ...}}}}", "messages")
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        raise bad(f"{where}: remote image URLs are not fetched by this server; send the image "
                  "as a data URL (data:image/png;base64,...)", "messages", "invalid_image")
    path = unquote(url[len("file://"):]) if url.startswith("file://") else url
    if not image_dirs:
        raise bad(f"{where}: local image files are off on this server; send a data URL, or "
                  "start the server with --image-dir DIR", "messages", "invalid_image")
    resolved = Path(path).expanduser().resolve()
    if not Path(path).expanduser().is_absolute() or not any(
            resolved.is_relative_to(d) for d in image_dirs):
        allowed = ", ".join(str(d) for d in image_dirs)
        raise bad(f"{where}: {path} is not an absolute path inside the image directories "
                  f"({allowed}); move the file there or send a data URL", "messages", "invalid_image")
    return str(resolved)


def _content(content: Any, where: str, image_dirs: Sequence[Path]) -> Any:
    """A message's content: text, or (when it holds images) content parts as chat
    templates take them: `{"type": "text", ...}` and `{"type": "image", "image": source}`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: List[Dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                parts.append({"type": "image", "image": image_source(part, where, image_dirs)})
            else:
                raise bad(f"{where}: content parts must be text or image_url", "messages")
        if not any(p["type"] == "image" for p in parts):
            return "".join(p["text"] for p in parts)
        return parts
    raise bad(f"{where}: content must be a string or a list of text and image_url parts", "messages")


def _tool_call(call: Any, where: str) -> Dict[str, Any]:
    """An assistant's OpenAI tool call as chat templates take it (arguments as a dict)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(f"{where}: each tool call needs a function with a name", "messages")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise bad(f"{where}: tool call arguments are not valid JSON", "messages") from None
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


def chat_messages(body: Dict[str, Any], image_dirs: Sequence[Path] = ()) -> List[Dict[str, Any]]:
    """The request's messages as chat templates take them (`image_source` says which
    images are accepted)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list", "messages")
    out: List[Dict[str, Any]] = []
    names: Dict[str, str] = {}  # tool_call_id -> function name, for tool results
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"{where}: role must be one of {', '.join(ROLES)}", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        msg: Dict[str, Any] = {"role": role, "content": _content(m.get("content"), where, image_dirs)}
        if isinstance(msg["content"], list) and role != "user":
            raise bad(f"{where}: images go in user messages", "messages")
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise bad(f"{where}: tool_calls must be a list", "messages")
            msg["tool_calls"] = [_tool_call(c, where) for c in m["tool_calls"]]
            names.update({c["id"]: c["function"]["name"] for c in msg["tool_calls"] if c["id"]})
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
                raise bad(f"{where}: a tool message needs the tool_call_id of the call it answers",
                          "messages")
            msg["tool_call_id"] = m["tool_call_id"]
            name = m.get("name") or names.get(m.get("tool_call_id"))
            if name:
                msg["name"] = name
        out.append(msg)
    return out


def chat_tools(body: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad("tool_choice may be \"auto\" or \"none\": this sampler cannot force a call",
                  "tool_choice")
    if tools is None or choice == "none":
        return None
    if (not isinstance(tools, list)
            or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                       and isinstance(t["function"].get("name"), str) for t in tools)):
        raise bad("tools must be a list of {\"type\": \"function\", \"function\": {\"name\", ...}}",
                  "tools")
    return tools or None

"""OpenAI's dialect: request bodies -> what a generation needs (its `Settings`, the
messages and tools), with every client mistake turned into an `APIError` (OpenAI's
error shape, a 4xx status); and the response shapes. No HTTP and no model calls here.

Sampling knobs: this sampler has no nucleus (top_p) and no single temperature; each
denoising step samples at a temperature on a linear schedule from `t_max` (first step)
to `t_min` (last). OpenAI's `temperature` T scales that schedule: T=1 is the
checkpoint's own (0.8 -> 0.4 for the release), T=0.5 halves both ends, and so on
(0 < T <= 2; 0 is refused because the last step divides the logits by t_min).
`top_p` must be 1, `n` 1, penalties 0; anything else is refused, never ignored. The
diffusion knobs (`max_denoising_steps`, `entropy_bound`, `stability_threshold`,
`confidence_threshold`, `t_min`, `t_max`) are accepted as extra fields, as are
`stream_drafts`, `ignore_eos` and `mode` ("reference" or "fast"). With a target model
(speculative drafting), `temperature` is the target's (0 to 2; 0: greedy) and
`max_denoising_steps` our model's steps per proposal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import unquote

from ..generation.settings import SEED_MAX, Settings, SettingsError, resolve
from ..models.config import GenerationConfigError

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
    for key, neutral in (("top_p", 1), ("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0)):
        if body.get(key) is not None and body.get(key) != neutral:
            raise bad(f"{key}={body.get(key)!r} is not supported: the block-diffusion sampler "
                      f"has no such control (only {key}={neutral})", key)
    for key in ("logprobs", "top_logprobs", "echo", "logit_bias"):
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


def request_settings(body: Dict[str, Any], base: Settings, target: bool = False,
                     backend: str = "mlx") -> Settings:
    """The request's Settings: `base` (the server's) with the diffusion knobs, max_tokens,
    the seed, the mode and the temperature; checked together by `resolve`. Without a
    target `temperature` T scales the denoising schedule (t_min and t_max, the request's
    own or the server's, times T); with one it is the target's sampling temperature.
    `backend`: the server's ("mlx" or "torch": fast mode runs on MLX only)."""
    changes: Dict[str, Any] = {}
    for key, kind in GEN_EXTRAS.items():
        value = number(body, key, kind)
        if value is not None:
            changes[key] = value
    for key in ("max_completion_tokens", "max_tokens"):
        value = number(body, key, int, lo=1)
        if value is not None:
            changes["max_new_tokens"] = value
            break
    if flag(body, "ignore_eos"):
        changes["eos_token_id"] = None
    seed = number(body, "seed", int, lo=0, hi=SEED_MAX)
    if seed is not None:
        changes["seed"] = seed
    if body.get("mode") is not None:
        changes["mode"] = body["mode"]
    temperature = number(body, "temperature", float, lo=0, hi=2, lo_open=not target)
    if temperature is not None and target:
        changes["target_temperature"] = temperature
    elif temperature is not None:
        for key in ("t_min", "t_max"):
            changes[key] = changes.get(key, getattr(base.gen, key)) * temperature
    try:
        return resolve(base, backend=backend, **changes)
    except (SettingsError, GenerationConfigError) as e:
        scaled = temperature is not None and e.field in ("t_min", "t_max")
        raise bad(str(e), "temperature" if scaled else e.field) from None


@dataclass
class Options:
    """What every generation request carries besides its prompt."""

    settings: Settings
    stop: List[str]
    stream: bool
    include_usage: bool
    stream_drafts: bool


def options(body: Dict[str, Any], base: Settings, target: bool = False, backend: str = "mlx") -> Options:
    """A request's options (`request_settings` says what `target` and `backend` change)."""
    check_unsupported(body)
    settings = request_settings(body, base, target, backend)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options must be an object", "stream_options")
    return Options(settings, stop_strings(body), flag(body, "stream"), flag(so or {}, "include_usage"),
                   flag(body, "stream_drafts"))


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


# -- responses (a `requests.Job` and the `engine.Output` of its reply) ----------------------


def chunk(job, choice: Optional[Dict[str, Any]], **extra) -> Dict[str, Any]:
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    out = {"id": job.id, "object": obj, "created": job.created, "model": job.model,
           "choices": [] if choice is None else [choice]}
    out.update(extra)
    return out


def delta_choice(job, content: str = "", reasoning: str = "", finish=None,
                 tool_calls=None, role: bool = False) -> Dict[str, Any]:
    if job.kind == "completion":
        return {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
    delta: Dict[str, Any] = {"role": "assistant"} if role else {}
    if content or role:
        delta["content"] = content
    if reasoning:
        delta["reasoning_content"] = reasoning
    if tool_calls:
        delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(tool_calls)]
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def full_response(job, out) -> Dict[str, Any]:
    if job.kind == "completion":
        choice = {"index": 0, "text": out.content, "logprobs": None, "finish_reason": out.finish_reason}
        obj = "text_completion"
    else:
        message: Dict[str, Any] = {"role": "assistant",
                                   "content": out.content if out.content or not out.tool_calls else None}
        if out.reasoning:
            message["reasoning_content"] = out.reasoning
        if out.tool_calls:
            message["tool_calls"] = out.tool_calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": out.finish_reason}
        obj = "chat.completion"
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model,
            "choices": [choice], "usage": out.usage()}

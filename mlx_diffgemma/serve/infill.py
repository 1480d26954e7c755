"""Infill requests over HTTP: OpenAI's `suffix` on /v1/completions and llama.cpp's
`POST /infill`, turned into an infill turn's arguments (generation/infilling.py), and
llama.cpp's reply shapes. No HTTP and no model calls here (requests.py and http.py use
it).

llama.cpp's /infill body: `input_prefix`, `input_suffix`, `input_extra` (a list of
`{"filename", "text"}` context chunks), `prompt` (text after the prefix that the middle
continues), `n_predict` (-1: the server's max), `stream`, `seed`, `temperature`, `stop`.
The encoder reads the extra chunks as "{filename}\\n{text}\\n", then the prefix and the
prompt (llama.cpp's layout without FIM tokens: this model has none); the canvas holds the
middle and the suffix. A suffix too long for the canvas is cut to its head, as llama.cpp
cuts its inputs, and the reply says `"truncated": true`. llama.cpp's sampler-chain fields,
which have no counterpart in this sampler, are accepted and listed under
`generation_settings.ignored` (editor clients always send them).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..generation.infilling import check_lengths
from .openai import bad

# llama.cpp's sampler and server fields this sampler has no control for.
LLAMA_IGNORED = ("top_k", "top_p", "min_p", "samplers", "typical_p", "repeat_penalty", "repeat_last_n",
                 "presence_penalty", "frequency_penalty", "cache_prompt", "t_max_prompt_ms",
                 "t_max_predict_ms", "n_indent", "response_fields", "n_probs", "id_slot")


def infill_options(body: Dict[str, Any]) -> Dict[str, Any]:
    """The infill extras of a request: `infill_lengths` (a list) or `infill_length` (an
    int) for the middle's candidate lengths, and `truncate_suffix`."""
    lengths, key = body.get("infill_lengths"), "infill_lengths"
    if body.get("infill_length") is not None:
        if lengths is not None:
            raise bad("give infill_lengths or infill_length, not both", "infill_lengths")
        lengths, key = body["infill_length"], "infill_length"
    out: Dict[str, Any] = {}
    if lengths is not None:
        try:
            out["lengths"] = check_lengths(lengths)
        except ValueError as e:
            raise bad(str(e), key) from None
    truncate = body.get("truncate_suffix", False)
    if not isinstance(truncate, bool):
        raise bad(f"truncate_suffix must be true or false (got {truncate!r})", "truncate_suffix")
    out["truncate_suffix"] = truncate
    return out


def completion_suffix(body: Dict[str, Any]) -> Optional[str]:
    """/v1/completions' `suffix` (None when absent or empty)."""
    suffix = body.get("suffix")
    if suffix in (None, ""):
        return None
    if not isinstance(suffix, str):
        raise bad(f"suffix must be a string (got {type(suffix).__name__})", "suffix")
    return suffix


def llama_request(body: Dict[str, Any]) -> Tuple[str, str, Dict[str, Any], List[str]]:
    """(encoder text, suffix text, an OpenAI-style body for the options, ignored fields) of
    a llama.cpp /infill body."""
    texts = {}
    for key in ("input_prefix", "input_suffix", "prompt"):
        value = body.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise bad(f"{key} must be a string (got {type(value).__name__})", key)
        texts[key] = value
    extra = body.get("input_extra", [])
    if extra is None:
        extra = []
    if not isinstance(extra, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text", ""), str) and isinstance(c.get("filename", ""), str)
            for c in extra):
        raise bad("input_extra must be a list of {\"filename\": str, \"text\": str}", "input_extra")
    context = "".join(f"{c.get('filename', '')}\n{c.get('text', '')}\n" for c in extra)
    prefix = context + texts["input_prefix"] + texts["prompt"]
    if not prefix:
        raise bad("input_prefix, prompt or input_extra must hold some text", "input_prefix")
    if not texts["input_suffix"]:
        raise bad("input_suffix must be a non-empty string: without one, use /v1/completions", "input_suffix")
    ignored = [k for k in LLAMA_IGNORED if k in body]
    translated = {k: v for k, v in body.items() if k not in LLAMA_IGNORED and k not in texts
                  and k not in ("input_extra", "n_predict", "model")}
    if translated.get("temperature") == 0:  # greedy: no such control here
        translated.pop("temperature")
        ignored.append("temperature")
    n_predict = body.get("n_predict")
    if n_predict is not None:
        if isinstance(n_predict, bool) or not isinstance(n_predict, int) or (n_predict < 1 and n_predict != -1):
            raise bad(f"n_predict must be -1 (the server's maximum) or >= 1 (got {n_predict!r})", "n_predict")
        if n_predict >= 1:
            translated["max_tokens"] = n_predict
    translated["truncate_suffix"] = True
    return prefix, texts["input_suffix"], translated, ignored


def stop_type(out) -> Tuple[str, str]:
    """(llama.cpp's stop_type, stopping_word) of a finished `engine.Output`."""
    if out.finish == "length":
        return "limit", ""
    full = out.parser.parse(out.ids).content
    for word in out.job.opts.stop:
        if full[len(out.content):].startswith(word):
            return "word", word
    return "eos", ""


def llama_response(job, out, content: Optional[str] = None) -> Dict[str, Any]:
    """llama.cpp's /infill reply object (`content`: the text to put in it; the whole
    middle by default, what is left to send at a stream's end)."""
    summary, prefill = out.summary, out.prefill
    kind, word = stop_type(out)
    prompt_s = (prefill.time if prefill is not None else 0.0) + (summary.prompt_time if summary is not None else 0.0)
    prompt_ms, predict_ms = 1000 * prompt_s, 1000 * (summary.generation_time if summary is not None else 0.0)
    n = len(out.ids)
    settings = job.opts.settings
    return {
        "content": out.content if content is None else content, "tokens": [], "stop": True,
        "model": job.model, "tokens_predicted": n, "tokens_evaluated": len(job.split.ids),
        "tokens_cached": out.cached, "truncated": bool(summary is not None and summary.suffix_dropped),
        "stop_type": kind, "stopping_word": word,
        "generation_settings": dict(settings.describe(), n_predict=settings.gen.max_new_tokens,
                                    ignored=job.ignored),
        "timings": {"prompt_n": len(job.split.ids) - out.cached, "prompt_ms": prompt_ms, "predicted_n": n,
                    "predicted_ms": predict_ms,
                    "predicted_per_second": n / (predict_ms / 1000) if predict_ms > 0 else 0.0},
        "infill": {"length": summary.length if summary is not None else 0,
                   "scores": {str(k): v for k, v in (summary.scores if summary is not None else {}).items()}},
    }

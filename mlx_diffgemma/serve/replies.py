"""What a reply's token ids say, for the server: visible content, thinking, tool calls.

The chat REPL decodes replies with `skip_special_tokens=True`, which would drop Gemma 4's
markers (`<|channel>`, `<|tool_call>`, the `<|"|>` string delimiter) and leave thinking
in the content and tool calls as unparseable text. Here the ids are decoded *without*
skipping; thinking (`<|channel>...<channel|>`) and tool calls (`<|tool_call>...
<tool_call|>`) are cut out first, and only then are the remaining special tokens removed
from the content. Tool calls are parsed by mlx-lm's parser for the checkpoint (inferred
by its `TokenizerWrapper` from the chat template; Gemma 4's otherwise).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

THINK_START, THINK_END = "<|channel>", "<channel|>"
THOUGHT_LABEL = "thought\n"  # Gemma 4 names its thinking channel


@dataclass
class Parsed:
    content: str
    reasoning: str
    tool_calls: List[Dict[str, Any]] = field(default_factory=list)
    open_region: bool = False  # ends inside thinking or a tool call (more may come)


def _special_strings(tokenizer) -> List[str]:
    from ..models.tokenizer import _hf_tokenizer

    hf = _hf_tokenizer(tokenizer)
    names = set(getattr(hf, "all_special_tokens", []) or [])
    for tok in (getattr(hf, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            names.add(tok.content)
    return sorted((n for n in names if n), key=len, reverse=True)


class ReplyParser:
    def __init__(self, tokenizer, tools: Optional[List[Dict[str, Any]]] = None):
        from mlx_lm.tool_parsers import gemma4

        self.tokenizer = tokenizer
        self.tools = tools
        self.specials = _special_strings(tokenizer)
        parser = getattr(tokenizer, "tool_parser", None)
        if parser is not None:
            self.tool_start = tokenizer.tool_call_start
            self.tool_end = tokenizer.tool_call_end
            self.parse_tool = parser
        else:
            self.tool_start, self.tool_end = gemma4.tool_call_start, gemma4.tool_call_end
            self.parse_tool = gemma4.parse_tool_call

    def clean(self, text: str) -> str:
        """`text` without special tokens (as skip_special_tokens would decode it)."""
        for s in self.specials:
            if s in text:
                text = text.replace(s, "")
        return text

    def parse(self, ids: Sequence[int]) -> Parsed:
        raw = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return self.parse_text(raw)

    def parse_text(self, raw: str) -> Parsed:
        content: List[str] = []
        reasoning: List[str] = []
        calls: List[Dict[str, Any]] = []
        pos, open_region = 0, False
        while pos < len(raw):
            starts = [(raw.find(m, pos), m) for m in (THINK_START, self.tool_start)]
            starts = [(i, m) for i, m in starts if i >= 0]
            if not starts:
                content.append(raw[pos:])
                break
            i, marker = min(starts)
            content.append(raw[pos:i])
            end_marker = THINK_END if marker == THINK_START else self.tool_end
            j = raw.find(end_marker, i + len(marker))
            body = raw[i + len(marker): j if j >= 0 else len(raw)]
            open_region = j < 0
            if marker == THINK_START:
                reasoning.append(body[len(THOUGHT_LABEL):] if body.startswith(THOUGHT_LABEL) else body)
            elif not open_region:
                parsed = self._tool_calls(body)
                if parsed is None:  # not a call this parser reads: leave the text visible
                    content.append(body)
                calls.extend(parsed or [])
            pos = len(raw) if j < 0 else j + len(end_marker)
        return Parsed(self.clean("".join(content)), self.clean("".join(reasoning)).strip(),
                      calls, open_region)

    def _tool_calls(self, body: str) -> Optional[List[Dict[str, Any]]]:
        """OpenAI `tool_calls` entries for one marked region, or None when it does not parse."""
        try:
            out = self.parse_tool(body, self.tools)
        except Exception:
            return None
        out = out if isinstance(out, list) else [out]
        calls = []
        for call in out:
            args = call.get("arguments", {})
            calls.append({
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": str(call.get("name", "")),
                    "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
                },
            })
        return calls


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Where the first stop string starts in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1

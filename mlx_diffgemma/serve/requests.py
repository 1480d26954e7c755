"""OpenAI request bodies -> `Job`s for the engine: the model name, the request's
`Settings` (openai.py's dialect, resolved once: the one GenerationConfig a request
builds), the prompt split (chat template, images) and the context check that makes a
prompt too long for its reply a 400 before it queues."""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Optional, Sequence

from ..chat.prompt import PromptSplit, split_prompt
from ..generation.infilling import plan
from ..images.load import ImageError
from ..images.processor import load_message_images
from ..models.tokenizer import encode_text, min_tokens
from . import openai
from .infill import completion_suffix, infill_options, llama_request
from .openai import APIError, bad


class Job:
    """A validated request: its prompt split, options and how to answer it."""

    def __init__(self, kind: str, split: PromptSplit, opts: openai.Options, model: str,
                 tools: Optional[List[Dict[str, Any]]] = None, infill: Optional[Dict[str, Any]] = None,
                 ignored: Sequence[str] = ()):
        self.kind = kind  # "chat", "completion" or "infill" (llama.cpp's /infill)
        self.split = split
        self.opts = opts
        self.model = model
        self.tools = tools
        self.infill = infill  # the middle before a suffix: session.complete's `infill`
        self.ignored = list(ignored)  # request fields accepted without effect (/infill)
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())


class Requests:
    """Builds jobs for the models `names` (the first is the served id) served by `session`
    (its settings are the server's defaults; `target`: a speculative backend's, whose
    `temperature` is the target's); `image_dirs`: the directories whose files
    `image_url` parts may name."""

    def __init__(self, session, names: Sequence[str], image_dirs: Sequence, target: bool = False):
        self.session, self.tokenizer = session, session.tokenizer
        self.model_id, self.names = names[0], set(names)
        self.image_dirs, self.target = list(image_dirs), target

    def check_model(self, body: Dict[str, Any]) -> str:
        name = body.get("model")
        if name is None:
            return self.model_id
        if name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_id!r}", "model", "model_not_found")
        return name

    def options(self, body: Dict[str, Any]) -> openai.Options:
        return openai.options(body, self.session.settings, self.target, self.session.backend.name)

    def check_context(self, n_tokens: int, opts: openai.Options, param: str, at_least: bool = False) -> None:
        """A 400 `context_length_exceeded` for a prompt of `n_tokens` (`at_least`: a lower
        bound taken before tokenizing) whose reply could outrun the context."""
        try:
            self.session.check_context(n_tokens, opts.settings, "shorten the prompt or lower max_tokens", at_least)
        except ValueError as e:
            raise bad(str(e), param, "context_length_exceeded") from None

    def chat(self, body: Dict[str, Any]) -> Job:
        model = self.check_model(body)
        opts = self.options(body)
        if body.get("suffix") not in (None, ""):
            raise bad("suffix is a /v1/completions field: send the prompt and the suffix there", "suffix")
        messages, tools = openai.chat_messages(body, self.image_dirs), openai.chat_tools(body)
        try:
            if any(isinstance(m.get("content"), list) for m in messages):
                messages = load_message_images(messages)  # each file's own problem first
        except ImageError as e:
            raise bad(str(e), "messages", "invalid_image") from None
        try:
            split = split_prompt(self.tokenizer, messages, tools=tools, processor=self._processor(messages),
                                 fits=lambda n: self.check_context(n, opts, "messages", at_least=True))
        except ImageError as e:
            raise bad(str(e), "messages", "invalid_image") from None
        except ValueError as e:
            raise bad(str(e), "messages") from None
        self.check_context(len(split.ids), opts, "messages")
        return Job("chat", split, opts, model, tools)

    def _processor(self, messages):
        """The image processor when the messages hold images (ImageError when the model
        takes none); the images are loaded on the request's thread, before it queues."""
        if not any(isinstance(m.get("content"), list) for m in messages):
            return None
        return self.session.processor

    def completion(self, body: Dict[str, Any]) -> Job:
        model = self.check_model(body)
        opts = self.options(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            ids = self._raw_ids(prompt, opts, "prompt")
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            vocab = getattr(self.session.model, "vocab_size", None)
            ids = list(prompt)
            if vocab and not all(0 <= t < vocab for t in ids):
                raise bad("prompt token ids are out of the vocabulary", "prompt")
        else:
            raise bad("prompt must be a non-empty string (or a list of token ids)", "prompt")
        split = PromptSplit(ids, len(ids))  # a raw prompt is all stable: the cache keeps it
        self.check_context(len(ids), opts, "prompt")
        suffix = completion_suffix(body)
        spec = None if suffix is None else self._infill(suffix, body, opts, "suffix")
        return Job("completion", split, opts, model, infill=spec)

    def infill(self, body: Dict[str, Any]) -> Job:
        """llama.cpp's /infill (infill.py): the extra context, prefix and prompt are the
        encoder's text, the middle and the suffix (cut to what fits) the canvas."""
        model = self.check_model(body)
        prefix, suffix, translated, ignored = llama_request(body)
        opts = self.options(translated)
        ids = self._raw_ids(prefix, opts, "input_prefix")
        self.check_context(len(ids), opts, "input_prefix")
        return Job("infill", PromptSplit(ids, len(ids)), opts, model,
                   infill=self._infill(suffix, translated, opts, "input_suffix"), ignored=ignored)

    def _raw_ids(self, text: str, opts: openai.Options, param: str) -> List[int]:
        self.check_context(min_tokens(self.tokenizer, text), opts, param, at_least=True)
        return [int(t) for t in self.tokenizer.encode(text)]

    def _infill(self, suffix: str, body: Dict[str, Any], opts: openai.Options, param: str) -> Dict[str, Any]:
        """A request's infill arguments, the suffix checked against the canvas here (a 400
        before the request queues)."""
        if self.target:
            raise bad(f"{param} needs block diffusion's canvases: this server drafts for a target "
                      "model, which writes left to right", param)
        spec = infill_options(body)
        ids = encode_text(self.tokenizer, suffix)
        try:
            plan([], [], ids, canvas_length=self.session.backend.canvas_length,
                 cap=opts.settings.gen.max_new_tokens, lengths=spec.get("lengths"),
                 truncate_suffix=spec["truncate_suffix"])
        except ValueError as e:
            too_long = str(e).startswith("the suffix is")
            raise bad(str(e), param if too_long else "infill_lengths",
                      "suffix_too_long" if too_long else None) from None
        return dict(spec, suffix=ids)

"""The serving engine behind `mlx-diffgemma serve` (server.py is its HTTP side): one
`ChatSession` and its `PromptCache`, and the queue in front of them. Requests become
`Job`s, run one at a time on one worker thread (MLX arrays stay on the thread that
built them), and stream their canvases to a `Sink` (server.py's SSE stream, or the
collector of a plain reply).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import api
from .api import APIError, bad
from .drafter import Commit, Draft, Summary, generation_config
from .images import ImageError, load_message_images
from .prompt_cache import PromptCache
from .replies import ReplyParser, find_stop
from .session import ChatSession, Interrupted, Prefill, PromptSplit, split_prompt
from .templates import min_tokens


# -- one generation -----------------------------------------------------------------------


class Job:
    """A validated request: its prompt split, options and how to answer it."""

    def __init__(self, kind: str, split: PromptSplit, opts: api.Options, model: str,
                 tools: Optional[List[Dict[str, Any]]] = None):
        self.kind = kind  # "chat" or "completion"
        self.split = split
        self.opts = opts
        self.model = model
        self.tools = tools
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())


class Output:
    """The reply so far: committed ids cut at max_tokens, parsed into content, thinking and
    tool calls, cut at the first stop string; what may be streamed yet."""

    def __init__(self, job: Job, parser: ReplyParser):
        self.job, self.parser = job, parser
        self.ids: List[int] = []
        self.content = self.reasoning = ""
        self.tool_calls: List[Dict[str, Any]] = []
        self.finish: Optional[str] = None
        self.cached = 0
        self.sent_content = self.sent_reasoning = ""

    @property
    def done(self) -> bool:
        return self.finish is not None

    def add(self, tokens: List[int]) -> None:
        self.ids += tokens
        if len(self.ids) > self.job.opts.max_tokens:
            self.ids = self.ids[: self.job.opts.max_tokens]
            self.finish = "length"
        parsed = self.parser.parse(self.ids)
        content = parsed.content
        cut = find_stop(content, self.job.opts.stop)
        if cut >= 0:
            content, self.finish = content[:cut], "stop"
        self.content, self.reasoning, self.tool_calls = content, parsed.reasoning, parsed.tool_calls

    def end(self, finish_reason: str) -> None:
        if self.finish is None:
            self.finish = "stop" if finish_reason == "eos" else "length"

    @property
    def finish_reason(self) -> Optional[str]:
        return "tool_calls" if self.tool_calls and self.done else self.finish

    def deltas(self):
        """(content, reasoning) not streamed yet; a tail that could still become a stop
        string, or an incomplete UTF-8 character, waits."""
        text = self.content
        if not self.done:
            hold = max((len(s) for s in self.job.opts.stop), default=1) - 1
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        delta = text[len(self.sent_content):] if text.startswith(self.sent_content) else ""
        self.sent_content += delta
        r_delta = self.reasoning[len(self.sent_reasoning):]
        self.sent_reasoning = self.reasoning
        return delta, r_delta

    def usage(self) -> Dict[str, Any]:
        n_prompt, n_out = len(self.job.split.ids), len(self.ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                "total_tokens": n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


class Sink:
    """Where a generation's progress goes: nowhere for a plain request, whose client is
    only polled for having gone away (`handler`: server.py's request handler, or
    anything with `client_gone()`)."""

    def __init__(self, handler: Any):
        self.handler = handler
        self.gone = False

    def poll(self) -> bool:
        self.gone = self.gone or self.handler.client_gone()
        return self.gone

    def waiting(self) -> None:
        pass

    def commit(self, out: Output) -> None:
        pass

    def draft(self, out: Output, ev: Draft) -> None:
        pass


class _Task:
    def __init__(self, job: Job, sink: Sink):
        self.job, self.sink = job, sink
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.started = self.cancelled = False
        self.out: Optional[Output] = None
        self.error: Optional[BaseException] = None


class Engine:
    """The model, its session and prompt cache, and the queue in front of them: requests
    are run one at a time, in arrival order, on one worker thread."""

    def __init__(self, load, model_id: str, *, max_tokens: Optional[int] = None,
                 max_context: Optional[int] = None, cache_entries: int = 4,
                 cache_bytes: int = 8 << 30, aliases=(), mode: str = "reference",
                 image_dirs=(), target=None):
        """`load()` -> (model, tokenizer) runs on the worker thread: MLX binds arrays to
        the thread that builds them, so the model is built where it runs. `image_dirs`:
        the directories whose files `image_url` parts may name (none: data URLs only).
        `target(model, tokenizer)` -> a speculative backend (server.target_loader): the
        replies are then an autoregressive target's, drafted by the model, and a request's
        `temperature` is the target's (0: greedy)."""
        self.target = target
        self.model_id = model_id
        self.image_dirs = [Path(d).expanduser().resolve() for d in image_dirs]
        self.names = {model_id, *aliases}
        self.created = int(time.time())
        self.prompt_cache = PromptCache(cache_entries, cache_bytes)
        # waiting: queued, not started yet; running: generating now (at most one)
        self.counts = {"requests": 0, "completed": 0, "cancelled": 0, "waiting": 0, "running": 0}
        self._counts_lock = threading.Lock()
        self.stopping: Optional[str] = None  # why the server is shutting down, once it is
        self.tasks: "queue.Queue[Optional[_Task]]" = queue.Queue()
        ready = _Task(None, None)
        settings = dict(max_tokens=max_tokens, max_context=max_context, mode=mode)
        self.worker = threading.Thread(target=self._work, args=(load, settings, ready),
                                       name="generation", daemon=True)
        self.worker.start()
        ready.done.wait()
        if ready.error is not None:
            raise ready.error

    def _setup(self, load, max_tokens, max_context, mode) -> None:
        model, tokenizer = load()
        if max_tokens is None:
            from .commands import _chat_max_new_tokens

            max_tokens = _chat_max_new_tokens(model)
        backend = self.target(model, tokenizer) if self.target is not None else None
        self.session = ChatSession(model, tokenizer, gen_kwargs={"max_new_tokens": max_tokens},
                                   max_context=max_context, model_name=self.model_id,
                                   keep_history=False, mode=mode, backend=backend)
        self.target_temperature = getattr(backend, "temperature", None)
        self.tokenizer = tokenizer

    def noise_for(self, seed: Optional[int]):
        """The denoiser's noise source for a request (None: MLX's generator, seeded with
        `seed` when given). Tests swap in `SeededNoise` to replay a request exactly."""
        return None

    @property
    def context_length(self) -> int:
        return self.session.max_context

    def model_card(self) -> Dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "mlx-diffgemma", "context_length": self.context_length,
                "max_model_len": self.context_length,
                "canvas_length": self.session.backend.canvas_length}

    def check_model(self, body: Dict[str, Any]) -> str:
        name = body.get("model")
        if name is None:
            return self.model_id
        if name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_id!r}", "model", "model_not_found")
        return name

    # -- requests -> jobs ----------------------------------------------------------------

    def _options(self, body: Dict[str, Any]) -> api.Options:
        return api.options(body, self.session.gen, target=self.target is not None)

    def _check_context(self, n_tokens: int, opts: api.Options, param: str, at_least: bool = False) -> None:
        """A 400 `context_length_exceeded` for a prompt of `n_tokens` (`at_least`: a lower
        bound taken before tokenizing) whose reply could outrun the context."""
        try:
            gen = generation_config(self.session.model, **dict(self.session.gen_kwargs, **opts.gen_kwargs))
            self.session.check_context(n_tokens, gen, "shorten the prompt or lower max_tokens", at_least)
        except ValueError as e:
            raise bad(str(e), param, "context_length_exceeded") from None

    def chat_job(self, body: Dict[str, Any]) -> Job:
        model = self.check_model(body)
        opts = self._options(body)
        messages, tools = api.chat_messages(body, self.image_dirs), api.chat_tools(body)
        try:
            if any(isinstance(m.get("content"), list) for m in messages):
                messages = load_message_images(messages)  # each file's own problem first
        except ImageError as e:
            raise bad(str(e), "messages", "invalid_image") from None
        try:
            split = split_prompt(self.tokenizer, messages, tools=tools, processor=self._processor(messages),
                                 fits=lambda n: self._check_context(n, opts, "messages", at_least=True))
        except ImageError as e:
            raise bad(str(e), "messages", "invalid_image") from None
        except ValueError as e:
            raise bad(str(e), "messages") from None
        self._check_context(len(split.ids), opts, "messages")
        return Job("chat", split, opts, model, tools)

    def _processor(self, messages):
        """The image processor when the messages hold images (ImageError when the model
        takes none); the images are loaded on the request's thread, before it queues."""
        if not any(isinstance(m.get("content"), list) for m in messages):
            return None
        return self.session.processor

    def completion_job(self, body: Dict[str, Any]) -> Job:
        model = self.check_model(body)
        opts = self._options(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            self._check_context(min_tokens(self.tokenizer, prompt), opts, "prompt", at_least=True)
            ids = [int(t) for t in self.tokenizer.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = getattr(self.session.model, "vocab_size", None)
            ids = list(prompt)
            if vocab and not all(0 <= t < vocab for t in ids):
                raise bad("prompt token ids are out of the vocabulary", "prompt")
        else:
            raise bad("prompt must be a non-empty string (or a list of token ids)", "prompt")
        split = PromptSplit(ids, len(ids))  # a raw prompt is all stable: the cache keeps it
        self._check_context(len(ids), opts, "prompt")
        return Job("completion", split, opts, model)

    # -- running --------------------------------------------------------------------------

    def _work(self, load, settings, ready: "_Task") -> None:
        """The one thread that builds and runs the model (MLX arrays stay on it)."""
        try:
            self._serve_tasks(load, settings, ready)
        finally:
            _leave_mlx()

    def _serve_tasks(self, load, settings, ready: "_Task") -> None:
        try:
            self._setup(load, **settings)
        except BaseException as e:
            ready.error = e
            return
        finally:
            ready.done.set()
        while True:
            task = self.tasks.get()
            if task is None:
                return
            with task.lock:
                if task.cancelled:
                    continue
                task.started = True
            self._count(waiting=-1, running=1)
            try:
                if self.stopping is not None:
                    raise self.shutdown_error()
                self.prompt_cache.checkout(self.session, task.job.split.keys[: task.job.split.stable])
                try:
                    task.out = self._generate(task.job, task.sink)
                finally:
                    self.prompt_cache.checkin(self.session)
            except BaseException as e:  # handed to the request's thread
                task.error = e
            finally:
                self._count(running=-1)
                task.done.set()

    def _count(self, **deltas: int) -> None:
        with self._counts_lock:
            for key, n in deltas.items():
                self.counts[key] += n

    def run(self, job: Job, sink: Sink) -> Optional[Output]:
        """Queues `job` and waits for its reply; None when the client went away (a job
        still queued is dropped; a running generation is stopped and the cache rolled
        back to its stable boundary)."""
        task = _Task(job, sink)
        self._count(requests=1, waiting=1)
        self.tasks.put(task)
        while not task.done.wait(0.2):
            with task.lock:
                if task.started:
                    continue
                sink.waiting()
                if sink.poll():
                    task.cancelled = True
                    self._count(waiting=-1, cancelled=1)
                    return None
        if task.error is not None:
            raise task.error
        self._count(**{"cancelled" if task.out is None else "completed": 1})
        return task.out

    def stop(self, why: str) -> Dict[str, int]:
        """Starts shutting down: the running generation stops at its next step and it and
        every queued request end with `shutdown_error` (a stream gets it as its last
        chunk). Returns the counts as they were."""
        with self._counts_lock:
            self.stopping = why
            return dict(self.counts)

    def shutdown_error(self) -> APIError:
        return APIError(503, f"the server is shutting down ({self.stopping}); the request was not "
                        "completed: send it again once the server is back", None, "server_shutting_down")

    def close(self, timeout: float = 30.0) -> None:
        """Ends the worker thread, waiting (up to `timeout`) for it to leave MLX: a
        process that exits with it still inside MLX can abort."""
        self.tasks.put(None)
        if self.worker is not threading.current_thread():
            self.worker.join(timeout)

    def _generate(self, job: Job, sink: Sink) -> Optional[Output]:
        out = Output(job, ReplyParser(self.tokenizer, job.tools))
        opts = job.opts
        if self.target is not None:  # one worker thread: the backend is this request's
            t = opts.target_temperature
            self.session.backend.temperature = self.target_temperature if t is None else t
        events = self.session.complete(
            job.split, lambda: out.done or self.stopping is not None or sink.poll(),
            gen_kwargs=opts.gen_kwargs, seed=opts.seed, noise=self.noise_for(opts.seed), mode=opts.mode)
        try:
            for ev in events:
                if isinstance(ev, Prefill):
                    out.cached = ev.reused
                elif isinstance(ev, Draft) and opts.stream_drafts:
                    sink.draft(out, ev)
                elif isinstance(ev, Commit):
                    out.add(ev.tokens)
                    sink.commit(out)
                elif isinstance(ev, Summary):
                    out.end(ev.finish_reason)
                elif isinstance(ev, Interrupted) and not out.done:
                    if self.stopping is not None:
                        raise self.shutdown_error()
                    return None
        finally:
            events.close()
        return out

    def health(self) -> Dict[str, Any]:
        with self._counts_lock:
            counts = dict(self.counts)
        return {"status": "ok" if self.stopping is None else "stopping", "model": self.model_id,
                **counts,
                "prompt_cache": {"entries": len(self.prompt_cache),
                                 "bytes": self.prompt_cache.nbytes(self.session),
                                 "hits": self.prompt_cache.hits}}


def _leave_mlx() -> None:
    """Drops the calling thread's MLX state (its random key, its streams) while the
    interpreter still runs. Left to the thread's exit, the key's destructor takes the GIL
    and, racing a process that is already exiting, aborts it ("terminate called without
    an active exception"). A torch backend never loads MLX: nothing to drop."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return
    try:
        mx.synchronize()
    finally:
        mx.clear_streams()

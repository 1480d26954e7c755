"""`mlx-diffgemma serve`: an OpenAI-compatible HTTP server on the chat session layer.

Endpoints: POST /v1/chat/completions, /v1/completions (streaming or not), GET /v1/models
(with the context length the server enforces: the checkpoint's max_position_embeddings
unless --max-context lowers it), GET /v1/models/{id}, GET /health.

HTTP stack: the standard library's ThreadingHTTPServer, as mlx-lm's server uses. One
model serves one generation at a time, so the server needs no async framework: a thread
per connection waits its turn on a lock (FIFO enough at these rates), and a stream is a
plain write loop. No extra dependency to install or keep in step.

One `ChatSession` does the work (template split, cache cut, chunked prefill, drafter,
rollback); the `PromptCache` swaps conversations' cache states in and out of it between
requests. A streaming client that goes away is noticed at the next write or socket poll
(between prefill chunks and denoising steps); its generation is stopped, the cache rolled
back to its stable boundary, and the next request runs.
"""

from __future__ import annotations

import argparse
import hmac
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import api
from .api import APIError, bad
from .drafter import Commit, Draft, Summary, generation_config
from .images import ImageError
from .prompt_cache import PromptCache
from .replies import ReplyParser, find_stop
from .session import ChatSession, Interrupted, Prefill, PromptSplit, split_prompt

KEEPALIVE_S = 10.0  # an SSE comment at least this often while a stream waits or prefills
MAX_BODY_BYTES = 16 << 20


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
    only polled for having gone away."""

    def __init__(self, handler: "Handler"):
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
        self.counts = {"requests": 0, "completed": 0, "cancelled": 0, "waiting": 0}
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

    def _check_context(self, split: PromptSplit, opts: api.Options, param: str) -> None:
        try:
            gen = generation_config(self.session.model, **dict(self.session.gen_kwargs, **opts.gen_kwargs))
            self.session.check_context(len(split.ids), gen, "shorten the prompt or lower max_tokens")
        except ValueError as e:
            raise bad(str(e), param, "context_length_exceeded") from None

    def chat_job(self, body: Dict[str, Any]) -> Job:
        model = self.check_model(body)
        opts = self._options(body)
        messages, tools = api.chat_messages(body, self.image_dirs), api.chat_tools(body)
        try:
            split = split_prompt(self.tokenizer, messages, tools=tools,
                                 processor=self._processor(messages))
        except ImageError as e:
            raise bad(str(e), "messages", "invalid_image") from None
        except ValueError as e:
            raise bad(str(e), "messages") from None
        self._check_context(split, opts, "messages")
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
            ids = [int(t) for t in self.tokenizer.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = getattr(self.session.model, "vocab_size", None)
            ids = list(prompt)
            if vocab and not all(0 <= t < vocab for t in ids):
                raise bad("prompt token ids are out of the vocabulary", "prompt")
        else:
            raise bad("prompt must be a non-empty string (or a list of token ids)", "prompt")
        split = PromptSplit(ids, len(ids))  # a raw prompt is all stable: the cache keeps it
        self._check_context(split, opts, "prompt")
        return Job("completion", split, opts, model)

    # -- running --------------------------------------------------------------------------

    def _work(self, load, settings, ready: "_Task") -> None:
        """The one thread that builds and runs the model (MLX arrays stay on it)."""
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
            try:
                self.prompt_cache.checkout(self.session, task.job.split.keys[: task.job.split.stable])
                try:
                    task.out = self._generate(task.job, task.sink)
                finally:
                    self.prompt_cache.checkin(self.session)
            except BaseException as e:  # handed to the request's thread
                task.error = e
            finally:
                task.done.set()

    def run(self, job: Job, sink: Sink) -> Optional[Output]:
        """Queues `job` and waits for its reply; None when the client went away (a job
        still queued is dropped; a running generation is stopped and the cache rolled
        back to its stable boundary)."""
        self.counts["requests"] += 1
        task = _Task(job, sink)
        self.counts["waiting"] += 1
        self.tasks.put(task)
        try:
            while not task.done.wait(0.2):
                with task.lock:
                    if task.started:
                        continue
                    sink.waiting()
                    if sink.poll():
                        task.cancelled = True
                        self.counts["cancelled"] += 1
                        return None
        finally:
            self.counts["waiting"] -= 1
        if task.error is not None:
            raise task.error
        self.counts["cancelled" if task.out is None else "completed"] += 1
        return task.out

    def close(self) -> None:
        self.tasks.put(None)

    def _generate(self, job: Job, sink: Sink) -> Optional[Output]:
        out = Output(job, ReplyParser(self.tokenizer, job.tools))
        opts = job.opts
        if self.target is not None:  # one worker thread: the backend is this request's
            t = opts.target_temperature
            self.session.backend.temperature = self.target_temperature if t is None else t
        events = self.session.complete(
            job.split, lambda: out.done or sink.poll(), gen_kwargs=opts.gen_kwargs,
            seed=opts.seed, noise=self.noise_for(opts.seed), mode=opts.mode)
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
                    return None
        finally:
            events.close()
        return out

    def health(self) -> Dict[str, Any]:
        return {"status": "ok", "model": self.model_id,
                **self.counts,
                "prompt_cache": {"entries": len(self.prompt_cache),
                                 "bytes": self.prompt_cache.nbytes(self.session),
                                 "hits": self.prompt_cache.hits}}


# -- responses -------------------------------------------------------------------------------


def chunk(job: Job, choice: Optional[Dict[str, Any]], **extra) -> Dict[str, Any]:
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    out = {"id": job.id, "object": obj, "created": job.created, "model": job.model,
           "choices": [] if choice is None else [choice]}
    out.update(extra)
    return out


def delta_choice(job: Job, content: str = "", reasoning: str = "", finish=None,
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


def full_response(job: Job, out: Output) -> Dict[str, Any]:
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


class SSEStream(Sink):
    """Server-sent events: one chunk per committed canvas (and per denoising step with
    stream_drafts), keep-alive comments while waiting, then the finish, usage and [DONE]."""

    def __init__(self, handler: "Handler", job: Job, keepalive_s: float):
        super().__init__(handler)
        self.job = job
        self.keepalive_s = keepalive_s
        self.last = time.monotonic()

    def _write(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            self.handler.wfile.write(data)
            self.handler.wfile.flush()
            self.last = time.monotonic()
        except OSError:
            self.gone = True

    def send(self, obj: Dict[str, Any]) -> None:
        self._write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def poll(self) -> bool:
        self.waiting()
        return super().poll()

    def waiting(self) -> None:
        if time.monotonic() - self.last >= self.keepalive_s:
            self._write(b": keepalive\n\n")

    def start(self) -> None:
        self.handler.send_response(200)
        self.handler.send_header("Content-Type", "text/event-stream")
        self.handler.send_header("Cache-Control", "no-cache")
        self.handler.send_header("Connection", "close")
        self.handler.end_headers()
        if self.job.kind == "chat":
            self.send(chunk(self.job, delta_choice(self.job, role=True)))

    def commit(self, out: Output) -> None:
        content, reasoning = out.deltas()
        if content or reasoning:
            self.send(chunk(self.job, delta_choice(self.job, content, reasoning)))

    def draft(self, out: Output, ev: Draft) -> None:
        text = out.parser.clean(out.parser.tokenizer.decode(ev.tokens, skip_special_tokens=True))
        steps = out.job.opts.gen_kwargs.get("max_denoising_steps", self.handler.engine.session.gen.max_denoising_steps)
        self.send(chunk(self.job, None, draft={
            "canvas_index": ev.canvas_index, "step": steps - ev.step + 1,
            "text": out.sent_content + text, "canvas_text": text}))

    def finish(self, out: Output) -> None:
        content, reasoning = out.deltas()
        calls = out.tool_calls if self.job.kind == "chat" else None
        self.send(chunk(self.job, delta_choice(self.job, content, reasoning, out.finish_reason, calls)))
        if self.job.opts.include_usage:
            self.send(chunk(self.job, None, usage=out.usage()))
        self._write(b"data: [DONE]\n\n")

    def error(self, err: APIError) -> None:
        self.send(err.body())
        self._write(b"data: [DONE]\n\n")


# -- HTTP ------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "mlx-diffgemma"
    timeout = 600  # a client that stops sending its request mid-way is dropped

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def log_message(self, fmt, *args) -> None:
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")

    def client_gone(self) -> bool:
        """The client closed its connection (nothing more to read, EOF)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def send_json(self, status: int, obj: Dict[str, Any]) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass

    def send_api_error(self, err: APIError) -> None:
        self.send_json(err.status, err.body())

    def _authorized(self) -> None:
        key = self.server.api_key
        sent = self.headers.get("Authorization", "").encode()
        if key and not hmac.compare_digest(sent, f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                           None, "invalid_api_key", "authentication_error")

    def do_GET(self) -> None:
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                return self.send_json(200, self.engine.health())
            self._authorized()
            if path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [self.engine.model_card()]})
            if path.startswith("/v1/models/"):
                name = path[len("/v1/models/"):]
                if name in self.engine.names:
                    return self.send_json(200, dict(self.engine.model_card(), id=name))
                raise APIError(404, f"the model {name!r} does not exist", "model", "model_not_found")
            raise APIError(404, f"no such endpoint: GET {path}", None, "not_found")
        except APIError as e:
            self.send_api_error(e)

    def do_POST(self) -> None:
        try:
            self._post()
        except APIError as e:
            self.send_api_error(e)
        except ValueError as e:  # the session refused the request's values
            self.send_api_error(bad(str(e)))
        except Exception as e:  # a bug of ours: logged here, one line to the client
            traceback.print_exc()
            self.send_api_error(APIError(500, f"internal error: {type(e).__name__}"))

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a Content-Length header is required", None, "length_required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise bad("invalid Content-Length header") from None
        limit = self.server.max_body_bytes
        if n > limit:
            self._drain(n)
            self.close_connection = True
            raise APIError(413, f"the request body is {n} bytes, over this server's limit of "
                           f"{limit} (--max-body-mb)", None, "request_too_large")
        return self.rfile.read(n)

    def _drain(self, n: int) -> None:
        """Reads (and drops) an over-large body, up to a bound, so that the client gets to
        read the 413 instead of a reset connection."""
        left = min(n, 4 * self.server.max_body_bytes + (64 << 20))
        while left > 0:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                break
            left -= len(data)

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {"/v1/chat/completions": self.engine.chat_job,
                  "/v1/completions": self.engine.completion_job}
        if path not in routes:
            raise APIError(404, f"no such endpoint: POST {path}", None, "not_found")
        self._authorized()
        job = routes[path](api.parse_json(self._read_body()))
        if job.opts.stream:
            return self._stream(job)
        out = self.engine.run(job, Sink(self))
        if out is not None:
            self.send_json(200, full_response(job, out))

    def _stream(self, job: Job) -> None:
        sse = SSEStream(self, job, self.server.keepalive_s)
        sse.start()
        try:
            out = self.engine.run(job, sse)
        except APIError as e:
            return sse.error(e)
        except ValueError as e:
            return sse.error(bad(str(e)))
        except Exception as e:  # headers are sent: the error goes in the stream
            traceback.print_exc()
            return sse.error(APIError(500, f"internal error: {type(e).__name__}"))
        if out is not None:
            sse.finish(out)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8080, *,
                 api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES,
                 keepalive_s: float = KEEPALIVE_S, verbose: bool = False):
        self.engine = engine
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.verbose = verbose
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


# -- command line ----------------------------------------------------------------------------


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .paths import DEFAULT_MODEL
    from .commands import _flag_type, _positive_int, _setting_type, add_target_args

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory, Hugging Face id or packaged model name (default {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=("mlx", "torch"), default="mlx", help="mlx (default) or the torch reference path")
    p.add_argument("--mode", choices=api.MODES, default=None, help="generation mode of requests that name none (default reference, fast with --target; fast: fast.py, MLX only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every request but /health")
    p.add_argument("--model-id", default=None, help="the model name clients use (default: the --model value)")
    p.add_argument("--max-tokens", type=_setting_type("max_new_tokens", int), default=None, help="default max_tokens of a reply (default: as chat)")
    p.add_argument("--max-context", type=_flag_type(_positive_int, "max_context"), default=None, help="context limit in tokens (default: the model's)")
    p.add_argument("--prompt-cache-size", type=int, default=4, help="conversations kept in the prompt cache (default 4; 0 disables it)")
    p.add_argument("--prompt-cache-gb", type=float, default=8.0, help="bytes the prompt cache may hold, in GB (default 8)")
    p.add_argument("--image-dir", action="append", default=[], metavar="DIR",
                   help="a directory whose image files requests may name in image_url parts (file:// URL "
                   "or absolute path; repeatable; default none: images come as data URLs only)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / (1 << 20), help="largest request body accepted, in MiB (default 16)")
    p.add_argument("--verbose", "-v", action="store_true", help="log every request to stderr")
    add_target_args(p)
    return p


def build_engine(args) -> Engine:
    from .paths import resolve_model_path
    from .commands import load_for, resolve_mode

    path = resolve_model_path(args.model, prefer="hf" if args.backend == "torch" else "mlx")
    return Engine(lambda: load_for(str(path), args.backend)[:2], args.model_id or args.model,
                  max_tokens=args.max_tokens, max_context=args.max_context,
                  cache_entries=args.prompt_cache_size,
                  cache_bytes=int(args.prompt_cache_gb * 1e9),
                  aliases=(args.model, str(path), path.name), mode=resolve_mode(args),
                  image_dirs=args.image_dir, target=target_loader(args))


def target_loader(args):
    """None without --target; else `load(model, tokenizer)` -> the speculative backend
    (the target loaded with mlx-lm on the worker thread, its tokenizer checked)."""
    if not args.target:
        return None

    def load(model, tokenizer):
        from .commands import target_backend

        return target_backend(args, model, tokenizer)

    return load


def main_serve(args) -> int:
    if args.prompt_cache_size < 0 or args.prompt_cache_gb < 0 or args.max_body_mb <= 0:
        raise ValueError("--prompt-cache-size and --prompt-cache-gb must be >= 0, --max-body-mb > 0")
    engine = build_engine(args)
    server = Server(engine, args.host, args.port, api_key=args.api_key,
                    max_body_bytes=int(args.max_body_mb * (1 << 20)), verbose=args.verbose)
    drafting = f", drafting for {args.target}" if args.target else ""
    print(f"mlx-diffgemma serve: {engine.model_id} (context {engine.context_length:,} tokens{drafting}) "
          f"listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0

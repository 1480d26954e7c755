"""`mlx-diffgemma serve`: an OpenAI-compatible HTTP server on the chat session layer.

Endpoints: POST /v1/chat/completions, /v1/completions (streaming or not; `suffix` writes
the middle before it, generation/infilling.py), llama.cpp's POST /infill (infill.py), GET /v1/models
(with the context length the server enforces: the checkpoint's max_position_embeddings
unless --max-context lowers it), GET /v1/models/{id}, GET /health.

HTTP stack: the standard library's ThreadingHTTPServer, as mlx-lm's server uses. One
model's one worker thread runs every generation (engine.py; several at once on MLX,
scheduler.py), so the server needs no async framework: a thread per connection waits for
its reply and writes what the worker queued for it (the worker never blocks on a slow
client), and a stream is a plain write loop. No extra dependency to install or keep in
step.

One `ChatSession` does the work (template split, cache cut, chunked prefill, drafter,
rollback) in engine.py's `Engine`; the `PromptCache` swaps conversations' cache states
in and out of it between requests; requests.py turns bodies into jobs and openai.py
shapes the answers. A streaming client that goes away is noticed at the next write or socket poll
(between prefill chunks and denoising steps); its generation is stopped, the cache rolled
back to its stable boundary, and the next request runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Optional

from ..chat.options import add_model_args, add_target_args, flag_changes, flag_type, load_for, setting_type
from ..generation.events import Draft
from ..generation.settings import parse_number
from ..models.paths import resolve_model_path
from .engine import Engine, Output, Sink
from .infill import llama_response
from .openai import APIError, bad, chunk, delta_choice, full_response, parse_json
from .requests import Job

KEEPALIVE_S = 10.0  # an SSE comment at least this often while a stream waits or prefills
MAX_BODY_BYTES = 16 << 20
SHUTDOWN_S = 30.0  # on SIGTERM, how long running requests get to be told (a step takes ~1 s)


def log(message: str) -> None:
    print(f"mlx-diffgemma serve: {message}", file=sys.stderr, flush=True)


class SSEStream(Sink):
    """Server-sent events: one chunk per committed canvas (and per denoising step with
    stream_drafts), keep-alive comments while waiting, then the finish, usage and [DONE]."""

    def __init__(self, handler: "Handler", job: Job, keepalive_s: float):
        super().__init__(handler)
        self.job = job
        self.keepalive_s = keepalive_s
        self.last = time.monotonic()
        self.pending: "queue.Queue[bytes]" = queue.Queue()

    def _write(self, data: bytes) -> None:
        """Queues `data` for the request's thread (`flush`): the worker thread that calls
        `commit` and `draft` never blocks on a slow client."""
        if not self.gone:
            self.pending.put(data)
            self.wake.set()

    def flush(self) -> None:
        while True:
            try:
                data = self.pending.get_nowait()
            except queue.Empty:
                return
            if self.gone:
                continue
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
        self.headers()
        if self.job.kind == "chat":
            self.send(chunk(self.job, delta_choice(self.job, role=True)))
        self.flush()

    def headers(self) -> None:
        self.handler.send_response(200)
        self.handler.send_header("Content-Type", "text/event-stream")
        self.handler.send_header("Cache-Control", "no-cache")
        self.handler.send_header("Connection", "close")
        self.handler.end_headers()

    def commit(self, out: Output) -> None:
        content, reasoning = out.deltas()
        if content or reasoning:
            self.send(chunk(self.job, delta_choice(self.job, content, reasoning)))

    def draft(self, out: Output, ev: Draft) -> None:
        text = out.parser.clean(out.parser.tokenizer.decode(ev.tokens, skip_special_tokens=True))
        steps = self.job.opts.settings.gen.max_denoising_steps
        draft = {"canvas_index": ev.canvas_index, "step": steps - ev.step + 1,
                 "text": out.sent_content + text, "canvas_text": text}
        if ev.fixed is not None:  # an infill: which positions hold given tokens, and its length
            draft.update(fixed=ev.fixed, candidate_length=ev.candidate)
        self.send(chunk(self.job, None, draft=draft))

    def finish(self, out: Output) -> None:
        content, reasoning = out.deltas()
        calls = out.tool_calls if self.job.kind == "chat" else None
        self.send(chunk(self.job, delta_choice(self.job, content, reasoning, out.finish_reason, calls)))
        if self.job.opts.include_usage:
            self.send(chunk(self.job, None, usage=out.usage()))
        self._write(b"data: [DONE]\n\n")
        self.flush()

    def error(self, err: APIError) -> None:
        self.send(err.body())
        self._write(b"data: [DONE]\n\n")
        self.flush()


class LlamaStream(SSEStream):
    """llama.cpp's native stream for /infill: `{"content", "stop": false}` per commit,
    then the whole reply object with `"stop": true`; no [DONE]."""

    def start(self) -> None:
        self.headers()

    def commit(self, out: Output) -> None:
        content, _ = out.deltas()
        if content:
            self.send({"content": content, "stop": False})

    def draft(self, out: Output, ev: Draft) -> None:
        pass

    def finish(self, out: Output) -> None:
        content, _ = out.deltas()
        self.send(llama_response(self.job, out, content))
        self.flush()

    def error(self, err: APIError) -> None:
        self.send(err.body())
        self.flush()


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

    def send_json(self, status: int, obj: Dict[str, Any], headers: Optional[Dict[str, str]] = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass

    def send_api_error(self, err: APIError) -> None:
        self.send_json(err.status, err.body(), getattr(err, "headers", None))

    def _authorized(self) -> None:
        key = self.server.api_key
        if not key:
            return
        # The scheme is case-insensitive (RFC 9110): "bearer k" is "Bearer k".
        scheme, _, sent = self.headers.get("Authorization", "").strip().partition(" ")
        ok = hmac.compare_digest(sent.strip().encode(), key.encode())
        if scheme.lower() != "bearer" or not ok:
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
        with self.server.busy():
            self._do_post()

    def _do_post(self) -> None:
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
        routes = {"/v1/chat/completions": self.engine.requests.chat,
                  "/v1/completions": self.engine.requests.completion,
                  "/infill": self.engine.requests.infill}
        if path not in routes:
            raise APIError(404, f"no such endpoint: POST {path}", None, "not_found")
        self._authorized()
        job = routes[path](parse_json(self._read_body()))
        self.engine.check_room()  # a full queue turns the request away before a stream starts
        if job.opts.stream:
            return self._stream(job)
        out = self.engine.run(job, Sink(self))
        if out is not None:
            self.send_json(200, llama_response(job, out) if job.kind == "infill" else full_response(job, out))

    def _stream(self, job: Job) -> None:
        sse = (LlamaStream if job.kind == "infill" else SSEStream)(self, job, self.server.keepalive_s)
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
        self.active = 0  # POST requests being answered (a shutdown waits for them)
        self._active_lock = threading.Lock()
        super().__init__((host, port), Handler)

    @contextlib.contextmanager
    def busy(self):
        with self._active_lock:
            self.active += 1
        try:
            yield
        finally:
            with self._active_lock:
                self.active -= 1

    def drain(self, why: str, timeout: float = SHUTDOWN_S) -> None:
        """Shuts the engine down and waits (up to `timeout`) until every request being
        answered has had its error written; says so on stderr."""
        counts = self.engine.stop(why)
        log(f"{why}: shutting down; {counts['running']} running and {counts['waiting']} waiting "
            "request(s) end with an error (server_shutting_down)")
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.active:
            log(f"{self.active} request(s) still open after {timeout:g} s: closing them")
        log("stopped")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


# -- command line ----------------------------------------------------------------------------


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_args(p, "generation mode of requests that name none (default reference, fast with --target; "
                   "fast: fast.py, MLX only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=flag_type(_port, "port"), default=8080,
                   help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every request but /health")
    p.add_argument("--model-id", default=None, help="the model name clients use (default: the --model value)")
    p.add_argument("--max-tokens", type=setting_type("max_new_tokens", int), default=None,
                   help="default max_tokens of a reply (default: as chat)")
    p.add_argument("--prompt-cache-size", type=int, default=4,
                   help="conversations kept in the prompt cache (default 4; 0 disables it)")
    p.add_argument("--prompt-cache-gb", type=float, default=8.0,
                   help="bytes the prompt cache may hold, in GB (default 8)")
    p.add_argument("--image-dir", action="append", default=[], metavar="DIR", type=flag_type(_directory, "image_dir"),
                   help="a directory whose image files requests may name in image_url parts (file:// URL "
                   "or absolute path; repeatable; default none: images come as data URLs only)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / (1 << 20),
                   help="largest request body accepted, in MiB (default 16)")
    p.add_argument("--max-batch", type=flag_type(_positive, "max_batch"), default=4,
                   help="requests generating at once, their canvases denoised in one forward per step "
                   "(default 4; 1: one at a time; the MLX backend without --target only)")
    p.add_argument("--max-queue", type=flag_type(_positive, "max_queue"), default=32,
                   help="requests that may wait for a free slot; past it the server answers 503 with "
                   "Retry-After (default 32)")
    p.add_argument("--verbose", "-v", action="store_true", help="log every request to stderr")
    add_target_args(p)
    return p


def _port(text: str) -> int:
    port = parse_number("the port", int, text)
    if not 0 <= port <= 65535:
        raise ValueError(f"must be a port number from 0 to 65535 (got {text!r})")
    return port


def _positive(text: str) -> int:
    n = parse_number("the value", int, text)
    if n < 1:
        raise ValueError(f"must be an integer >= 1 (got {text!r})")
    return n


def _directory(text: str) -> str:
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"no such directory: {text}")
    if not path.is_dir():
        raise ValueError(f"not a directory: {text}")
    return text


def build_engine(args) -> Engine:
    path = resolve_model_path(args.model, prefer="hf" if args.backend == "torch" else "mlx")
    return Engine(lambda: load_for(str(path), args.backend)[:2], args.model_id or args.model,
                  max_tokens=args.max_tokens, max_context=args.max_context,
                  cache_entries=args.prompt_cache_size,
                  cache_bytes=int(args.prompt_cache_gb * 1e9),
                  aliases=(args.model, str(path), path.name), settings=flag_changes(args),
                  image_dirs=args.image_dir, target=target_loader(args), max_batch=args.max_batch,
                  max_queue=args.max_queue)


def target_loader(args):
    """None without --target; else `load(model, tokenizer)` -> the speculative backend
    (the target loaded with mlx-lm on the worker thread, its tokenizer checked)."""
    if not args.target:
        return None

    def load(model, tokenizer):
        from ..chat.options import target_backend

        return target_backend(args, model, tokenizer)

    return load


def main_serve(args) -> int:
    if args.prompt_cache_size < 0 or args.prompt_cache_gb < 0 or args.max_body_mb <= 0:
        raise ValueError("--prompt-cache-size and --prompt-cache-gb must be >= 0, --max-body-mb > 0")
    engine = build_engine(args)
    server = Server(engine, args.host, args.port, api_key=args.api_key,
                    max_body_bytes=int(args.max_body_mb * (1 << 20)), verbose=args.verbose)
    drafting = f", drafting for {args.target}" if args.target else ""
    if engine.session.context_note:
        log(engine.session.context_note)
    if engine.scheduler is None and args.max_batch > 1:
        who = "with --target the server" if args.target else f"the {engine.session.backend.name} backend"
        log(f"--max-batch {args.max_batch} is not used: {who} runs one request at a time")
    print(f"mlx-diffgemma serve: {engine.model_id} (context {engine.context_length:,} tokens{drafting}) "
          f"listening on {server.url}", flush=True)
    try:
        with _stop_on(signal.SIGTERM):
            server.serve_forever()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (_Stopped)
        server.drain(str(e) if isinstance(e, _Stopped) else "interrupted")
    finally:
        server.server_close()
        engine.close()
    return 0


class _Stopped(KeyboardInterrupt):
    """A signal that stops the server (SIGTERM), raised where serve_forever waits."""


@contextlib.contextmanager
def _stop_on(signum: int):
    def handler(sig, frame):
        signal.signal(signum, signal.SIG_IGN)  # the first one only: the shutdown goes on
        raise _Stopped(signal.Signals(sig).name)

    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)

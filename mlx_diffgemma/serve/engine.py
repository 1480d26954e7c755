"""The serving engine behind `mlx-diffgemma serve` (http.py is its HTTP side): one
`ChatSession` and its `PromptCache`, and the queue in front of them. Requests become
`Job`s (requests.py), run on one worker thread (MLX arrays stay on the thread that built
them), and stream their canvases to a `Sink` (http.py's SSE stream, or the collector of a
plain reply). On the MLX backend up to `max_batch` of them generate at once, one
denoising step of each per tick (scheduler.py); the torch and speculative backends run
them one at a time through the session. A full queue (`max_queue` waiting) answers 503.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Generator, Iterator, List, Mapping, Optional

from ..chat.backends import MLXBackend, make_backend
from ..chat.options import chat_max_new_tokens
from ..chat.session import ChatSession, Interrupted, Prefill
from ..generation.events import Commit, Draft, Summary
from .openai import APIError
from .prompt_cache import PromptCache
from .replies import ReplyParser, find_stop
from .requests import Job, Requests

# -- one generation -----------------------------------------------------------------------


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
        self.prefill: Optional[Prefill] = None
        self.summary: Optional[Summary] = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def add(self, tokens: List[int]) -> None:
        self.ids += tokens
        if len(self.ids) > self.job.opts.settings.gen.max_new_tokens:
            self.ids = self.ids[: self.job.opts.settings.gen.max_new_tokens]
            self.finish = "length"
        parsed = self.parser.parse(self.ids)
        content = parsed.content
        cut = find_stop(content, self.job.opts.stop)
        if cut >= 0:
            content, self.finish = content[:cut], "stop"
        self.content, self.reasoning, self.tool_calls = content, parsed.reasoning, parsed.tool_calls

    def take(self, ev, sink: "Sink") -> None:
        """A drafter event (Draft, Commit, Summary) into this reply and out to `sink`."""
        if isinstance(ev, Draft):
            if self.job.opts.stream_drafts:
                sink.draft(self, ev)
        elif isinstance(ev, Commit):
            self.add(ev.tokens)
            sink.commit(self)
        elif isinstance(ev, Summary):
            self.end(ev.finish_reason)
            self.summary = ev

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
        # Set when there is something to write or the request is done: the request's
        # thread wakes to write it (the worker never writes to a socket itself).
        self.wake = threading.Event()

    def flush(self) -> None:
        """Writes what the worker queued (called on the request's thread)."""

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

    def finish(self) -> None:
        self.done.set()
        if self.sink is not None:
            self.sink.wake.set()


class Engine:
    """The model, its session and prompt cache, and the queue in front of them: requests
    are run one at a time, in arrival order, on one worker thread."""

    def __init__(self, load, model_id: str, *, max_tokens: Optional[int] = None,
                 max_context: Optional[int] = None, cache_entries: int = 4,
                 cache_bytes: int = 8 << 30, aliases=(), settings: Optional[Mapping[str, Any]] = None,
                 image_dirs=(), target=None, max_batch: int = 4, max_queue: int = 32):
        """`load()` -> (model, tokenizer) runs on the worker thread: MLX binds arrays to
        the thread that builds them, so the model is built where it runs. `settings`: the
        server's defaults under `resolve`'s names (the mode, with a target its temperature
        and our model's steps); `max_tokens` a reply's (default: as chat). `image_dirs`:
        the directories whose files `image_url` parts may name (none: data URLs only).
        `target(model, tokenizer)` -> a speculative backend (http.target_loader): the
        replies are then an autoregressive target's, drafted by the model, and a request's
        `temperature` is the target's (0: greedy). `max_batch`: requests generating at
        once (scheduler.py; the MLX backend only, others run one at a time);
        `max_queue`: requests waiting for a row before new ones are turned away (503)."""
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.target = target
        self.max_batch, self.max_queue = max_batch, max_queue
        self.scheduler = None  # scheduler.Scheduler when requests run in batches
        self.model_id = model_id
        self.image_dirs = [Path(d).expanduser().resolve() for d in image_dirs]
        self.names = [model_id, *aliases]
        self.created = int(time.time())
        self.prompt_cache = PromptCache(cache_entries, cache_bytes)
        # waiting: queued, not started yet; running: generating now (at most one)
        self.counts = {"requests": 0, "completed": 0, "cancelled": 0, "waiting": 0, "running": 0}
        self._counts_lock = threading.Lock()
        self.stopping: Optional[str] = None  # why the server is shutting down, once it is
        self.tasks: "queue.Queue[Optional[_Task]]" = queue.Queue()
        ready = _Task(None, None)
        setup = dict(max_tokens=max_tokens, max_context=max_context, settings=dict(settings or {}))
        self.worker = threading.Thread(target=self._work, args=(load, setup, ready),
                                       name="generation", daemon=True)
        self.worker.start()
        ready.done.wait()
        if ready.error is not None:
            raise ready.error

    def _setup(self, load, max_tokens, max_context, settings) -> None:
        model, tokenizer = load()
        backend = self.target(model, tokenizer) if self.target is not None else make_backend(model)
        settings["max_new_tokens"] = max_tokens or chat_max_new_tokens(model, backend)
        self.session = ChatSession(model, tokenizer, max_context=max_context, model_name=self.model_id,
                                   keep_history=False, backend=backend, **settings)
        self.requests = Requests(self.session, self.names, self.image_dirs, self.target is not None)
        self.tokenizer = tokenizer
        if type(backend) is MLXBackend and getattr(model, "group", None) is None:
            from .scheduler import Scheduler  # (MLX only: a torch server runs without it)

            self.scheduler = Scheduler(self, self.max_batch, self._output)

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
        if self.scheduler is not None:
            return self.scheduler.run()
        while True:
            task = self.tasks.get()
            if task is None:
                return
            if self.begin(task):
                self.serve_alone(task)

    def serve_alone(self, task: "_Task") -> None:
        """Runs a begun task to its end on the session's own cache (the serial path)."""
        for _ in self.alone(task):
            pass

    def alone(self, task: "_Task") -> Iterator[None]:
        """A begun task run on the session's own cache, one event per `next` (the
        scheduler interleaves it with its rows' steps: an infill's several candidate runs
        are not one row's drafting). Errors go to the task, which is finished at the end."""
        try:
            if self.stopping is not None:
                raise self.shutdown_error()
            self.prompt_cache.checkout(self.session, task.job.split.keys[: task.job.split.stable])
            try:
                task.out = yield from self._replies(task.job, task.sink)
            finally:
                self.prompt_cache.checkin(self.session)
        except BaseException as e:  # handed to the request's thread
            task.error = e
        finally:
            self._count(running=-1)
            task.finish()

    def begin(self, task: "_Task") -> bool:
        """Marks a task taken off the queue as running; False when its client left while
        it waited (it is dropped)."""
        with task.lock:
            if task.cancelled:
                return False
            task.started = True
        self._count(waiting=-1, running=1)
        return True

    def _count(self, **deltas: int) -> None:
        with self._counts_lock:
            for key, n in deltas.items():
                self.counts[key] += n

    def run(self, job: Job, sink: Sink) -> Optional[Output]:
        """Queues `job` and waits for its reply; None when the client went away (a job
        still queued is dropped; a running generation is stopped and the cache rolled
        back to its stable boundary)."""
        task = _Task(job, sink)
        with self._counts_lock:
            self._check_room()
            self.counts["requests"] += 1
            self.counts["waiting"] += 1
        self.tasks.put(task)
        while True:
            sink.wake.wait(0.2)
            sink.wake.clear()
            sink.flush()
            if task.done.is_set():
                break
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

    def check_room(self) -> None:
        """APIError 503 (server_busy, with Retry-After) when the queue is full."""
        with self._counts_lock:
            self._check_room()

    def _check_room(self) -> None:
        waiting = self.counts["waiting"]
        if waiting >= self.max_queue:
            slots = self.max_batch if self.scheduler is not None else 1
            err = APIError(503, f"the server is busy: {waiting} requests are waiting for one of {slots} "
                           "slots; retry shortly", None, "server_busy", "server_error")
            err.headers = {"Retry-After": "1"}
            raise err

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

    def _output(self, job: Job) -> Output:
        return Output(job, ReplyParser(self.tokenizer, job.tools))

    def _replies(self, job: Job, sink: Sink) -> Generator[None, None, Optional[Output]]:
        """The session's turn for `job`, one event per `next`; returns its Output (None
        when its client went away)."""
        out = self._output(job)
        opts = job.opts
        events = self.session.complete(job.split, lambda: out.done or self.stopping is not None or sink.poll(),
                                       opts.settings, self.noise_for(opts.settings.seed), job.infill)
        try:
            for ev in events:
                if isinstance(ev, Prefill):
                    out.cached, out.prefill = ev.reused, ev
                elif isinstance(ev, (Draft, Commit, Summary)):
                    out.take(ev, sink)
                elif isinstance(ev, Interrupted) and not out.done:
                    if self.stopping is not None:
                        raise self.shutdown_error()
                    return None
                yield
        finally:
            events.close()
        return out

    def health(self) -> Dict[str, Any]:
        with self._counts_lock:
            counts = dict(self.counts)
        batching = {} if self.scheduler is None else self.scheduler.health()
        return {"status": "ok" if self.stopping is None else "stopping", "model": self.model_id,
                **counts, "max_queue": self.max_queue, "max_batch": 1, **batching,
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

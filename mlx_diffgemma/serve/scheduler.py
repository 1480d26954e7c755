"""The server's step-level scheduler: up to `max_batch` requests generate at once, one
denoising step of each per tick (generation/batch.py runs their canvases in one
decoder forward), on the one thread that owns the model.

Each tick: admit queued requests while there is a free row, drop the rows whose client
went away (or all of them when the server shuts down), spend the prefill budget (one
chunk of the oldest prompts still prefilling), then step every row that is drafting
and hand its events to its request. A row whose reply ends leaves at that tick and its
cache goes back to the prompt cache; a new request starts prefilling at the next one.

A row is today's serial turn taken apart (chat/session.py `_turn`): its own
`TurnCache` (cut back to what the prompt cache held, prefilled in the same chunks,
rolled back to the stable boundary at the end), a denoiser on that cache and a
`Drafting`. Its randomness is its own (a `KeyStream` from the request's seed, which
draws what `mx.random.seed(seed)` would), so a seeded reply does not depend on the other
rows; with one row the step is the row's own `denoiser.step`, and the reply is the
serial server's, token for token. An infill (`suffix`, POST /infill: several candidate
runs and a scoring pass, not one drafting) runs on the session's own cache as the serial
server runs it, one event per tick beside the rows; one at a time, the next waiting.
"""

from __future__ import annotations

import collections
import queue
import random
import traceback
from typing import Any, Callable, Deque, Iterator, List, Optional

from ..chat.turn_cache import CacheState, TurnCache
from ..generation.api import make_denoiser, on_device
from ..generation.batch import BatchDrafter, RowFailed
from ..generation.events import Summary
from ..generation.loop import Drafting, text_decoder
from ..generation.noise import KeyStream
from ..generation.settings import SEED_MAX


class _RowCache:
    """A row's cache as the prompt cache sees a session: states swapped and forked."""

    def __init__(self, backend, max_new_tokens):
        self.backend = backend
        self.kv = TurnCache(backend, max_new_tokens)

    def swap_state(self, state: Optional[CacheState]) -> CacheState:
        return self.kv.swap(state)

    def fork_state(self, state: CacheState) -> CacheState:
        return self.kv.fork(state)


class Row:
    """One request in the batch: its cache, its prefill and then its drafting."""

    def __init__(self, task: Any, cache: _RowCache, out):
        self.task, self.cache, self.out = task, cache, out
        self.job = task.job
        self.keep = 0  # prompt tokens the prompt cache held
        self.chunks: Optional[Iterator[int]] = None  # its prefill (TurnCache.prefill_chunks)
        self.announced: Optional[int] = None  # tokens of the chunk the prefill encodes next
        self.uid: Optional[int] = None  # its id in the BatchDrafter once drafting

    @property
    def drafting(self) -> bool:
        return self.uid is not None


class Scheduler:
    """Runs the engine's queued tasks (engine.py's `Engine`: its queue, counts, prompt
    cache and session) in batches of up to `max_batch` rows; `output(job)` makes the
    `Output` a row's reply accumulates in."""

    def __init__(self, engine: Any, max_batch: int, output: Callable[[Any], Any], prefill_tokens: int = 512):
        self.engine = engine
        self.output = output
        self.session = engine.session
        self.model = self.session.model
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.drafter = BatchDrafter(self.model)
        self.rows: List[Row] = []  # admission order
        # An infill on the session's cache (engine.alone), one event per tick, and the
        # infills waiting for that cache (not begun yet: they still count as waiting).
        self.alone: Optional[Iterator[None]] = None
        self.waiting_alone: Deque[Any] = collections.deque()
        self.closing = False
        self.text = text_decoder(self.session.tokenizer)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Until the engine is closed: wait for work, then tick while any row is left."""
        while not self.closing:
            self._admit(block=True)
            with on_device(self.model):
                while self.busy:
                    try:
                        self.tick()
                    except Exception as e:  # a bug of ours: every row gets it, the server goes on
                        traceback.print_exc()
                        for row in list(self.rows):
                            self._leave(row, error=e)
                        self._end_alone(e)

    @property
    def busy(self) -> bool:
        return bool(self.rows) or self.alone is not None or bool(self.waiting_alone)

    def tick(self) -> None:
        self._admit(block=False)
        self._drop_gone()
        self._prefill()
        for uid, events in self.drafter.step():
            row = next(r for r in self.rows if r.uid == uid)
            self._emit(row, events)
        self._step_alone()

    # -- an infill on the session's cache ------------------------------------------------------

    def _step_alone(self) -> None:
        """One event of the running infill (it polls its client and the shutdown itself),
        or the start of the next waiting one."""
        while self.alone is None and self.waiting_alone:
            task = self.waiting_alone.popleft()
            if self.engine.begin(task):  # False: its client left while it waited
                self.alone = self.engine.alone(task)
        if self.alone is not None:
            if next(self.alone, StopIteration) is StopIteration:
                self.alone = None

    def _end_alone(self, error: BaseException) -> None:
        if self.alone is not None:
            alone, self.alone = self.alone, None
            _throw(alone, error)

    # -- admission ------------------------------------------------------------------------

    def _admit(self, block: bool) -> None:
        engine = self.engine
        while len(self.rows) + (self.alone is not None) < self.max_batch and not self.closing:
            try:
                task = engine.tasks.get(block=block and not self.busy)
            except queue.Empty:
                return
            if task is None:
                self.closing = True
                return
            if task.job.infill is not None:  # the session's cache, one infill at a time
                self.waiting_alone.append(task)
                continue
            if not engine.begin(task):
                continue
            try:
                if engine.stopping is not None:
                    raise engine.shutdown_error()
                self.rows.append(self._start(task))
            except BaseException as e:  # handed to the request's thread
                self._end(None, task, error=e)

    def _start(self, task) -> Row:
        engine, split = self.engine, task.job.split
        cache = _RowCache(self.session.backend, lambda: self.session.settings.gen.max_new_tokens)
        row = Row(task, cache, self.output(task.job))
        engine.prompt_cache.checkout(cache, split.keys[: split.stable])
        row.keep, _, _ = cache.kv.cut_to(split, False)
        row.chunks = cache.kv.prefill_chunks(split, row.keep)
        row.announced = next(row.chunks, None)
        return row

    # -- cancellation -----------------------------------------------------------------------

    def _drop_gone(self) -> None:
        stopping = self.engine.stopping is not None
        for row in list(self.rows):
            if stopping:
                self._leave(row, error=self.engine.shutdown_error())
            elif row.task.sink.poll():
                self._leave(row, cancelled=True)

    # -- prefill ----------------------------------------------------------------------------

    def _prefill(self) -> None:
        """Chunks of the oldest prompts first, while the tick's budget lasts; a row whose
        prompt is in starts drafting (its first step is in this tick)."""
        spent = 0
        for row in [r for r in self.rows if not r.drafting]:
            try:
                while row.announced is not None and spent < self.prefill_tokens:
                    spent += row.announced
                    row.announced = next(row.chunks, None)  # encodes the announced chunk
                if row.announced is None:
                    self._start_drafting(row)
            except Exception as e:
                self._leave(row, error=e)

    def _start_drafting(self, row: Row) -> None:
        split, kv = row.job.split, row.cache.kv
        settings = row.job.opts.settings
        row.chunks = None
        kv.hold_boundary(split, settings.gen.max_new_tokens)
        row.out.cached = row.keep
        noise = self.engine.noise_for(settings.seed)
        keys = None
        if noise is None:  # the request's seed, or one of its own: never another row's draws
            keys = KeyStream(settings.seed if settings.seed is not None else random.randint(0, SEED_MAX))
        denoiser = make_denoiser(self.model, settings, cache=kv.cache, noise=noise, keys=keys)
        row.uid = self.drafter.insert(Drafting(denoiser, split.suffix, settings.gen, self.text))

    # -- events -----------------------------------------------------------------------------

    def _emit(self, row: Row, events) -> None:
        out = row.out
        for ev in events:
            if isinstance(ev, RowFailed):
                return self._leave(row, error=ev.error)
            out.take(ev, row.task.sink)
            if isinstance(ev, Summary):
                return self._leave(row)
        if out.done:  # a stop string or max_tokens: the reply ends at this canvas
            self._leave(row)

    def _leave(self, row: Row, error: Optional[BaseException] = None, cancelled: bool = False) -> None:
        """The row leaves: its cache back at the stable boundary and into the prompt
        cache, its request answered (or dropped, `cancelled`)."""
        self.rows.remove(row)
        if row.uid is not None:
            self.drafter.remove(row.uid)
        try:
            if row.chunks is not None:  # still prefilling: the cache holds a prefix, as it is
                row.chunks.close()
            else:
                row.cache.kv.end_turn(row.job.split)
        finally:
            self.engine.prompt_cache.checkin(row.cache)
            out = None if cancelled or error is not None else row.out
            self._end(out, row.task, error)

    def _end(self, out, task, error: Optional[BaseException] = None) -> None:
        task.out, task.error = out, error
        self.engine._count(running=-1)
        task.finish()

    # -- reporting --------------------------------------------------------------------------

    def health(self) -> dict:
        return {"max_batch": self.max_batch, "rows": len(self.rows) + (self.alone is not None),
                "prefilling": sum(not r.drafting for r in self.rows),
                "ticks": self.drafter.steps, "mean_batch": round(self.drafter.mean_batch, 3)}


def _throw(alone: Iterator[None], error: BaseException) -> None:
    """Ends `alone` (engine.alone) with `error`: its task gets it and is finished."""
    try:
        alone.throw(error)
    except (StopIteration, type(error)):
        pass

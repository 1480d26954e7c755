"""Several sequences drafted together, one denoising step of each per `BatchDrafter.step`.

Each row is a `Drafting` (loop.py: the drafter loop as a state machine) on a denoiser of
its own: its own encoder cache, self-conditioning, stop history, fast-mode freezing and
randomness (a `SeededNoise`, or a `KeyStream`, so no row's draws depend on another's).
A step encodes what each row has pending (its prompt, or the canvas it just committed),
starts the rows' new canvases, runs one decoder forward over every row that is
denoising (models/batched.py: attention per row over its own cache, the rest stacked)
and hands each row its logits to decide on. Rows converge on their own step counts:
a row whose reply ends leaves, and `insert` adds one between steps.

With one row denoising, the step is that row's own `denoiser.step`, the call the serial
drafter makes: a batch of one is the solo path, float for float. Fast-mode rows with
the active set (which computes a few positions against key and value buffers of their
own) also step alone, one after the other in the same `step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import mlx.core as mx

from ..models.batched import cache_views, decode_rows
from .events import Event
from .loop import Drafting


@dataclass
class RowFailed:
    """A row's last event: its encode or its step raised `error`; the row has left."""

    error: BaseException
    kind: str = "failed"


class BatchDrafter:
    """Rows of block diffusion on one model, stepped together."""

    def __init__(self, model):
        self.model = model
        self.rows: Dict[int, Drafting] = {}
        self._next_uid = 0
        self.steps = 0  # forwards run (one per `step` with rows denoising)
        self.row_steps = 0  # rows stepped, summed over those forwards

    def __len__(self) -> int:
        return len(self.rows)

    def insert(self, run: Drafting) -> int:
        """Adds a row (a fresh `Drafting` on its own denoiser); returns its id."""
        if run.done:
            raise ValueError("this drafting run has already ended")
        uid = self._next_uid
        self._next_uid += 1
        self.rows[uid] = run
        return uid

    def remove(self, uid: int) -> None:
        """Drops a row (its client went away); the others are untouched."""
        self.rows.pop(uid, None)

    def step(self) -> List[Tuple[int, List[Event]]]:
        """One denoising step of every row: (row id, its events) per row, in insertion
        order. A row whose reply ended (a Summary) or that failed (`RowFailed`) has left."""
        out: Dict[int, List[Event]] = {}
        ready = []
        for uid, run in list(self.rows.items()):
            try:
                # A canvas fixed whole commits at its start: then the next one is due.
                while run.pending_encode() is not None or run.needs_start:
                    if run.pending_encode() is not None:
                        run.encode()
                    else:
                        out.setdefault(uid, []).extend(run.start())
            except Exception as e:  # this row only: its cache is its own
                self._fail(out, uid, e)
                continue
            if run.done:  # its reply ended on canvases fixed whole
                del self.rows[uid]
                continue
            ready.append(uid)
        together = [u for u in ready if self.rows[u].denoiser.batchable]
        alone = [u for u in ready if u not in together]
        if len(together) == 1:
            alone, together = together + alone, []
        for uid in alone:
            self._run(out, uid, lambda run: run.denoiser.step(run.canvas, run.canvas_index, run.step))
        if together:
            self._step_together(out, together)
        self.steps += bool(ready)
        self.row_steps += len(ready)
        return [(uid, out[uid]) for uid in sorted(out)]

    def _step_together(self, out: Dict[int, List[Event]], uids: List[int]) -> None:
        runs = [self.rows[u] for u in uids]
        try:
            h = mx.concatenate([r.denoiser.decoder_input(r.canvas) for r in runs], axis=0)
            logits = decode_rows(self.model, h, [r.denoiser.cache.offset for r in runs],
                                 [cache_views(r.denoiser.cache) for r in runs])
        except Exception as e:  # the forward failed: every row in it (caches intact)
            for uid in uids:
                self._fail(out, uid, e)
            return
        for b, uid in enumerate(uids):
            self._run(out, uid, lambda run, row=logits[b:b + 1]: run.denoiser.decide(
                run.denoiser.scaled(row, run.step), run.canvas, run.canvas_index, run.step))
        del logits

    def _run(self, out: Dict[int, List[Event]], uid: int, step) -> None:
        run = self.rows[uid]
        try:
            events = run.stepped(*step(run))
        except Exception as e:
            self._fail(out, uid, e)
            return
        out.setdefault(uid, []).extend(events)
        if run.done:
            del self.rows[uid]

    def _fail(self, out: Dict[int, List[Event]], uid: int, error: BaseException) -> None:
        out.setdefault(uid, []).append(RowFailed(error))
        self.rows.pop(uid, None)

    @property
    def mean_batch(self) -> float:
        """Rows per step, on average."""
        return self.row_steps / max(self.steps, 1)

"""`mlx-diffgemma chat|generate|serve` on a model split over several ranks (`mlx.launch`):
rank 0 leads, the other ranks follow.

Rank 0 owns the terminal or the HTTP port and runs the command as on one Mac. Its chat
backend (`LeaderBackend`, made by `backends.make_backend`) sends every cache operation
and generation to the other ranks before running it: a small JSON message (token ids,
settings, seed, which cache) plus raw arrays for images. The other ranks (`follow`) run
the same operation on their own share of the model, so every collective inside the
model pairs up. During a generation rank 0 says, before each event, whether it reads on
(PULL) or stopped early (CLOSE: a stop string, a client gone, an interrupt), so the
followers run exactly the steps it runs. Caches and snapshots are named by numbers;
when rank 0 drops one, the next message tells the followers to drop theirs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .distributed import (
    LeaderStopped,
    RankError,
    broadcast_array,
    broadcast_int,
    broadcast_json,
    check_same_model,
    launched_group,
    lead,
    stage,
    watch,
)

PULL, CLOSE = 1, 2


class _Names:
    """Rank 0's numbers for the caches and snapshots the followers hold copies of."""

    def __init__(self):
        self.next = 0
        self.ids: Dict[int, int] = {}
        self.dropped: List[int] = []

    def of(self, obj) -> Optional[int]:
        if obj is None:
            return None
        key = id(obj)
        if key not in self.ids:
            self.ids[key] = self.next
            weakref.finalize(obj, self._drop, key, self.next)
            self.next += 1
        return self.ids[key]

    def _drop(self, key: int, n: int) -> None:
        self.ids.pop(key, None)
        self.dropped.append(n)

    def take_dropped(self) -> List[int]:
        out, self.dropped = self.dropped, []
        return out


_names = _Names()
_active: List[Optional["Lockstep"]] = [None]  # rank 0's generation the followers are in


def _images_out(images) -> tuple:
    if images is None:
        return None, []
    meta = {"num_soft_tokens": list(images.num_soft_tokens), "digests": list(images.digests)}
    return meta, [images.pixel_values, images.image_position_ids]


def _images_in(meta, arrays):
    if meta is None:
        return None
    from .images import ImageInputs

    return ImageInputs(arrays[0], arrays[1], meta["num_soft_tokens"], meta["digests"])


def _noise_out(noise) -> Optional[Dict[str, int]]:
    from .noise import SeededNoise

    if noise is None:
        return None
    if not isinstance(noise, SeededNoise):
        raise ValueError("a split model's ranks can share only SeededNoise (or no noise source)")
    return {"seed": noise.seed}


class LeaderBackend:
    """Rank 0's MLX chat backend: each operation is sent to the other ranks, then run."""

    def __init__(self, base, group):
        self.base = base
        self.group = group

    def __getattr__(self, name: str) -> Any:  # name, canvas_length, cache_bytes, ...
        return getattr(self.base, name)

    def _send(self, op: str, arrays=(), **fields) -> None:
        msg = dict(fields, op=op, dropped=_names.take_dropped(), arrays=len(arrays))
        broadcast_json(msg, self.group)
        for a in arrays:
            broadcast_array(np.asarray(a), self.group)

    def new_cache(self, max_new_tokens: int):
        cache = self.base.new_cache(max_new_tokens)
        self._send("new_cache", cache=_names.of(cache), max_new_tokens=max_new_tokens)
        return cache

    def encode(self, cache, ids, images=None) -> None:
        meta, arrays = _images_out(images)
        self._send("encode", arrays, cache=_names.of(cache), ids=[int(t) for t in ids], images=meta)
        with watch(f"encoding {len(ids)} tokens"):
            self.base.encode(cache, ids, images=images)

    def snapshot(self, cache):
        snap = self.base.snapshot(cache)
        self._send("snapshot", cache=_names.of(cache), snap=_names.of(snap))
        return snap

    def rollback(self, cache, length: int, snap):
        self._send("rollback", cache=_names.of(cache), length=length,
                   snap=None if snap is None else [snap[0], _names.of(snap[1])])
        return self.base.rollback(cache, length, snap)

    def fork(self, cache):
        new = self.base.fork(cache)
        self._send("fork", cache=_names.of(cache), new=_names.of(new))
        return new

    def stream_generate(self, tokenizer, prompt, cache, noise, seed, gen_kwargs, images=None):
        from .drafter import prompt_ids

        ids = prompt_ids(tokenizer, prompt)
        meta, arrays = _images_out(images)
        self._send("generate", arrays, cache=_names.of(cache), prompt=ids, noise=_noise_out(noise),
                   seed=seed, gen_kwargs=gen_kwargs, images=meta)
        events = self.base.stream_generate(tokenizer, ids, cache, noise, seed, gen_kwargs, images=images)
        return Lockstep(events, self.group)


class Lockstep:
    """Rank 0's event stream of a generation, each read announced to the followers."""

    def __init__(self, events, group):
        self.events, self.group = events, group
        self.done = False
        self.thread = threading.get_ident()
        _active[0] = self

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        broadcast_int(PULL, self.group)
        try:
            return next(self.events)
        except RankError as e:
            fatal(str(e))
        except BaseException:
            self._finish()
            raise

    def _finish(self) -> None:
        self.done = True
        if _active[0] is self:
            _active[0] = None

    def close(self) -> None:
        if not self.done:
            broadcast_int(CLOSE, self.group)
            self._finish()
        self.events.close()


def fatal(message: str) -> None:
    """Rank 0 ends the run: the followers hit the same error at the same point."""
    sys.stderr.write(f"mlx-diffgemma: error: {message}\n")
    sys.stderr.flush()
    os._exit(1)


# -- the other ranks ----------------------------------------------------------------------------


def follow(base, tokenizer, group) -> int:
    """Runs rank 0's operations on this rank's share until it says quit. `tokenizer()`
    gives the tokenizer, needed only for a prompt with images (its processor); a
    follower's generations decode no text."""
    caches: Dict[int, Any] = {}
    snaps: Dict[int, Any] = {}
    while True:
        msg = broadcast_json(None, group)  # waiting for rank 0: no time limit
        for n in msg["dropped"]:
            caches.pop(n, None)
            snaps.pop(n, None)
        op = msg["op"]
        if op == "quit":
            return 0
        arrays = [broadcast_array(None, group) for _ in range(msg["arrays"])]
        try:
            _run_op(base, tokenizer, group, op, msg, arrays, caches, snaps)
        except RankError:
            os._exit(1)  # rank 0 says why
        except (ValueError, KeyError):
            pass  # refused by the same check on rank 0, which reports it


def _run_op(base, tokenizer, group, op, msg, arrays, caches, snaps) -> None:
    cache = caches.get(msg.get("cache"))
    if op == "new_cache":
        caches[msg["cache"]] = base.new_cache(msg["max_new_tokens"])
    elif op == "encode":
        with watch(f"encoding {len(msg['ids'])} tokens"):
            base.encode(cache, msg["ids"], images=_images_in(msg["images"], arrays))
    elif op == "snapshot":
        snaps[msg["snap"]] = base.snapshot(cache)
    elif op == "rollback":
        snap = None if msg["snap"] is None else (msg["snap"][0], snaps.get(msg["snap"][1]))
        base.rollback(cache, msg["length"], snap)
    elif op == "fork":
        caches[msg["new"]] = base.fork(cache)
    elif op == "generate":
        _follow_generation(base, tokenizer, group, msg, arrays, cache)
    else:
        raise RuntimeError(f"unknown operation {op!r} from rank 0: run the same mlx-diffgemma on every rank")


def _follow_generation(base, tokenizer, group, msg, arrays, cache) -> None:
    from .noise import SeededNoise

    noise = None if msg["noise"] is None else SeededNoise(msg["noise"]["seed"])
    images = _images_in(msg["images"], arrays)
    events = base.stream_generate(None if images is None else tokenizer(), msg["prompt"], cache,
                                  noise, msg["seed"], msg["gen_kwargs"], images=images)
    try:
        while broadcast_int(None, group) == PULL:
            try:
                next(events)
            except StopIteration:
                break
            except (ValueError, KeyError) as e:
                if isinstance(e, RankError):
                    raise
                break  # rank 0 got the same error and stopped reading
    finally:
        events.close()


# -- the command line ---------------------------------------------------------------------------


def run_split(args, main: Callable[[], Optional[int]]) -> int:
    """Runs a chat/generate/serve command (`main`) under mlx.launch: as usual in a plain
    process or a group of one; on rank 0 leading the others; on the others following."""
    group = launched_group()
    if group is None:
        return main() or 0
    rank = group.rank()
    problem = None
    if args.backend != "mlx":
        problem = "--backend torch runs in one process; a model split over ranks runs on MLX"
    elif getattr(args, "target", None):
        problem = "--target is not supported with a model split over ranks; run it in one process"
    if problem:
        if rank == 0:
            raise ValueError(problem)
        return 2  # rank 0 says it
    if rank != 0:
        return _follower(args, group)
    lead["backend"] = lambda backend: LeaderBackend(backend, backend.model.group)
    try:
        return main() or 0
    finally:
        _stop_followers(group)


def _stop_followers(group) -> None:
    active = _active[0]
    if active is not None:
        if active.thread != threading.get_ident():
            return  # a server stopped mid-reply on its worker thread: signals end the ranks
        active.close()
    loading = stage["loading"]
    if loading is None:  # the followers wait to compare models: tell them to stop
        try:
            check_same_model(None, group, fingerprint=bytes(16))
        except LeaderStopped:
            pass
    elif loading == "loaded":
        broadcast_json({"op": "quit", "dropped": [], "arrays": 0}, group)


def _follower(args, group) -> int:
    from functools import lru_cache

    from .backends import MLXBackend
    from .loader import load, load_tokenizer
    from .paths import resolve_model_path
    from .sharding import ShardingError

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a blocked collective cannot see Python's
    sys.stdout = open(os.devnull, "w")  # rank 0 owns the terminal
    try:
        path = resolve_model_path(args.model, prefer="mlx")
        model, _ = load(path, group=group, tokenizer=False)
        tokenizer = lru_cache(None)(lambda: load_tokenizer(path, model.generation_defaults.eos_token_id))
    except (LeaderStopped, RankError, ShardingError):
        return 2  # rank 0 stopped, or hit the same error and reports it
    except Exception as e:
        sys.stderr.write(f"mlx-diffgemma {args.command}: error: rank {group.rank()}: "
                         f"{' '.join(str(e).split())}\n")
        return 2
    try:
        return follow(MLXBackend(model), tokenizer, group)
    except Exception as e:
        sys.stderr.write(f"mlx-diffgemma {args.command}: error: rank {group.rank()}: "
                         f"{type(e).__name__}: {' '.join(str(e).split())}\n")
        sys.stderr.flush()
        os._exit(1)

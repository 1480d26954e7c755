"""One conversation's encoder cache across turns (chat/prompt.py explains the stable
boundary it keeps): what it holds, cut back to what a new render shares, prefilled in
chunks, and back at the stable boundary at each turn's end."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

from .prompt import PromptSplit, common_prefix_len

# Tokens per encoder call while prefilling: bounds memory, and how long a Ctrl-C waits
# for the stop flag to be checked (about a second for the 26B model on CPU).
PREFILL_CHUNK = 512


@dataclass
class CacheState:
    """What a session's encoder cache holds: the cache, the exact tokens in it (a stable
    prefix of some rendered conversation) and the snapshot of a stable boundary, if one
    was kept. The server's prompt cache keeps several and swaps them in and out."""

    cache: Any
    ids: List[int]  # PromptSplit.keys: image tokens stand for their image
    snap: Optional[Tuple[int, Any]] = None


class TurnCache:
    """A backend's cache and the invariant kept on it: `ids` are exactly the tokens the
    cache holds, always a prefix of some rendering of the conversation, ending at a
    stable boundary after a finished turn. `max_new_tokens()` sizes a new cache."""

    def __init__(self, backend, max_new_tokens: Callable[[], int]):
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.resets = 0
        self.reset()

    def reset(self) -> None:
        self.cache = self.backend.new_cache(self.max_new_tokens())
        self.ids: List[int] = []  # what the cache holds at rest (a stable prefix)
        self.snap: Optional[Tuple[int, Any]] = None  # (tokens, snapshot) of a stable boundary

    def clear(self, note: Optional[str]) -> Optional[str]:
        self.reset()
        self.resets += 1
        return note

    def swap(self, state: Optional[CacheState]) -> CacheState:
        """Installs `state` (None: a new, empty cache) and returns the one it replaces."""
        old = CacheState(self.cache, self.ids, self.snap)
        if state is None:
            self.reset()
        else:
            self.cache, self.ids, self.snap = state.cache, list(state.ids), state.snap
        return old

    def fork(self, state: CacheState) -> CacheState:
        """A copy of `state` that can be cut and extended without touching it."""
        return CacheState(self.backend.fork(state.cache), list(state.ids), state.snap)

    def rollback(self, length: int) -> bool:
        """Brings the cache back to its first `length` tokens (the backend trims or
        restores the snapshot taken there); False when it cannot."""
        cache = self.backend.rollback(self.cache, length, self.snap)
        if cache is None:
            return False
        self.cache = cache
        self.ids = self.ids[:length]
        return True

    def cut_to(self, split: PromptSplit, keep_history: bool) -> Tuple[int, int, Optional[str]]:
        """What the cache holds must be a prefix of the new render, else it is cut back to
        the common prefix (after an interrupted turn it still holds the dropped message),
        or cleared when it cannot be cut. Returns (tokens kept, tokens cut, note)."""
        keep = split.block_start(common_prefix_len(self.ids, split.keys[: split.stable]))
        held = len(self.ids)
        if keep == held:
            return keep, 0, None
        if keep > 0 and self.rollback(keep):
            return keep, held - keep, None
        # Without history every message starts a new conversation: a cleared cache is
        # what it expects, not news.
        note = (f"the cache no longer matches the conversation and cannot be cut back: cleared, "
                f"re-encoding all {split.stable} tokens") if keep_history else None
        return 0, 0, self.clear(note)

    def prefill(self, split: PromptSplit, keep: int, should_stop) -> bool:
        """Encodes the new stable tokens in chunks (bounded memory; an image and its
        pixels go whole into one), stoppable between chunks; what was encoded before a
        stop stays (it is a prefix). False when stopped."""
        for _ in self.prefill_chunks(split, keep):
            if should_stop():
                return False
        return True

    def prefill_chunks(self, split: PromptSplit, keep: int) -> Iterator[int]:
        """`prefill` one chunk at a time: yields the tokens of the chunk it encodes next,
        before encoding it (the server's scheduler interleaves chunks with other
        requests' denoising steps; closing the iterator stops there)."""
        keys = split.keys
        for s, e, images in split.chunks(keep, split.stable, PREFILL_CHUNK):
            yield e - s
            try:
                # (text-only chunks call encode as it always was called)
                self.backend.encode(self.cache, split.ids[s:e], **({"images": images} if images else {}))
            except BaseException:
                self.clear("")  # an encoder call broke off midway: the cache is unknown
                raise
            self.ids = keys[:e]
        self.ids = keys[: split.stable]

    def hold_boundary(self, split: PromptSplit, max_new_tokens: int) -> None:
        """Makes sure the end of the turn can come back to the stable boundary."""
        C = self.backend.canvas_length
        turn_tokens = len(split.suffix) + (math.ceil(max_new_tokens / C) - 1) * C
        if self.backend.needs_snapshot(turn_tokens):
            self.snap = (split.stable, self.backend.snapshot(self.cache))

    def end_turn(self, split: PromptSplit) -> Optional[str]:
        """Back at the stable boundary whatever happened (None), or cleared (the note)."""
        if self.rollback(split.stable):
            if not self.backend.keeps_snapshots:
                self.snap = None
            return None
        return self.clear("the cache could not be rolled back and was cleared: the next turn "
                          "re-encodes the conversation")

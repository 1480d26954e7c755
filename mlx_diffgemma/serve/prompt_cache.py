"""The server's prompt cache: several conversations' encoder caches, kept across
requests so that a client resending its growing conversation has only the new tokens
encoded.

It holds `turn_cache.CacheState`s (cache, exact token ids, snapshot), least recently used
first, bounded in entries and in bytes. For a request it installs into the session the
entry sharing the longest prefix with the request's stable tokens; the session then
does what it does in chat (`ChatSession.complete`: cut back to the common prefix, encode
the rest, generate, roll back to the new stable boundary) and the state it ends with
goes back in as the most recent entry. An entry that the request only partly shares
(another conversation branching off its prefix) is forked, not cut, so that its own
conversation keeps it. No template, cut or rollback logic lives here.
"""

from __future__ import annotations

from typing import List, Sequence

from ..chat.prompt import common_prefix_len
from ..chat.session import ChatSession
from ..chat.turn_cache import CacheState


class PromptCache:
    def __init__(self, max_entries: int = 4, max_bytes: int = 8 << 30):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("the prompt cache's bounds must be >= 0")
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.entries: List[CacheState] = []  # least recently used first
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def nbytes(self, session: ChatSession) -> int:
        return sum(session.backend.cache_bytes(e.cache) for e in self.entries)

    def checkout(self, session: ChatSession, stable_ids: Sequence[int]) -> int:
        """Installs into `session` the best state for a prompt whose stable part is
        `stable_ids`; returns how many of its tokens that state holds."""
        best, shared = None, 0
        for entry in self.entries:  # later entries are more recent and win ties
            n = common_prefix_len(entry.ids, stable_ids)
            if n and n >= shared:
                best, shared = entry, n
        if best is None:
            self.misses += 1
            session.swap_state(None)
            return 0
        self.hits += 1
        if shared == len(best.ids):  # all of it is this conversation's: take it
            self.entries.remove(best)
            session.swap_state(best)
        else:
            session.swap_state(session.fork_state(best))
        return shared

    def checkin(self, session: ChatSession) -> None:
        """Takes the session's state back as the most recent entry (the session is left
        with an empty cache), dropping entries it makes redundant, then the least
        recently used ones over the bounds."""
        state = session.swap_state(None)
        if not state.ids or self.max_entries == 0:
            return
        # An entry holding a prefix of this one's tokens offers nothing this one does not.
        self.entries = [e for e in self.entries
                        if common_prefix_len(e.ids, state.ids) < len(e.ids)]
        self.entries.append(state)
        while len(self.entries) > self.max_entries:
            self.entries.pop(0)
        while self.entries and self.nbytes(session) > self.max_bytes:
            self.entries.pop(0)

    def clear(self) -> None:
        self.entries = []


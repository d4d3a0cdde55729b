"""Resolving a secret to its key's identity: SQL is the source, memory the cache.

The identity of a key is cached without expiry: its owner and environment never
change; its plan and scopes may, and their fingerprint is kept in Redis, where the
authorize script compares it with the cached one (a difference: the key is read
again). Whether the key may be used (active, paused, revoked, which secrets are
valid) is checked in Redis inside the authorize script, atomically with the
reservation, so a pause or a plan change reaches every replica at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from policyd.store import KeyRecord, Store, key_record

CACHE_ENTRIES_MAX = 1_000_000
NEGATIVE_CACHE_SECONDS = 1.0
NEGATIVE_ENTRIES_MAX = 100_000
EVICTED_SHARE = 10  # a full cache forgets its oldest tenth, not everything at once


def _make_room(entries: dict, capacity: int) -> None:
    """Forget the tenth held longest (a dict keeps insertion order) once `capacity` is reached, so that
    a full cache sends a few keys back to SQL, not every key at the same moment."""
    if len(entries) >= capacity:
        for stale in list(itertools.islice(entries, max(1, capacity // EVICTED_SHARE))):
            del entries[stale]


class KeyDirectory:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, KeyRecord] = {}
        self._unknown: dict[str, float] = {}

    def remember(self, secret_hash: str, record: KeyRecord) -> None:
        _make_room(self._known, CACHE_ENTRIES_MAX)
        self._known[secret_hash] = record
        self._unknown.pop(secret_hash, None)

    def forget(self, secret_hash: str) -> None:
        """Read this key from SQL again at its next use (its plan or scopes changed)."""
        self._known.pop(secret_hash, None)

    async def resolve(self, secret_hash: str) -> KeyRecord | None:
        record = self._known.get(secret_hash)
        if record is not None:
            return record
        seen = self._unknown.get(secret_hash)
        if seen is not None and time.monotonic() - seen < NEGATIVE_CACHE_SECONDS:
            return None
        row = await asyncio.to_thread(self.store.key_by_hash, secret_hash)
        if row is None:
            _make_room(self._unknown, NEGATIVE_ENTRIES_MAX)
            self._unknown[secret_hash] = time.monotonic()
            return None
        record = key_record(row)
        self.remember(secret_hash, record)
        return record

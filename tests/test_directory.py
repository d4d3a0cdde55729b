"""The key directory: SQL is the source of a key's identity, memory its cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from policyd import directory
from policyd.directory import KeyDirectory


class CountingStore:
    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.reads: list[str] = []

    def key_by_hash(self, secret_hash: str) -> object | None:
        self.reads.append(secret_hash)
        if secret_hash not in self.known:
            return None
        return SimpleNamespace(id=f"key_{secret_hash}", customer_id="c", workspace_id="", project_id="", team_id="",
                               environment="production", plan="pro", scopes=[], limits=[], owner_limits=[],
                               end_user_limits="")


async def test_a_full_cache_forgets_its_oldest_tenth_not_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory, "CACHE_ENTRIES_MAX", 20)
    store = CountingStore({f"h{i}" for i in range(21)})
    keys = KeyDirectory(store)  # type: ignore[arg-type]
    for i in range(21):
        assert (await keys.resolve(f"h{i}")).id == f"key_h{i}"
    assert len(store.reads) == 21
    for i in range(2, 21):  # still in memory: no SQL
        await keys.resolve(f"h{i}")
    assert len(store.reads) == 21
    await keys.resolve("h0")  # among the two oldest, forgotten when the 21st came: read again
    assert store.reads[-1] == "h0" and len(store.reads) == 22


async def test_unknown_secrets_are_remembered_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory, "NEGATIVE_ENTRIES_MAX", 10)
    store = CountingStore(set())
    keys = KeyDirectory(store)  # type: ignore[arg-type]
    for _ in range(3):
        assert await keys.resolve("nobody") is None
    assert store.reads == ["nobody"]  # one SQL read for a burst of the same unknown key
    for i in range(10):
        await keys.resolve(f"random-{i}")
    assert await keys.resolve("random-9") is None and store.reads.count("random-9") == 1  # the newest stay
    await keys.resolve("nobody")  # the oldest were forgotten to make room
    assert store.reads.count("nobody") == 2

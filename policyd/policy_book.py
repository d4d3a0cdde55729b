"""The active policy of this replica, and older versions still needed to settle requests."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from policyd import redis_keys
from policyd.loops import every
from policyd.policy import Policy, PolicyDocument
from policyd.store import Store

import yaml

log = logging.getLogger("policyd.policy")


def _from_canonical(version: int, canonical: str) -> Policy:
    return Policy(version=version, document=PolicyDocument.model_validate(yaml.safe_load(canonical)), canonical=canonical)


class PolicyBook:
    def __init__(self, store: Store, client: aioredis.Redis) -> None:
        self.store = store
        self.client = client
        self.current: Policy | None = None
        self._versions: dict[int, Policy] = {}

    def install(self, policy: Policy) -> None:
        self._versions[policy.version] = policy
        if self.current is None or policy.version > self.current.version:
            self.current = policy

    async def version(self, version: int) -> Policy | None:
        policy = self._versions.get(version)
        if policy is None:
            row = await asyncio.to_thread(self.store.policy_version, version)
            if row is None:
                return None
            policy = _from_canonical(row.version, row.canonical)
            self._versions[version] = policy
        return policy

    async def load_latest(self) -> None:
        row = await asyncio.to_thread(self.store.latest_policy)
        if row is not None and (self.current is None or row.version > self.current.version):
            self.install(_from_canonical(row.version, row.canonical))

    async def refresh(self) -> None:
        """Pick up a version another replica applied (announced in Redis)."""
        announced = await self.client.get(redis_keys.POLICY_VERSION)
        if announced is not None and (self.current is None or int(announced) > self.current.version):
            await self.load_latest()

    async def run(self, stop: asyncio.Event, interval_ms: int) -> None:
        await every(interval_ms / 1000, stop, self.refresh, "policy refresh")

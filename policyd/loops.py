"""Background work: run an action every interval until the service stops, surviving its errors."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger("policyd.loops")


async def every(interval_seconds: float, stop: asyncio.Event, action: Callable[[], Awaitable[object]],
                what: str) -> None:
    while not stop.is_set():
        try:
            await action()
        except Exception:
            log.exception("%s failed; trying again in %.1f s", what, interval_seconds)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
        except TimeoutError:
            pass

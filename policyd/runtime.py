"""How a started serve or writer process runs beside its threads and its garbage: set once it runs.

What startup made is kept out of the garbage collector's full passes. A full pass walks every object
the collector tracks and stops every thread while it does. Most of a started policyd's objects (its
modules, the gRPC and SQL machinery, the policy, the compiled scripts: about 100,000) live as long as
the process: walking them cost about 20 ms of CPU a pass, measured, and 80-95 ms of wall time on a busy
two-core machine, every decision waiting. Such passes come rarely under decisions alone, but a burst of
admin work (an audit, a report, the dashboard) sets several off. Frozen once the process has started
(gc.freeze), they are skipped: the same passes measured 10-12 ms. Garbage made later is collected as
before.

The event loop gets the interpreter back sooner from a busy thread. SQL work runs on threads (reports,
audits, the writer's batches) and holds the interpreter lock while its rows become Python objects; the
loop thread, which every decision needs after each wait, gets the lock only when the busy thread is
made to give it up, by default after 5 ms. At 0.5 ms, decisions while admin calls ran measured p50 2.6
and p99 15 ms instead of 3.9 and 27 in one pair of runs (`python -m bench.admin_load`; its run-to-run
noise is large, bench/RESULTS.md); with no busy thread nothing changes.

How late the loop runs what is due is measured all the time (policyd_event_loop_lag_seconds): every
decision waits that long whenever something holds the loop up (a callback doing too much at once, a
thread keeping the interpreter). ListUsage once built its 1,000 reply messages on the loop (5-8 ms);
decisions' p99 under admin work fell from 27.5 to 5-8 ms when that moved to a thread.
"""

from __future__ import annotations

import asyncio
import gc
import sys

from policyd import metrics

THREAD_SWITCH_SECONDS = 0.0005
LOOP_LAG_CHECK_SECONDS = 0.1


def settle_in() -> None:
    """Once a process runs: threads switch sooner, and what startup made (collected of its garbage
    first) is frozen out of later collections; the gauge policyd_heap_frozen_objects says how much."""
    sys.setswitchinterval(THREAD_SWITCH_SECONDS)
    gc.collect()
    gc.freeze()
    metrics.heap_frozen_objects.set(gc.get_freeze_count())


async def watch_loop_lag(stop: asyncio.Event, check_seconds: float = LOOP_LAG_CHECK_SECONDS) -> None:
    """Until `stop`: wait check_seconds, and record how much later than that the loop woke this up."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        try:
            await asyncio.wait_for(stop.wait(), timeout=check_seconds)
            return  # stopping: at once, not at the next check
        except TimeoutError:
            pass
        metrics.event_loop_lag_seconds.observe(max(loop.time() - started - check_seconds, 0.0))

"""Several `policyd serve` processes on one port (POLICYD_WORKERS): one Python process decides on one
core at a time, so a machine with more cores serves more decisions with more processes.

Each worker is a replica like any other (counters in the shared Redis, policy and keys refreshed from
SQL and invalidated across replicas), listening on the same address: the workers' gRPC servers set SO_REUSEPORT
on Linux (POLICYD_LISTEN_SHARED, which a single `policyd serve` leaves off), and the kernel spreads new connections
across the processes bound to it. A connection
stays with its worker, so a client needs several connections for its calls to spread (Envoy opens one
per worker thread; a gRPC client, one a channel).

What must run once runs in worker 0, started first and awaited until it listens: applying the
policy file (the others load it from SQL), the writer and the SQL loops, the dashboard. Worker i
serves its metrics on the metrics port + i. The supervisor (this module) forwards SIGTERM/SIGINT,
waits for every worker's graceful stop, and restarts a worker that dies on its own.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from policyd.settings import Settings

log = logging.getLogger("policyd.workers")

RESTART_DELAY_SECONDS = 1.0
FAILED_STARTS_MAX = 5  # a worker that exits this many times in a row within STARTUP_SECONDS of its start: given up
STARTUP_SECONDS = 30.0
STOP_MARGIN_SECONDS = 60.0  # past a worker's shutdown grace: its closing settles and its last drain


def check(settings: Settings) -> None:
    """Refuse what several processes cannot share (before anything starts)."""
    if not settings.redis_url:
        raise SystemExit("POLICYD_WORKERS > 1 needs a shared Redis (POLICYD_REDIS_URL): the embedded store lives "
                         "inside one process, so each worker would keep budgets of its own")
    host, _, port = settings.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) == 0:
        raise SystemExit(f"POLICYD_WORKERS > 1 needs a fixed host:port to share (listen is {settings.listen!r})")
    if settings.admin_listen and settings.admin_listen.rpartition(":")[2] in ("", "0"):
        raise SystemExit(f"POLICYD_WORKERS > 1 needs a fixed admin port (admin_listen is {settings.admin_listen!r})")


def worker_environment(settings: Settings, index: int) -> dict[str, str]:
    """The settings of worker `index` as POLICYD_* variables (a worker reads nothing else)."""
    values: dict[str, Any] = settings.model_dump()
    values.update(workers=1, listen_shared=True)
    if index > 0:
        values.update(policy_file="", writer_enabled=False, dashboard_listen="")
        if settings.metrics_listen:
            host, _, port = settings.metrics_listen.rpartition(":")
            values["metrics_listen"] = f"{host}:{int(port) + index}"
    return {f"POLICYD_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in values.items()}


def _connect_address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), int(port)


def _listening(listen: str) -> bool:
    try:
        with socket.create_connection(_connect_address(listen), timeout=1):
            return True
    except OSError:
        return False


class Supervisor:
    def __init__(self, settings: Settings, command: list[str] | None = None) -> None:
        check(settings)
        self.settings = settings
        self.command = command or [sys.executable, "-m", "policyd.cli", "serve"]
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * settings.workers
        self.started_at = [0.0] * settings.workers
        self.stopping = False

    def _start(self, index: int) -> subprocess.Popen[bytes]:
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
        env.update(worker_environment(self.settings, index))
        process = subprocess.Popen(self.command, env=env)
        self.workers[index] = process
        self.started_at[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, process.pid)
        return process

    def _stop_all(self, *_: Any) -> None:
        self.stopping = True
        for process in self.workers:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        if _listening(self.settings.listen):  # the workers would share it with whatever holds it (SO_REUSEPORT)
            raise SystemExit(f"cannot listen on {self.settings.listen}: something already listens there")
        signal.signal(signal.SIGTERM, self._stop_all)
        signal.signal(signal.SIGINT, self._stop_all)
        first = self._start(0)
        while not _listening(self.settings.listen):  # worker 0 applies the policy file before it listens
            if first.poll() is not None:
                log.error("worker 0 exited with %s before it listened", first.returncode)
                return first.returncode or 1
            if self.stopping:
                break
            time.sleep(0.1)
        for index in range(1, len(self.workers)):
            if not self.stopping:
                self._start(index)
        failed_starts = [0] * len(self.workers)  # exits in a row, each within STARTUP_SECONDS of its start
        code = 0
        while not self.stopping:
            for index, process in enumerate(self.workers):
                if process is not None and process.poll() is not None and not self.stopping:
                    quick = time.monotonic() - self.started_at[index] < STARTUP_SECONDS
                    failed_starts[index] = failed_starts[index] + 1 if quick else 0
                    if failed_starts[index] >= FAILED_STARTS_MAX:  # it cannot start (a setting, an address taken)
                        log.error("worker %d exited with %s %d times in a row at its start; stopping", index,
                                  process.returncode, failed_starts[index])
                        code = process.returncode or 1
                        self._stop_all()
                        break
                    log.error("worker %d (pid %d) exited with %s; restarting it", index, process.pid,
                              process.returncode)
                    time.sleep(RESTART_DELAY_SECONDS)
                    if not self.stopping:
                        self._start(index)
            time.sleep(0.2)
        stop_timeout = self.settings.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        deadline = time.monotonic() + stop_timeout
        for index, process in enumerate(self.workers):
            if process is None:
                continue
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in %.0f s; killed", index, stop_timeout)
                process.kill()
                process.wait()
            code = code or (process.returncode if process.returncode and process.returncode > 0 else 0)
        log.info("policyd workers stopped")
        return code

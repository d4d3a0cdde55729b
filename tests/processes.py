"""policyd as separate processes, the way it runs in production."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.servers import free_port, wait_port


_LOGS = tempfile.TemporaryDirectory(prefix="policyd-test-logs-")  # removed when the test run ends


def log_file(prefix: str) -> Path:
    """A new log file for a process a test starts, in the run's own log directory."""
    handle, path = tempfile.mkstemp(prefix=prefix, suffix=".log", dir=_LOGS.name)
    os.close(handle)
    return Path(path)


def policyd_command() -> list[str]:
    installed = Path(sys.executable).parent / "policyd"
    return [str(installed)] if installed.exists() else [sys.executable, "-m", "policyd.cli"]


class PolicydProcess:
    def __init__(self, redis_url: str, database_url: str, *, policy: str = "", extra_env: dict[str, str] | None = None,
                 cwd: str | None = None, port: int = 0) -> None:
        self.port = port or free_port()  # a port of its own, or one a replica before it served on
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_file("policyd-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
        env.update({"POLICYD_LISTEN": self.address, "POLICYD_REDIS_URL": redis_url,
                    "POLICYD_DATABASE_URL": database_url, "POLICYD_PARTITIONS": "4",
                    "POLICYD_SWEEPER_INTERVAL_MS": "100",
                    "POLICYD_SHUTDOWN_DELAY_SECONDS": "0",  # no gateway checks its health (unless told)
                    **(extra_env or {})})
        args = [*policyd_command(), "serve"] + (["--policy", policy] if policy else [])
        self._started_as = (redis_url, database_url, {"policy": policy, "extra_env": extra_env, "cwd": cwd})
        with self.log_path.open("wb") as log:  # the process writes to its own copy of the handle
            self.process = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, timeout=60)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"policyd did not start:\n{self.log()}") from None

    def restarted(self, **more_env: str) -> "PolicydProcess":
        """A new process of the same settings (and `more_env`) on the same port (this one stopped or killed first)."""
        redis_url, database_url, kwargs = self._started_as
        return PolicydProcess(redis_url, database_url, port=self.port,
                              **{**kwargs, "extra_env": {**(kwargs["extra_env"] or {}), **more_env}})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def workers(self) -> list:
        """The worker processes of a serve started with POLICYD_WORKERS > 1 (psutil.Process each)."""
        import psutil

        return psutil.Process(self.process.pid).children()

    def listening_workers(self, count: int, timeout: float = 60) -> list:
        """The workers, once `count` of them listen on the port (each binds it as it becomes ready)."""
        import time

        import psutil

        def listening(worker: psutil.Process) -> bool:
            try:
                return any(c.laddr.port == self.port and c.status == psutil.CONN_LISTEN
                           for c in worker.net_connections(kind="tcp"))
            except psutil.NoSuchProcess:
                return False

        deadline = time.monotonic() + timeout
        while True:
            workers = [w for w in self.workers() if listening(w)]
            if len(workers) == count:
                return workers
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{len(workers)} of {count} workers listen:\n{self.log()}")
            time.sleep(0.1)


class WriterProcess:
    """`policyd writer`: the stream-to-SQL writer and background loops in a process of their own."""

    def __init__(self, redis_url: str, database_url: str, extra_env: dict[str, str] | None = None) -> None:
        import time

        self.log_path = log_file("policyd-writer-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
        env.update({"POLICYD_REDIS_URL": redis_url, "POLICYD_DATABASE_URL": database_url, "POLICYD_PARTITIONS": "4",
                    **(extra_env or {})})
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([*policyd_command(), "writer"], env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "policyd writer running" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"policyd writer did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

"""Real servers for the tests: redis-server and PostgreSQL from Debian's packages,
started on 127.0.0.1 on free ports in temp dirs, and stopped by the tests."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port never handed out before in this test run: two asked for at once (a test's policyd and its
    Envoy) are never the same, nor one a process started earlier may still hold."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@contextlib.contextmanager
def taken_address() -> Iterator[tuple[socket.socket, str]]:
    """A socket listening on a free loopback port, and its address: an address another process holds (or a server
    that takes connections and never answers)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken, f"127.0.0.1:{taken.getsockname()[1]}"


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class RedisServer:
    def __init__(self, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise RuntimeError("redis-server is not installed: run scripts/system-deps.sh (make test does)")
        self.dir = tempfile.mkdtemp(prefix="policyd-redis-")
        self.port = free_port()
        self.args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                     "--save", "", "--appendonly", "yes" if appendonly else "no", "--daemonize", "no",
                     "--logfile", os.path.join(self.dir, "redis.log")]
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run scripts/system-deps.sh (make test does)")
    return Path(found[-1]).parent


class PostgresServer:
    """A throwaway cluster. initdb refuses to run as root, so as root it runs as the `postgres` user."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.dir = tempfile.mkdtemp(prefix="policyd-pg-")
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self._run([str(self.bin / "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-sync"])
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            self._as_user([str(self.bin / "postgres"), "-D", self.data, "-p", str(self.port), "-h", "127.0.0.1",
                           "-k", self.dir, "-c", "fsync=off", "-c", "full_page_writes=off",
                           "-c", "synchronous_commit=off", "-c", "max_connections=200"]),
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "pg.log"), "ab"),
        )
        wait_port(self.port)
        self._wait_ready()

    def stop(self) -> None:
        """Fast shutdown (open connections are cut); the data stays for start()."""
        if self.process.poll() is None:
            # pg_ctl signals the postmaster itself (runuser, its parent here, forwards no signal)
            self._run([str(self.bin / "pg_ctl"), "stop", "-D", self.data, "-m", "fast", "-w", "-t", "30"])
            self.process.wait(timeout=30)

    def _as_user(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self.user else args

    def _run(self, args: list[str]) -> None:
        subprocess.run(self._as_user(args), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.dsn("postgres"), autocommit=True).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        """Stopped at once (its data is thrown away): a postmaster sent SIGTERM waits for its clients to leave
        (a smart shutdown)."""
        if self.process.poll() is None:
            subprocess.run(self._as_user([str(self.bin / "pg_ctl"), "stop", "-D", self.data, "-m", "immediate", "-w",
                                          "-t", "15"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


class RedisCluster:
    """A real Redis Cluster on loopback: 3 masters + 3 replicas, made with redis-cli --cluster create."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        import random

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.dir = tempfile.mkdtemp(prefix="policyd-cluster-")
        count = masters * (1 + replicas)
        self.ports: list[int] = []
        rng = random.Random()
        while len(self.ports) < count:
            port = rng.randrange(20000, 30000)
            if port not in self.ports and _port_pair_free(port):
                self.ports.append(port)
        self.processes = []
        for port in self.ports:
            node = os.path.join(self.dir, str(port))
            os.makedirs(node)
            self.processes.append(subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", node, "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000", "--save", "",
                 "--appendonly", "no", "--logfile", os.path.join(node, "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_port(port)
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", str(replicas), "--cluster-yes"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [subprocess.run([cli, "-p", str(p), "cluster", "info"], capture_output=True, text=True).stdout
                      for p in self.ports]
            if all("cluster_state:ok" in s for s in states):
                break
            time.sleep(0.2)
        else:
            raise TimeoutError("the cluster never reached cluster_state:ok")

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

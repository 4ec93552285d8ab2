"""A real local Redis Cluster (3 masters + 3 replicas) started by the tests.

Six ``redis-server`` processes on free loopback ports, joined by ``redis-cli --cluster
create``. Each node also listens on its port + 10000 (the cluster bus), which another
process may hold: the cluster is then started again on new ports. A missing binary
skips the tests, or fails them under ``CI=true`` (:func:`tests.servers.unavailable`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import unavailable

NODES = 6
ATTEMPTS = 5


class PortTaken(Exception):
    """A node could not listen on its port or on its bus port."""


def _free_cluster_port() -> int:
    """A loopback port P such that P and P + 10000 are both free right now."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _ask(port: int, *command: str, timeout: float = 1.0) -> str:
    """One command to 127.0.0.1:port through ``redis-cli``; its output, or "" on failure."""
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
        check=False,
    )
    return done.stdout if done.returncode == 0 else ""


class LocalRedisCluster:
    """Six ``redis-server`` cluster nodes; tests may kill or pause one by its pid."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
        )
        if binary is None or shutil.which("redis-cli") is None:
            unavailable("redis-server/redis-cli are not installed (Debian package redis-server)")
        self.binary = str(binary)
        self.dir = tempfile.mkdtemp(prefix="cachedecor-redis-cluster-")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for attempt in range(ATTEMPTS):
            try:
                self._start()
                return
            except PortTaken:
                self.stop(remove=False)
                if attempt == ATTEMPTS - 1:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    raise
            except BaseException:
                self.stop()
                raise

    @property
    def ports(self) -> list[int]:
        return sorted(self.procs)

    @property
    def url(self) -> str:
        """A startup node's URL: the client learns the other nodes from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def _start(self) -> None:
        ports: list[int] = []
        while len(ports) < NODES:
            port = _free_cluster_port()
            if port not in ports:
                ports.append(port)
        for port in ports:
            self._spawn(port)
        for port in ports:
            self._wait_listening(port)
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}{created.stderr}")
        self.wait_ok()

    def _spawn(self, port: int) -> None:
        """Start the node of ``port`` (again: it rejoins from its nodes-P.conf)."""
        self.procs[port] = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                os.path.join(self.dir, f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                os.path.join(self.dir, f"{port}.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _wait_listening(self, port: int, timeout: float = 10.0) -> None:
        """Until the node answers PING; :class:`PortTaken` if it exited (port or bus taken)."""
        proc = self.procs[port]
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise PortTaken(f"redis-server on {port} exited: {self.log(port)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {port} did not start: {self.log(port)}")
            time.sleep(0.01)

    def log(self, port: int) -> str:
        try:
            with open(os.path.join(self.dir, f"{port}.log")) as fh:
                return fh.read()[-1500:]
        except OSError:
            return ""

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Poll every live node until its ``CLUSTER INFO`` says ``cluster_state:ok`` and
        its ``CLUSTER NODES`` shows three masters holding slots, each with a replica."""
        deadline = time.monotonic() + timeout
        pending = [p for p, proc in self.procs.items() if proc.poll() is None]
        while pending:
            info = _ask(pending[0], "CLUSTER", "INFO")
            masters, replicas = self._roles(pending[0])
            if "cluster_state:ok" in info and len(masters) == 3 and len(replicas) == 3:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {pending[0]} not ok after {timeout}s: {info}")
            time.sleep(0.02)

    def _roles(self, port: int) -> tuple[list[int], list[int]]:
        """(masters holding slots, replicas), as the node on ``port`` sees them."""
        masters, replicas = [], []
        for line in _ask(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            node = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            if "fail" in fields[2]:
                continue
            if "master" in fields[2] and len(fields) > 8:
                masters.append(node)
            elif "slave" in fields[2] and fields[3] != "-":
                replicas.append(node)
        return sorted(masters), sorted(replicas)

    def masters(self) -> list[int]:
        """The ports of the masters (nodes holding slots), as the cluster sees them now."""
        live = [p for p, proc in self.procs.items() if proc.poll() is None]
        return self._roles(live[0])[0]

    def pid(self, port: int) -> int:
        return self.procs[port].pid

    def kill(self, port: int) -> None:
        """SIGKILL the node of ``port``; :meth:`restart` brings it back (as a replica,
        once its replica was promoted)."""
        proc = self.procs[port]
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()

    def pause(self, port: int) -> None:
        """SIGSTOP the node of ``port``; :meth:`resume` continues it."""
        self.procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def wait_promoted(self, dead: int, timeout: float = 30.0) -> None:
        """Poll until a replica of the killed master ``dead`` has taken its slots."""
        deadline = time.monotonic() + timeout
        while True:
            live = [p for p, proc in self.procs.items() if proc.poll() is None]
            if all(len(self._roles(p)[0]) == 3 and dead not in self._roles(p)[0] for p in live):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica took the slots of {dead} after {timeout}s")
            time.sleep(0.05)

    def restart(self, port: int) -> None:
        """Start a killed node again on its port and wait until the cluster is whole."""
        self.kill(port)
        self._spawn(port)
        self._wait_listening(port)
        self.wait_ok()

    def client(self, port: int) -> Any:
        """A plain (non-cluster) client of one node, for checks behind the cache's back."""
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def flush(self) -> None:
        """Empty every master (replicas follow)."""
        for port in self.masters():
            with self.client(port) as node:
                node.flushall()

    def stop(self, *, remove: bool = True) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
        self.procs = {}
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for name in os.listdir(self.dir):
                os.unlink(os.path.join(self.dir, name))


@pytest.fixture(scope="module")
def redis_cluster_server() -> Iterator[LocalRedisCluster]:
    """One local Redis Cluster for the module (starting one takes about a second)."""
    cluster = LocalRedisCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(name="redis_cluster")
def clean_redis_cluster(redis_cluster_server: LocalRedisCluster) -> LocalRedisCluster:
    """The module's cluster, every node ok, empty."""
    redis_cluster_server.wait_ok()
    redis_cluster_server.flush()
    return redis_cluster_server

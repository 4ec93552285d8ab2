"""Real servers for the tests: memcached and twemproxy processes we start, PostgreSQL and Redis we find.

A server that is missing makes its tests skip, except under ``CI=true`` where the
environment promises every server and a missing one is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_URL = os.environ.get("CACHEDECOR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CACHEDECOR_TEST_REDIS", "redis://127.0.0.1:6379/15")


def unavailable(what: str) -> None:
    """Skip the test, or fail it where CI promises the server."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: required servers must be present)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.01)


def memcached_binary() -> str | None:
    return shutil.which("memcached") or (
        "/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None
    )


class Memcached:
    """A memcached process on a free loopback port that tests can kill, pause and restart."""

    def __init__(
        self,
        port: int | None = None,
        *,
        threads: int = 1,
        item_size: str | None = None,
        extra: list[str] | None = None,
    ) -> None:
        binary = memcached_binary()
        if binary is None:
            unavailable("memcached is not installed (make test installs it)")
        self.binary = binary
        self.port = port or free_port()
        self.threads = threads
        self.item_size = item_size
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            self.binary,
            "-l",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "0",
            "-t",
            str(self.threads),
            "-m",
            "64",
        ]
        if self.item_size:
            cmd += ["-I", self.item_size]
        cmd += self.extra
        if os.geteuid() == 0:
            cmd += ["-u", "root"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.proc.kill()
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"memcached did not start on port {self.port}: {err}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP, and wait until the kernel has actually stopped the process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._wait_for_state(stopped=True)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self._wait_for_state(stopped=False)

    def _wait_for_state(self, *, stopped: bool, timeout: float = 10.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
            if (state in ("T", "t")) == stopped:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"memcached {self.proc.pid} did not {'stop' if stopped else 'resume'}")
            time.sleep(0.001)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


@contextmanager
def running_memcached(**kwargs: object) -> Iterator[Memcached]:
    server = Memcached(**kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def nutcracker_binary() -> str | None:
    """twemproxy's binary (Debian installs it in /usr/sbin, off a normal user's PATH)."""
    return shutil.which("nutcracker") or (
        "/usr/sbin/nutcracker" if os.path.exists("/usr/sbin/nutcracker") else None
    )


class Nutcracker:
    """twemproxy (``nutcracker``) on a free loopback port in front of memcached ``backends``.

    The pool hashes keys with ketama over the backends and never ejects one
    (``auto_eject_hosts: false``): a backend that is down answers errors for its
    keys instead of having them remapped to the others. Its configuration is
    written to a temporary directory, with its log and pid file.
    """

    def __init__(self, backends: list[Memcached], *, timeout_ms: int = 1000) -> None:
        binary = nutcracker_binary()
        if binary is None:
            unavailable("twemproxy is not installed (Debian package nutcracker; make test installs it)")
        self.binary = binary
        self.backends = backends
        self.port = free_port()
        self.stats_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="cachedecor-nutcracker-")
        self.config = os.path.join(self.dir, "nutcracker.yml")
        servers = "".join(f"    - {b.url}:1\n" for b in backends)
        with open(self.config, "w") as fh:
            fh.write(
                "cachedecor:\n"
                f"  listen: 127.0.0.1:{self.port}\n"
                "  hash: md5\n"
                "  distribution: ketama\n"
                "  auto_eject_hosts: false\n"
                f"  timeout: {timeout_ms}\n"
                "  servers:\n"
                f"{servers}"
            )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            self.binary,
            "-c",
            self.config,
            "-s",
            str(self.stats_port),
            "-a",
            "127.0.0.1",
            "-o",
            os.path.join(self.dir, "nutcracker.log"),
            "-p",
            os.path.join(self.dir, "nutcracker.pid"),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"nutcracker did not start on port {self.port}: {self.log()}") from None

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "nutcracker.log")) as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def backend_for(self, key: str) -> Memcached:
        """The backend that holds ``key`` (asked of the backends, not computed)."""
        from pymemcache.client.base import Client

        owners = []
        for backend in self.backends:
            client = Client(("127.0.0.1", backend.port), connect_timeout=1, timeout=1)
            try:
                if client.get(key) is not None:
                    owners.append(backend)
            finally:
                client.close()
        assert len(owners) == 1, f"{key!r} is on {len(owners)} backends"
        return owners[0]

    def flush_backends(self) -> None:
        """Empty every backend (twemproxy does not pass ``flush_all``)."""
        from pymemcache.client.base import Client

        for backend in self.backends:
            if backend.proc is None or backend.proc.poll() is not None:
                backend.start()
            client = Client(("127.0.0.1", backend.port), connect_timeout=1, timeout=1)
            client.flush_all(noreply=False)
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def fake_server(answer: Callable[[bytes], bytes] | None = None, *, hang_up: bool = False) -> Iterator[str]:
    """A listening socket on loopback, for faults a real memcached cannot produce.

    Each connection is served in its own thread: ``answer`` turns what was received
    into the reply; without it, connections are accepted and never answered, or,
    with ``hang_up``, closed as soon as something arrives. Yields ``host:port``.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        conn.settimeout(0.05)
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(4096)
                except OSError:
                    continue
                if not data or hang_up:
                    return
                if answer is not None:
                    conn.sendall(answer(data))

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            thread = threading.Thread(target=serve, args=(conn,), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join()
        for thread in threads:
            thread.join()
        listener.close()

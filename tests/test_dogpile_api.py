"""dogpile.cache's own API on regions that cachedecor configures, compared with dogpile's backend.

dogpile's backend is used for real (``dogpile.cache.backends.memcached.PyMemcacheBackend``,
configured by its own name through dogpile's ``make_region``, which cachedecor does
not substitute) against the same memcached servers.
"""

from __future__ import annotations

import socket
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from dogpile.cache import CacheRegion, make_region
from dogpile.cache.api import NO_VALUE, CachedValue
from dogpile.cache.backends.memcached import PyMemcacheBackend as DogpileBackend
from dogpile.cache.proxy import ProxyBackend
from pymemcache.client.base import Client
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import ConfigError
from cachedecor.backends import PyMemcacheBackend
from cachedecor.config import region_settings
from cachedecor.keys import mangle_key
from tests.conftest import SQLCounter, memcached_config, once, rename_behind_the_cache
from tests.models import User


@cachedecor.cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    return [u for u in (session.get(User, i) for i in user_ids) if u is not None]


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


def dogpile_region(*urls: str, **arguments: Any) -> CacheRegion:
    """A region on dogpile's own pymemcache backend, with cachedecor's key mangler."""
    region = make_region(key_mangler=mangle_key).configure(
        "dogpile.cache.pymemcache", arguments={"url": list(urls), **arguments}
    )
    assert type(region.actual_backend) is DogpileBackend
    return region


def node_of(key: str) -> str:
    return region_settings("default").store.client.node_for(key)  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def rows(sqlite_engine: Engine) -> Engine:
    with Session(sqlite_engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in range(1, 4)])
        s.commit()
    return sqlite_engine


@pytest.fixture
def sql(rows: Engine) -> Iterator[SQLCounter]:
    counter = SQLCounter(rows)
    yield counter
    counter.close()


class TestRegionAPI:
    def test_get_or_create_with_a_distributed_lock_on_memcached(self, memcached: Any) -> None:
        region = cachedecor.configure_regions(
            memcached_config(memcached.url, arguments={"distributed_lock": True, "lock_timeout": 5})
        )["default"]
        calls: list[int] = []

        def create() -> dict[str, int]:
            calls.append(1)
            return {"answer": 42}

        assert region.get_or_create("some key", create) == {"answer": 42}
        assert region.get_or_create("some key", create) == {"answer": 42}
        assert calls == [1]

    def test_values_dogpile_stores_round_trip_and_keys_with_spaces_are_mangled(self, memcached: Any) -> None:
        region = cachedecor.configure_regions(memcached_config(memcached.url))["default"]

        @region.cache_on_arguments()
        def add(a: int, b: str) -> tuple[int, str]:
            return a + 1, b.upper()

        assert add(1, "two words") == (2, "TWO WORDS")
        assert add(1, "two words") == (2, "TWO WORDS")
        region.set("plain key", [1, 2, 3])
        assert region.get("plain key") == [1, 2, 3]

    def test_the_raw_client_returns_a_str_for_a_str_and_bytes_for_bytes(self, memcached: Any) -> None:
        region = cachedecor.configure_regions(memcached_config(memcached.url))["default"]
        client = region.backend.client
        client.set("text", "y")
        client.set("raw", b"y")
        client.set("number", 7)
        assert (client.get("text"), client.get("raw"), client.get("number")) == ("y", b"y", 7)

    def test_backend_set_takes_a_cached_value_as_dogpiles_does(self, memcached: Any) -> None:
        region = cachedecor.configure_regions(memcached_config(memcached.url))["default"]
        value = CachedValue({"a": 1}, {"ct": 1.0e9, "v": 2})
        region.backend.set("cv", value)
        assert region.backend.get("cv") == value
        assert region.get("cv", ignore_expiration=True) == {"a": 1}


class TestAFailingNodeIsAMissNotAnError:
    """With one of two nodes down, dogpile callers see misses, never an exception."""

    KEYS = [f"key{i}" for i in range(20)]

    @pytest.fixture
    def two_nodes(self, memcached_factory: Any) -> tuple[CacheRegion, Any, list[str]]:
        a, b = memcached_factory(), memcached_factory()
        region = cachedecor.configure_regions(
            memcached_config(a.url, b.url, arguments={"dead_timeout": 60, "timeout": 0.2})
        )["default"]
        region.set_multi({k: "cached" for k in self.KEYS})
        on_b = [k for k in self.KEYS if node_of(k) == b.url]
        assert 0 < len(on_b) < len(self.KEYS)
        return region, b, on_b

    @pytest.mark.parametrize("failure", ["killed", "paused"])
    def test_get_or_create_runs_the_creator_for_the_keys_of_the_failed_node(
        self, two_nodes: tuple[CacheRegion, Any, list[str]], failure: str
    ) -> None:
        region, b, on_b = two_nodes
        b.kill() if failure == "killed" else b.pause()
        created: list[str] = []

        def creator(key: str) -> Any:
            return lambda: created.append(key) or "created"

        values = [region.get_or_create(k, creator(k)) for k in self.KEYS]
        assert values == ["created" if k in on_b else "cached" for k in self.KEYS]
        assert created == on_b
        assert counters()["errors"] >= 1

    def test_get_multi_set_delete_and_get_or_create_multi_never_raise(
        self, two_nodes: tuple[CacheRegion, Any, list[str]]
    ) -> None:
        region, b, on_b = two_nodes
        b.kill()
        assert region.get_multi(self.KEYS) == [NO_VALUE if k in on_b else "cached" for k in self.KEYS]
        region.set("key0", "new")
        region.set_multi({k: "newer" for k in self.KEYS})
        assert region.get_multi(self.KEYS) == [NO_VALUE if k in on_b else "newer" for k in self.KEYS]
        region.delete(on_b[0])
        region.delete_multi(self.KEYS)
        created: list[tuple[str, ...]] = []

        def create(*keys: str) -> list[str]:
            created.append(keys)
            return [f"made {k}" for k in keys]

        assert region.get_or_create_multi(self.KEYS, create) == [f"made {k}" for k in self.KEYS]
        # one call for every key: deleted on the live node, unreadable on the other
        assert [sorted(keys) for keys in created] == [sorted(self.KEYS)]

    def test_a_distributed_lock_on_a_failed_node_lets_the_creator_run(self, memcached_factory: Any) -> None:
        a, b = memcached_factory(), memcached_factory()
        region = cachedecor.configure_regions(
            memcached_config(a.url, b.url, arguments={"distributed_lock": True, "dead_timeout": 60})
        )["default"]
        b.kill()
        # dogpile's lock key is "_lock" + key: some keys and locks live on the dead node
        locks_on_b = [k for k in self.KEYS if node_of("_lock" + k) == b.url]
        assert locks_on_b
        assert [region.get_or_create(k, lambda: "made") for k in self.KEYS] == ["made"] * len(self.KEYS)
        assert region.key_is_locked(locks_on_b[0]) is False


class TestForeignEntries:
    """Values another backend or version left on the servers are read or missed, never raised."""

    def test_values_of_dogpiles_backend_are_read_and_ours_are_read_by_it(self, memcached: Any) -> None:
        ours = cachedecor.configure_regions(memcached_config(memcached.url))["default"]
        theirs = dogpile_region(memcached.url)
        theirs.set("written by dogpile", {"from": "dogpile"})
        ours.set("written by cachedecor", {"from": "cachedecor"})
        # swapping backends on live servers (and a rolling deploy) keeps every value
        assert ours.get("written by dogpile") == {"from": "dogpile"}
        assert theirs.get("written by cachedecor") == {"from": "cachedecor"}
        assert ours.get_multi(["written by dogpile", "written by cachedecor"]) == [
            {"from": "dogpile"},
            {"from": "cachedecor"},
        ]
        assert counters()["bad_entries"] == 0

    @pytest.mark.parametrize(
        ("value", "flags"),
        [
            pytest.param(b"\x80\x05garbage", 0, id="bytes"),
            pytest.param(b"\x80\x05not a pickle", 1, id="broken-pickle"),
            pytest.param(b"\x80\x04K\x01.", 1, id="pickle-of-an-int"),
            pytest.param(b"y", 16, id="str"),
            pytest.param(b"\xff\xfe", 16, id="str-not-utf8"),
            pytest.param(b"12", 2, id="int"),
            pytest.param(b"x\x9c", 8, id="compressed"),
        ],
    )
    def test_an_unreadable_value_is_a_counted_miss(self, memcached: Any, value: bytes, flags: int) -> None:
        region = cachedecor.configure_regions(memcached_config(memcached.url))["default"]
        raw = Client(("127.0.0.1", memcached.port), serde=_Flags(flags))
        raw.set("unreadable", value, noreply=False)
        assert region.get("unreadable") is NO_VALUE
        assert region.get_multi(["unreadable"]) == [NO_VALUE]
        assert region.get_or_create("unreadable", lambda: "created") == "created"
        assert region.get("unreadable") == "created"
        assert counters()["bad_entries"] == 4  # get, get_multi, and get_or_create's two gets

    def test_a_cachedecor_entry_read_through_the_region_api_is_a_counted_miss(
        self, cache: Any, rows: Engine
    ) -> None:
        once(rows, get_user, 1)
        key = get_user.cache_key(1)
        assert get_user.region.get(key) is NO_VALUE
        assert counters()["bad_entries"] == 1

    @pytest.mark.parametrize("meta_protocol", [True, False], ids=["meta", "classic"])
    def test_an_entry_of_dogpiles_backend_under_a_row_key_is_a_counted_miss(
        self, memcached: Any, rows: Engine, sql: SQLCounter, meta_protocol: bool
    ) -> None:
        cachedecor.configure_regions(
            memcached_config(memcached.url, arguments={"meta_protocol": meta_protocol})
        )
        key = get_user.cache_key(1)
        dogpile = DogpileBackend({"url": [memcached.url]})
        dogpile.set(key, CachedValue({"id": 1, "name": "pickled"}, {"ct": 1.0e9, "v": 2}))
        dogpile.set(get_user.cache_key(2), "a str")
        assert once(rows, get_user, 1).name == "user1"
        assert [u.name for u in once(rows, get_users, [1, 2])] == ["user1", "user2"]
        assert counters()["bad_entries"] == 2
        sql.reset()
        assert [u.name for u in once(rows, get_users, [1, 2])] == ["user1", "user2"]  # refilled
        assert sql.count == 0


class _Flags:
    """A pymemcache serde that stores bytes under the given flags (as other writers do)."""

    def __init__(self, flags: int) -> None:
        self.flags = flags

    def serialize(self, key: Any, value: bytes) -> tuple[bytes, int]:
        return value, self.flags

    def deserialize(self, key: Any, value: bytes, flags: int) -> bytes:
        return value


class Recorder(ProxyBackend):  # type: ignore[misc]
    """The ProxyBackend of dogpile's documentation: overrides get and set, records calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    def get(self, key: str) -> Any:
        self.calls.append(("get", key))
        return self.proxied.get(key)

    def set(self, key: str, value: Any) -> None:
        self.calls.append(("set", key))
        self.proxied.set(key, value)

    def get_multi(self, keys: Any) -> Any:
        self.calls.append(("get_multi", tuple(keys)))
        return self.proxied.get_multi(keys)

    def set_multi(self, mapping: Any) -> None:
        self.calls.append(("set_multi", tuple(mapping)))
        self.proxied.set_multi(mapping)


class TestProxies:
    @staticmethod
    def exercise(region: CacheRegion, prefix: str) -> list[tuple[str, Any]]:
        proxy = Recorder()
        region.wrap(proxy)
        region.get_or_create(f"{prefix}one", lambda: 1)
        region.get_or_create(f"{prefix}one", lambda: 1)
        region.get_or_create_multi([f"{prefix}a", f"{prefix}b"], lambda *keys: list(keys))
        region.get(f"{prefix}a")
        region.set(f"{prefix}c", 3)
        return [(name, _strip(args, prefix)) for name, args in proxy.calls]

    def test_a_proxy_sees_the_calls_it_sees_with_dogpiles_backend(self, memcached: Any) -> None:
        ours = cachedecor.configure_regions(memcached_config(memcached.url))["default"]
        theirs = dogpile_region(memcached.url)
        seen = self.exercise(ours, "ours:")
        assert seen == self.exercise(theirs, "theirs:")
        assert seen[:4] == [("get", "one"), ("get", "one"), ("set", "one"), ("get", "one")]

    def test_the_decorators_do_not_go_through_proxies(self, cache: Any, rows: Engine) -> None:
        proxy = Recorder()
        get_user.region.wrap(proxy)
        once(rows, get_user, 1)
        once(rows, get_user, 1)
        cachedecor.invalidate(User, 1)
        assert proxy.calls == []
        assert counters()["hits"] == 1


def _strip(args: Any, prefix: str) -> Any:
    if isinstance(args, tuple):
        return tuple(a.removeprefix(prefix) for a in args)
    return args.removeprefix(prefix)


class _ClosingServer:
    """Accepts connections and closes each at once: a fault a real memcached does not produce."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join()


@pytest.fixture
def closing_server() -> Iterator[_ClosingServer]:
    server = _ClosingServer()
    yield server
    server.close()


class TestArguments:
    def attempts(self, server: _ClosingServer, **arguments: Any) -> int:
        backend = PyMemcacheBackend({"url": [server.url], "dead_timeout": 60, **arguments})
        with pytest.raises(Exception):  # noqa: B017 - whichever error the closed connection gives
            backend.client.get("k")
        assert backend.get("k") is NO_VALUE  # marked down now: no connection
        return server.connections

    def test_retry_attempts_counts_the_tries_as_dogpiles_does(self, closing_server: _ClosingServer) -> None:
        assert self.attempts(closing_server, enable_retry_client=True, retry_attempts=3) == 3

    def test_retry_for_limits_the_retries_to_those_errors(self, closing_server: _ClosingServer) -> None:
        n = self.attempts(
            closing_server, enable_retry_client=True, retry_attempts=3, retry_for=[TimeoutError]
        )
        assert n == 1

    def test_do_not_retry_for_excludes_errors(self, closing_server: _ClosingServer) -> None:
        from pymemcache.exceptions import MemcacheUnexpectedCloseError

        # the closed connection shows as a reset (OSError) or as an unexpected close
        closed = (OSError, MemcacheUnexpectedCloseError)
        n = self.attempts(closing_server, enable_retry_client=True, retry_attempts=3, do_not_retry_for=closed)
        assert n == 1

    def test_retry_options_without_enable_retry_client_warn_and_are_ignored(
        self, closing_server: _ClosingServer
    ) -> None:
        with pytest.warns(UserWarning, match="enable_retry_client is not set"):
            assert self.attempts(closing_server, retry_attempts=3) == 1

    def test_configure_regions_accepts_retry_for_and_refuses_what_dogpile_cannot_use(
        self, memcached: Any
    ) -> None:
        from pymemcache.exceptions import MemcacheUnexpectedCloseError

        args = {"enable_retry_client": True, "retry_attempts": 2}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cachedecor.configure_regions(
                memcached_config(
                    memcached.url, arguments={**args, "retry_for": (MemcacheUnexpectedCloseError,)}
                )
            )
        for bad, match in [
            ({"enable_retry_client": True}, "retry_attempts"),
            ({**args, "retry_for": ["TimeoutError"]}, "retry_for"),
            ({**args, "retry_for": (OSError,), "do_not_retry_for": (OSError,)}, "both name OSError"),
        ]:
            with pytest.raises(ConfigError, match=match):
                cachedecor.configure_regions(memcached_config(memcached.url, arguments=bad))

    @pytest.mark.parametrize(("arguments", "ttl"), [({"memcached_expire_time": 90}, 90), ({}, -1)])
    def test_memcached_expire_time_is_the_servers_expiry(
        self, memcached: Any, arguments: dict[str, Any], ttl: int
    ) -> None:
        region = cachedecor.configure_regions(memcached_config(memcached.url, arguments=arguments))["default"]
        region.set("expiring", "v")
        region.set_multi({"expiring2": "v", "expiring3": "v"})
        assert [_server_ttl(memcached.port, k) for k in ("expiring", "expiring2", "expiring3")] == [ttl] * 3


def _server_ttl(port: int, key: str) -> int:
    """The remaining time to live memcached reports for ``key`` (-1: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"mg %b t\r\n" % key.encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += sock.recv(100)
    code, *flags = reply.split()
    assert code == b"HD", reply
    ttl = int(next(f for f in flags if f.startswith(b"t"))[1:])
    return ttl if ttl < 0 else (ttl + 5) // 10 * 10  # the second may have turned


class TestRegionInvalidation:
    """dogpile's ``region.invalidate()`` covers the rows ``@cached_by_pk`` cached in the region."""

    @pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
    def test_rows_cached_before_it_are_read_again(
        self, cache: Any, rows: Engine, sql: SQLCounter, hard: bool
    ) -> None:
        assert once(rows, get_user, 1).name == "user1"
        assert [u.name for u in once(rows, get_users, [2, 3])] == ["user2", "user3"]
        for i in (1, 2, 3):
            rename_behind_the_cache(rows, i, f"renamed{i}")
        assert once(rows, get_user, 1).name == "user1"  # cached, as expected
        get_user.region.invalidate(hard=hard)
        sql.reset()
        assert once(rows, get_user, 1).name == "renamed1"
        assert [u.name for u in once(rows, get_users, [1, 2, 3])] == ["renamed1", "renamed2", "renamed3"]
        assert sql.selects() == 3  # user 1 once, then 2 and 3 (1 was refilled)
        sql.reset()
        assert once(rows, get_user, 1).name == "renamed1"
        assert [u.name for u in once(rows, get_users, [1, 2, 3])] == ["renamed1", "renamed2", "renamed3"]
        assert sql.count == 0  # refilled after the invalidation: hits again

    def test_the_regions_invalidation_strategy_is_asked(
        self, cache: Any, rows: Engine, sql: SQLCounter
    ) -> None:
        class EverythingIsInvalid:
            def is_invalidated(self, timestamp: float) -> bool:
                return True

        once(rows, get_user, 1)
        get_user.region.region_invalidator = EverythingIsInvalid()
        sql.reset()
        once(rows, get_user, 1)
        once(rows, get_user, 1)
        assert sql.selects() == 2

    def test_the_region_api_and_the_rows_are_invalidated_together(self, cache: Any, rows: Engine) -> None:
        region = get_user.region
        region.set("report", "old")
        once(rows, get_user, 1)
        region.invalidate()
        assert region.get("report") is NO_VALUE
        assert region.get_or_create("report", lambda: "new") == "new"
        rename_behind_the_cache(rows, 1, "renamed")
        assert once(rows, get_user, 1).name == "renamed"

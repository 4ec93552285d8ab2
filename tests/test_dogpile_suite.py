"""dogpile.cache's generic backend suites, run against ``cachedecor.pymemcache``.

The suites are the ones dogpile.cache publishes (``dogpile.testing.fixtures``),
inherited unmodified and wired to real memcached processes the way dogpile wires
its memcached backends in its own test module: plain, with a distributed lock
(with and without a lock timeout), the mutex suite, the serializer suite and the
retrying client, each on one node and on a cluster of three.

dogpile marks a few tests ``time_intensive``: they sleep for real (about 15 s a
class, over 2 minutes for all fourteen). Each runs where its mechanism is
exercised (listed in ``time_intensive`` below); every other test runs in every
class.
"""

from __future__ import annotations

from typing import Any, ClassVar

from dogpile.testing.fixtures import (
    _GenericBackendTestSuite,
    _GenericMutexTestSuite,
    _GenericSerializerTestSuite,
)

from tests.servers import Memcached

LOCK_TIMEOUT = 1


def _time_intensive(fn: Any) -> bool:
    return any(mark.name == "time_intensive" for mark in getattr(fn, "pytestmark", ()))


class _OnMemcached:
    """Starts the class's memcached nodes; checks the backend as dogpile's test module does."""

    backend = "cachedecor.pymemcache"
    nodes = 1
    arguments: ClassVar[dict[str, Any]] = {}
    #: the tests marked time_intensive that this class runs
    time_intensive: ClassVar[tuple[str, ...]] = ()
    config_args: ClassVar[dict[str, Any]]
    _servers: ClassVar[list[Memcached]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__.startswith("Test"):
            for name in dir(cls):
                if (
                    name.startswith("test_")
                    and name not in cls.time_intensive
                    and _time_intensive(getattr(cls, name))
                ):
                    setattr(cls, name, None)  # not collected here

    @classmethod
    def setup_class(cls) -> None:
        cls._servers = [Memcached() for _ in range(cls.nodes)]  # fails under CI=true if absent
        cls.config_args = {"arguments": {"url": [s.url for s in cls._servers], **cls.arguments}}
        super().setup_class()  # type: ignore[misc]

    @classmethod
    def teardown_class(cls) -> None:
        for server in cls._servers:
            server.stop()

    @classmethod
    def _check_backend_available(cls, backend: Any) -> None:
        # dogpile's check of its memcached backends: the raw client returns what was
        # stored, a str for a str (pymemcache's default serde does)
        client = backend._create_client()
        client.set("x", "y")
        assert client.get("x") == "y"


_MANGLER = {"key_mangler": lambda key: key.replace(" ", "_")}


class _Plain(_OnMemcached, _GenericBackendTestSuite):
    region_args = _MANGLER


class _DistributedLock(_OnMemcached, _GenericBackendTestSuite):
    region_args = _MANGLER
    arguments = {"distributed_lock": True}


class _DistributedLockWithTimeout(_OnMemcached, _GenericBackendTestSuite):
    region_args = _MANGLER
    arguments = {"distributed_lock": True, "lock_timeout": LOCK_TIMEOUT}


class _Mutex(_OnMemcached, _GenericMutexTestSuite):
    arguments = {"distributed_lock": True}


class _MutexWithTimeout(_OnMemcached, _GenericMutexTestSuite):
    arguments = {"distributed_lock": True, "lock_timeout": LOCK_TIMEOUT}


class _Serializer(_GenericSerializerTestSuite, _Plain):
    pass


class _Retry(_Plain):
    arguments = {"enable_retry_client": True, "retry_attempts": 3}


class TestOneNode(_Plain):
    pass


class TestOneNodeDistributedLock(_DistributedLock):
    time_intensive = ("test_threaded_dogpile",)


class TestOneNodeDistributedLockWithTimeout(_DistributedLockWithTimeout):
    time_intensive = ("test_threaded_dogpile",)


class TestOneNodeMutex(_Mutex):
    pass


class TestOneNodeMutexWithTimeout(_MutexWithTimeout):
    pass


class TestOneNodeSerializer(_Serializer):
    pass


class TestOneNodeRetry(_Retry):
    pass


class TestCluster(_Plain):
    nodes = 3
    time_intensive = ("test_threaded_dogpile", "test_threaded_get_multi", "test_region_expire")


class TestClusterDistributedLock(_DistributedLock):
    nodes = 3


class TestClusterDistributedLockWithTimeout(_DistributedLockWithTimeout):
    nodes = 3


class TestClusterMutex(_Mutex):
    nodes = 3
    time_intensive = ("test_mutex_threaded",)


class TestClusterMutexWithTimeout(_MutexWithTimeout):
    nodes = 3
    time_intensive = ("test_mutex_threaded",)


class TestClusterSerializer(_Serializer):
    nodes = 3


class TestClusterRetry(_Retry):
    nodes = 3

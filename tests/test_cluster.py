"""Three memcached nodes under load while nodes are killed, paused and restarted."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from pymemcache.client.base import Client
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor.config import region_settings
from tests.conftest import memcached_config, once, wait_until
from tests.models import User

ROWS = 30


@cachedecor.cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cachedecor.invalidates(User)
def bump(session: Session, user_id: int) -> None:
    user = session.get(User, user_id)
    assert user is not None
    user.version += 1
    session.commit()


@pytest.fixture
def cluster(pg_engine: Engine, memcached_factory: Any) -> tuple[Engine, list[Any]]:
    nodes = [memcached_factory() for _ in range(3)]
    cachedecor.configure_regions(
        memcached_config(
            *(n.url for n in nodes),
            arguments=dict(
                timeout=0.2, connect_timeout=0.2, dead_timeout=0.3, invalidation_retry_interval=0.05
            ),
        )
    )
    with Session(pg_engine) as s:
        s.add_all([User(id=i, name=f"u{i}", version=0) for i in range(ROWS)])
        s.commit()
    return pg_engine, nodes


def node_of(key: str) -> str:
    return region_settings("default").store.client.node_for(key)  # type: ignore[attr-defined,no-any-return]


def stale_entries(engine: Engine, nodes: list[Any]) -> list[int]:
    """Rows whose cached entry (on any node) differs from the database."""
    codec = region_settings("default").codec
    version_at = [p.key for p in User.__mapper__.column_attrs].index("version")
    stale = []
    with Session(engine) as s:
        truth = {u.id: u.version for u in s.query(User)}
    for node in nodes:
        client = Client(("127.0.0.1", node.port), connect_timeout=1, timeout=1)
        for row_id, version in truth.items():
            key = get_user.cache_key(row_id)
            data = client.get(key)
            if not data or data[:2] == b"\x00L":  # absent, a lease marker or a placeholder
                continue
            if codec.decode(key, data)[3][version_at] != version:
                stale.append(row_id)
        client.close()
    return stale


def test_keys_are_spread_over_all_nodes(cluster: tuple[Engine, list[Any]]) -> None:
    _, nodes = cluster
    assert {node_of(get_user.cache_key(i)) for i in range(ROWS)} == {n.url for n in nodes}


def test_keys_of_a_dead_node_are_read_through_and_never_filled_elsewhere(
    cluster: tuple[Engine, list[Any]],
) -> None:
    engine, nodes = cluster
    dead = nodes[0]
    dead.kill()
    for i in range(ROWS):
        assert once(engine, get_user, i).name == f"u{i}"
    others = [Client(("127.0.0.1", n.port)) for n in nodes[1:]]
    for i in range(ROWS):
        key = get_user.cache_key(i)
        on_others = [c.get(key) for c in others]
        if node_of(key) == dead.url:
            assert on_others == [None, None]
        else:
            assert any(v is not None for v in on_others)


def test_load_survives_kill_pause_and_restart_without_stale_entries(
    cluster: tuple[Engine, list[Any]],
) -> None:
    engine, nodes = cluster
    stop = threading.Event()
    errors: list[BaseException] = []
    latencies: list[float] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            row_id = rng.randrange(ROWS)
            start = time.perf_counter()
            try:
                user = once(engine, get_user, row_id)
                assert user is not None and user.id == row_id
            except BaseException as exc:
                errors.append(exc)
            latencies.append(time.perf_counter() - start)

    def writer() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            try:
                once(engine, bump, rng.randrange(ROWS))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    try:
        wait_until(lambda: cachedecor.stats("default")["default"]["hits"] > 50)
        nodes[0].kill()
        wait_until(lambda: cachedecor.stats("default")["default"]["errors"] > 5)
        nodes[1].pause()
        errors_before = cachedecor.stats("default")["default"]["errors"]
        wait_until(lambda: cachedecor.stats("default")["default"]["errors"] > errors_before + 5)
        nodes[1].resume()
        nodes[0].start()  # restarted on the same port, empty
        hits = cachedecor.stats("default")["default"]["hits"]
        wait_until(lambda: cachedecor.stats("default")["default"]["hits"] > hits + 100)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    health = region_settings("default").store.backend.health  # type: ignore[attr-defined]
    wait_until(lambda: health.pending_count() == 0)
    assert stale_entries(engine, nodes) == []
    assert cachedecor.stats("default")["default"]["invalidations_lost"] == 0
    # each read is bounded by the timeout plus database time; reported, not asserted
    print(f"\nreads: {len(latencies)}, slowest {max(latencies) * 1000:.0f} ms")


@pytest.mark.parametrize("meta", [True, False], ids=["meta", "classic"])
def test_many_with_one_node_down_serves_the_others_and_reads_the_rest_through(
    pg_engine: Engine, memcached_factory: Any, meta: bool
) -> None:
    nodes = [memcached_factory() for _ in range(3)]
    cachedecor.configure_regions(
        memcached_config(*(n.url for n in nodes), arguments={"timeout": 0.2, "meta_protocol": meta})
    )

    @cachedecor.cached_by_pk(User, many=True)
    def get_users(session: Session, ids: list[int]) -> list[User]:
        return [u for u in (session.get(User, i) for i in ids) if u is not None]

    with Session(pg_engine) as s:
        s.add_all([User(id=i, name=f"u{i}", version=0) for i in range(ROWS)])
        s.commit()
    ids = list(range(ROWS))
    assert [u.id for u in once(pg_engine, get_users, ids)] == ids
    nodes[0].kill()
    assert [u.id for u in once(pg_engine, get_users, ids)] == ids
    on_live_nodes = sum(node_of(get_users.cache_key(i)) != nodes[0].url for i in ids)
    assert cachedecor.stats("default")["default"]["hits"] == on_live_nodes


def test_no_thread_reads_a_node_while_its_owed_deletes_are_on_their_way(memcached_factory: Any) -> None:
    """The deletes leave the queue when one thread starts delivering them: the other
    threads must wait for them to land, not read the node beside them."""
    from tests.servers import Memcached

    node: Memcached = memcached_factory(threads=4)
    cachedecor.configure_regions(memcached_config(node.url, arguments=dict(invalidation_retry_interval=60)))
    store = region_settings("default").store
    health = store.backend.health  # type: ignore[attr-defined]
    raw = Client(("127.0.0.1", node.port), no_delay=True)
    stale = 0
    for _ in range(150):
        raw.set("owed", b"stale", noreply=False)  # stored before the readers start
        health.queue(node.url, ["owed"])
        barrier = threading.Barrier(6)
        seen: list[Any] = []

        def read(barrier: threading.Barrier = barrier, seen: list[Any] = seen) -> None:
            barrier.wait()
            seen.append(store.client.get("owed"))  # type: ignore[attr-defined]

        threads = [threading.Thread(target=read) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        stale += sum(1 for value in seen if value is not None)
    raw.close()
    assert stale == 0

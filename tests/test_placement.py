"""Where keys live on a memcached pool: the placements, and changing the pool without stale reads."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from click.testing import CliRunner
from pymemcache.client.base import Client
from pymemcache.client.rendezvous import RendezvousHash

import cachedecor
from cachedecor.backends import AsyncMemcachedStore, MemcachedStore, PyMemcacheBackend
from cachedecor.backends.memcached.cluster import RendezvousPlacement, SlotPlacement, placement
from cachedecor.cli import main
from tests.conftest import memcached_config

KEYS = [f"cachedecor:v1:User:{i}" for i in range(100_000)]


def servers(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:11211" for i in range(n)]


def owners(kind: type, nodes: list[str], keys: list[str] = KEYS) -> list[str]:
    place = kind(nodes)
    return [place.node_for(k) for k in keys]


# -- the placements ----------------------------------------------------------------------


def test_rendezvous_places_keys_as_pymemcache_does() -> None:
    nodes = servers(5)
    reference = RendezvousHash(list(nodes))
    assert owners(RendezvousPlacement, nodes, KEYS[:2000]) == [reference.get_node(k) for k in KEYS[:2000]]


@pytest.mark.parametrize("n", [3, 9, 20, 100])
def test_slots_spread_keys_evenly(n: int) -> None:
    counts: dict[str, int] = {}
    for node in owners(SlotPlacement, servers(n)):
        counts[node] = counts.get(node, 0) + 1
    mean = len(KEYS) / n
    assert len(counts) == n
    # rendezvous over the same keys: 0.99-1.01 at 3 nodes, 0.97-1.03 at 20
    assert 0.85 * mean <= min(counts.values()) and max(counts.values()) <= 1.15 * mean


@pytest.mark.parametrize("n", [3, 9, 20])
def test_slots_adding_a_node_moves_only_its_share_to_it(n: int) -> None:
    before = owners(SlotPlacement, servers(n))
    after = owners(SlotPlacement, servers(n + 1))
    new = servers(n + 1)[-1]
    moved = [b for a, b in zip(before, after, strict=True) if a != b]
    assert set(moved) == {new}
    assert len(moved) / len(KEYS) == pytest.approx(1 / (n + 1), rel=0.1)


@pytest.mark.parametrize("n", [3, 9, 20])
def test_slots_removing_a_node_moves_only_its_keys(n: int) -> None:
    nodes = servers(n)
    before = owners(SlotPlacement, nodes)
    after = owners(SlotPlacement, nodes[:1] + nodes[2:])
    assert {a for a, b in zip(before, after, strict=True) if a != b} == {nodes[1]}


def test_slots_place_alike_whatever_the_order_of_the_servers() -> None:
    nodes = servers(7)
    assert owners(SlotPlacement, nodes, KEYS[:5000]) == owners(SlotPlacement, nodes[::-1], KEYS[:5000])


def test_an_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="'ring' is not one of rendezvous, slots"):
        placement("ring", servers(2))


# -- the options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"placement": "ring"}, r"arguments\.placement: 'ring' is not a placement; one of rendezvous, slots"),
        (
            {"also_invalidate_placement": "consistent"},
            r"arguments\.also_invalidate_placement: 'consistent' is not a placement",
        ),
        (
            {"also_invalidate_url": ["memcache://10.0.0.9:11211"]},
            r"arguments\.also_invalidate_url: .* is a URL",
        ),
        ({"also_invalidate_url": ["10.0.0.9"]}, r"arguments\.also_invalidate_url: '10\.0\.0\.9' has no port"),
    ],
)
def test_placement_options_are_checked(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(cachedecor.ConfigError, match=message):
        cachedecor.configure_regions(memcached_config("127.0.0.1:1", arguments=arguments))


def test_the_default_placement_is_rendezvous() -> None:
    cachedecor.configure_regions(memcached_config("127.0.0.1:1", "127.0.0.1:2"))
    store = cachedecor.config.region_settings("default").store
    assert isinstance(store, MemcachedStore)
    assert store.backend.routing.current.name == "rendezvous"
    assert store.backend.routing.also is None


# -- deletes reach the owners under both configurations ------------------------------------


class Process:
    """One application process: its own configuration, its own connections."""

    def __init__(self, url: list[str], **arguments: Any) -> None:
        backend = PyMemcacheBackend({"url": url, "timeout": 0.5, "connect_timeout": 0.5, **arguments})
        self.store = MemcachedStore(backend)

    def read(self, key: str, database: dict[str, int]) -> bytes:
        """A lease-protected cache-aside read of ``key``."""
        value, token = self.store.lookup(key, 60)
        if value is not None:
            return value
        value = b"%d" % database[key]
        if token is not None:
            self.store.fill(key, value, token, 60)
        return value

    def write(self, key: str, database: dict[str, int]) -> None:
        database[key] += 1
        self.store.delete_many([key])


def test_a_delete_reaches_the_owner_under_also_invalidate_url(memcached_factory: Any) -> None:
    nodes = [memcached_factory().url for _ in range(4)]
    process = Process(nodes[:3], also_invalidate_url=nodes, also_invalidate_placement="slots")
    current, also = process.store.backend.routing.current, process.store.backend.routing.also
    key = next(k for k in KEYS if current.node_for(k) != also.node_for(k))
    raw = {n: Client(n) for n in nodes}
    raw[current.node_for(key)].set(key, b"1")
    raw[also.node_for(key)].set(key, b"1")
    process.store.delete_many([key])
    assert [n for n in nodes if raw[n].get(key) is not None] == []


def test_an_async_delete_reaches_the_owner_under_also_invalidate_url(memcached_factory: Any) -> None:
    nodes = [memcached_factory().url for _ in range(4)]
    process = Process(nodes[:3], also_invalidate_url=nodes, also_invalidate_placement="slots")
    astore = AsyncMemcachedStore(process.store)
    current, also = process.store.backend.routing.current, process.store.backend.routing.also
    key = next(k for k in KEYS if current.node_for(k) != also.node_for(k))
    raw = {n: Client(n) for n in nodes}
    raw[current.node_for(key)].set(key, b"1")
    raw[also.node_for(key)].set(key, b"1")

    async def delete() -> None:
        await astore.delete_many([key])
        await astore.aclose()

    asyncio.run(delete())
    assert [n for n in nodes if raw[n].get(key) is not None] == []


def test_reads_and_fills_use_url_only(memcached_factory: Any) -> None:
    nodes = [memcached_factory().url for _ in range(4)]
    process = Process(nodes[:3], also_invalidate_url=nodes[3:])
    database = {k: 0 for k in KEYS[:200]}
    for key in database:
        process.read(key, database)
    assert Client(nodes[3]).stats()[b"curr_items"] == 0


# -- a rolling change of the pool ----------------------------------------------------------

ROWS = [f"cachedecor:v1:User:{i}" for i in range(300)]


class Fleet:
    """Processes reconfigured one at a time, with reads and writes after each step."""

    def __init__(self, url: list[str], processes: int = 3, seed: int = 7, **arguments: Any) -> None:
        self.database = dict.fromkeys(ROWS, 0)
        self.processes = [Process(url, **arguments) for _ in range(processes)]
        self.random = random.Random(seed)
        self.stale_reads = 0
        self.traffic()

    def traffic(self) -> None:
        """Every process reads every row; one of them writes 30 rows; all read again."""
        for process in self.processes:
            for key in ROWS:
                process.read(key, self.database)
        writer = self.random.choice(self.processes)
        for key in self.random.sample(ROWS, 30):
            writer.write(key, self.database)
        for process in self.processes:
            for key in ROWS:
                self.stale_reads += process.read(key, self.database) != b"%d" % self.database[key]

    def roll(self, url: list[str], **arguments: Any) -> None:
        """Restart each process on the new configuration, one at a time, with traffic between."""
        for i in range(len(self.processes)):
            self.processes[i] = Process(url, **arguments)
            self.traffic()

    def stale_at_rest(self) -> int:
        """Entries the processes would serve (on their key's owner) that differ from the database."""
        store = self.processes[0].store
        client = store.client
        stale = 0
        for key in ROWS:
            value = client.clients[client.node_for(key)].get(key)
            stale += value is not None and value != b"%d" % self.database[key]
        return stale

    def change(self, old: list[str], new: list[str], *, place: str = "rendezvous") -> None:
        """The procedure of docs/scaling.rst, from ``old`` to ``new``."""
        self.roll(old, placement=place, also_invalidate_url=new)  # step 1: deletes reach both
        self.processes[0].store.purge_misplaced()  # step 2: leftovers on the new owners
        self.traffic()
        self.roll(new, placement=place, also_invalidate_url=old)  # step 3: reads move
        self.roll(new, placement=place)  # step 4: the old list is dropped


@pytest.mark.parametrize("place", ["rendezvous", "slots"])
def test_growing_and_shrinking_the_pool_by_the_procedure_serves_nothing_stale(
    memcached_factory: Any, place: str
) -> None:
    nodes = [memcached_factory().url for _ in range(5)]
    fleet = Fleet(nodes[:4], placement=place)
    fleet.change(nodes[:4], nodes, place=place)
    assert (fleet.stale_reads, fleet.stale_at_rest()) == (0, 0)
    fleet.change(nodes, nodes[:4], place=place)
    assert (fleet.stale_reads, fleet.stale_at_rest()) == (0, 0)


def test_switching_the_placement_by_the_procedure_serves_nothing_stale(memcached_factory: Any) -> None:
    nodes = [memcached_factory().url for _ in range(4)]
    fleet = Fleet(nodes)
    fleet.roll(nodes, also_invalidate_placement="slots")
    fleet.processes[0].store.purge_misplaced()
    fleet.roll(nodes, placement="slots", also_invalidate_placement="rendezvous")
    fleet.roll(nodes, placement="slots")
    assert (fleet.stale_reads, fleet.stale_at_rest()) == (0, 0)


def test_changing_the_pool_without_the_procedure_serves_stale_rows(memcached_factory: Any) -> None:
    nodes = [memcached_factory().url for _ in range(5)]
    fleet = Fleet(nodes[:4])
    fleet.roll(nodes)
    grown = fleet.stale_reads
    fleet.roll(nodes[:4])
    assert grown > 0
    assert fleet.stale_reads > grown
    assert fleet.stale_at_rest() > 0


def test_skipping_the_purge_serves_leftovers_of_an_earlier_list(memcached_factory: Any) -> None:
    nodes = [memcached_factory().url for _ in range(5)]
    fleet = Fleet(nodes[:4])
    fleet.change(nodes[:4], nodes)
    fleet.roll(nodes[:4], also_invalidate_url=nodes)  # 5 -> 4, step 2 (the purge) skipped
    fleet.roll(nodes[:4], also_invalidate_url=nodes)
    fleet.roll(nodes[:4])
    assert fleet.stale_reads > 0


# -- the CLI -------------------------------------------------------------------------------


def ini(tmp_path: Any, url: list[str], **arguments: str) -> str:
    lines = [
        "[cachedecor]",
        "regions = default",
        "default.backend = cachedecor.pymemcache",
        f"default.arguments.url = {', '.join(url)}",
        *(f"default.arguments.{k} = {v}" for k, v in arguments.items()),
    ]
    path = tmp_path / "cache.ini"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_servers_diff_shows_the_shares_before_and_after(tmp_path: Any) -> None:
    old, new = servers(4), servers(5)
    result = CliRunner().invoke(
        main, ["servers", "diff", "--config", ini(tmp_path, old, also_invalidate_url=", ".join(new))]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "region default: rendezvous over 4 node(s) -> rendezvous over 5 node(s)"
    row = next(line for line in lines if line.startswith(new[4])).split()
    assert row[1] == "-" and float(row[2].rstrip("%")) == pytest.approx(20, abs=2)
    assert "(the least any placement can move: 20.0%)" in lines[-1]
    assert float(lines[-1].split()[4].rstrip("%")) == pytest.approx(20, abs=2)


def test_servers_diff_of_a_placement_change(tmp_path: Any) -> None:
    result = CliRunner().invoke(
        main, ["servers", "diff", "--config", ini(tmp_path, servers(3)), "--to-placement", "slots"]
    )
    assert result.exit_code == 0, result.output
    assert (
        result.output.splitlines()[0] == "region default: rendezvous over 3 node(s) -> slots over 3 node(s)"
    )
    assert float(result.output.splitlines()[-1].split()[4].rstrip("%")) == pytest.approx(66.7, abs=3)


def test_servers_diff_without_a_change_says_so(tmp_path: Any) -> None:
    result = CliRunner().invoke(main, ["servers", "diff", "--config", ini(tmp_path, servers(3))])
    assert result.exit_code == 0, result.output
    assert "no change" in result.output


def test_servers_purge_deletes_only_misplaced_entries(tmp_path: Any, memcached_factory: Any) -> None:
    nodes = [memcached_factory().url for _ in range(3)]
    place = RendezvousPlacement(nodes[:2])
    raw = {n: Client(n) for n in nodes}
    for key in ROWS:
        for node in nodes:
            raw[node].set(key, b"x")
    config = ini(tmp_path, nodes[:2], also_invalidate_url=", ".join(nodes))
    result = CliRunner().invoke(main, ["servers", "purge", "--config", config])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"region default: deleted {len(ROWS) * 2} misplaced entries"
    assert [(k, n) for k in ROWS for n in nodes if raw[n].get(k) is not None] == [
        (k, place.node_for(k)) for k in ROWS
    ]

"""dogpile.cache's own API keeps working on regions that cachedecor configures."""

from __future__ import annotations

from typing import Any

import cachedecor
from tests.conftest import memcached_config


def test_get_or_create_with_a_distributed_lock_on_memcached(memcached: Any) -> None:
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


def test_values_dogpile_stores_round_trip_and_keys_with_spaces_are_mangled(memcached: Any) -> None:
    region = cachedecor.configure_regions(memcached_config(memcached.url))["default"]

    @region.cache_on_arguments()
    def add(a: int, b: str) -> tuple[int, str]:
        return a + 1, b.upper()

    assert add(1, "two words") == (2, "TWO WORDS")
    assert add(1, "two words") == (2, "TWO WORDS")
    region.set("plain key", [1, 2, 3])
    assert region.get("plain key") == [1, 2, 3]

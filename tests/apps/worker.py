"""A process that both reads and writes accounts, in batches: the reader's and the writer's functions.

Used where a test drives many reads and writes through several processes and counts
what each saw, one JSON line per batch rather than per row.
"""

from __future__ import annotations

from typing import Any

from tests.apps.reader import get_account, read
from tests.apps.serve import serve
from tests.apps.writer import write


def read_many(ids: list[int]) -> dict[str, Any]:
    """The owner each read returned, in the order of ``ids`` (``None`` for a missing row)."""
    rows = [read(id)["row"] for id in ids]
    return {"owners": [None if row is None else row["owner"] for row in rows]}


def write_many(owners: dict[str, str]) -> dict[str, Any]:
    """Each write is its own committed ``@invalidates`` transaction, in the given order."""
    for id, owner in owners.items():
        write(int(id), owner)
    return {}


def keys(ids: list[int]) -> dict[str, Any]:
    return {"keys": [get_account.cache_key(id) for id in ids]}


if __name__ == "__main__":
    serve({"read_many": read_many, "write_many": write_many, "keys": keys})

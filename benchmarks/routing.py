"""Routing cost per key: which memcached node owns a key, for each placement and pool size.

Run by ``make bench``. Prints microseconds per key (best of 5 rounds over 20,000
distinct keys; the ``slots`` figure is with the slot table warm, as in a running
process, and its first-use cost per slot is printed beside it).
"""

from __future__ import annotations

import argparse
import time

from cachedecor.backends.memcached.cluster import PLACEMENTS, SLOTS, SlotPlacement


def servers(n: int) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:11211" for i in range(n)]


def per_key(name: str, nodes: int, keys: list[str], rounds: int) -> float:
    placement = PLACEMENTS[name](servers(nodes))
    node_for = placement.node_for
    for key in keys:  # warm (the slot table fills on first use)
        node_for(key)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for key in keys:
            node_for(key)
        best = min(best, time.perf_counter() - start)
    return best / len(keys) * 1e6


def first_use(nodes: int) -> float:
    placement = SlotPlacement(servers(nodes))
    start = time.perf_counter()
    for slot in range(0, SLOTS, 64):
        placement.owner_of(slot)
    return (time.perf_counter() - start) / (SLOTS // 64) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer keys and rounds")
    args = parser.parse_args()
    keys = [f"cachedecor:v1:User:{i}" for i in range(2_000 if args.quick else 20_000)]
    rounds = 2 if args.quick else 5
    print("routing: us per key (which node owns a key)")
    print(f"{'nodes':>6} {'rendezvous':>11} {'slots':>8} {'slots, a slot on first use':>28}")
    for nodes in (3, 20, 100):
        print(
            f"{nodes:>6} {per_key('rendezvous', nodes, keys, rounds):>11.2f} "
            f"{per_key('slots', nodes, keys, rounds):>8.2f} {first_use(nodes):>28.1f}"
        )


if __name__ == "__main__":
    main()

"""A gevent process (everything patched, as gunicorn's gevent workers do) with a near
cache whose broadcast listener is a green thread.

Usage: ``python -m tests.apps.green_listener MEMCACHED_URL BROADCAST_URL CHANNEL``.
Prints one JSON line when its listener is connected, then reads lines from standard
input: ``tick SECONDS`` runs a 5 ms ticker for that long and reports the longest gap
between two ticks (the loop blocked meanwhile), with what the listener received.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402  (after patching, as gevent requires)
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

import cachedecor  # noqa: E402
from cachedecor import broadcast, near  # noqa: E402


def main() -> None:
    memcached_url, broadcast_url, channel = sys.argv[1:4]
    cachedecor.configure_regions(
        {
            "broadcast_url": broadcast_url,
            "broadcast_channel": channel,
            "regions": {
                "default": {
                    "backend": "cachedecor.pymemcache",
                    "arguments": {"url": memcached_url},
                    "local_entries": 10,
                }
            },
        }
    )
    sender = broadcast.current()
    assert sender is not None
    connected = sender.connected.wait(10)
    print(json.dumps({"connected": connected}), flush=True)
    for line in sys.stdin:
        command, seconds = line.split()
        assert command == "tick"
        longest = 0.0
        last = time.monotonic()
        until = last + float(seconds)
        while last < until:
            gevent.sleep(0.005)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now
        report = {
            "longest_gap": longest,
            "received": sender.received,
            "hearing": near.hearing(),
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()

"""Drivers: they carry out the requests of :mod:`cachedecor.readpath`'s generators.

:func:`drive` does it with blocking calls, for threads. An asyncio driver will do
the same with awaitable ones; the decisions stay in :mod:`cachedecor.readpath`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cachedecor.backends import Store
from cachedecor.readpath import (
    CALL,
    DELETE,
    FILL,
    FILL_MANY,
    LOOKUP,
    LOOKUP_MANY,
    PEEK,
    RELEASE,
    SLEEP,
    Steps,
)

__all__ = ["drive"]


def drive(steps: Steps, store: Store, call: Callable[..., Any]) -> Any:
    """Run ``steps`` to completion: each request on ``store`` (or ``call``), in this thread.

    An exception an operation raises is thrown into the generator at its ``yield``;
    what the generator raises (the wrapped function's own exception) propagates.
    """
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            return done.value
        error = None
        op = request[0]
        try:
            if op == LOOKUP:
                answer = store.lookup(request[1], request[2])
            elif op == CALL:
                answer = call(*request[1], **request[2])
            elif op == FILL:
                answer = store.fill(request[1], request[2], request[3], request[4])
            elif op == LOOKUP_MANY:
                answer = store.lookup_many(request[1], request[2])
            elif op == FILL_MANY:
                answer = store.fill_many(request[1], request[2])
            elif op == RELEASE:
                answer = None
                store.release(request[1], request[2])
            elif op == DELETE:
                answer = None
                store.delete_many(request[1])
            elif op == PEEK:
                answer = store.peek(request[1])
            elif op == SLEEP:
                answer = None
                time.sleep(request[1])
            else:  # pragma: no cover - a request no driver knows is a programming error
                raise AssertionError(f"unknown request {request!r}")
        except BaseException as exc:
            answer = None
            error = exc

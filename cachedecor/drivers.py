"""Drivers: they carry out the requests of :mod:`cachedecor.readpath`'s generators.

:func:`drive` does it with blocking calls, for threads; :func:`drive_async` with
coroutines, for asyncio. The decisions stay in :mod:`cachedecor.readpath`.

The async driver also wakes the readers of its event loop that wait for a fill
(a lease held by another coroutine of the same loop) as soon as that fill or its
release is done, instead of at their next poll: concurrent coroutines that miss
the same key make one database call and get the row as soon as it is stored.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from cachedecor.backends import AsyncStore, Store
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

__all__ = ["drive", "drive_async"]


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


#: per event loop: key -> the event set when this loop's fill (or release) of it is done
_fills: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Event]] = (
    weakref.WeakKeyDictionary()
)


def _waiting(loop: asyncio.AbstractEventLoop) -> dict[str, asyncio.Event]:
    waiting = _fills.get(loop)
    if waiting is None:
        waiting = _fills[loop] = {}
    return waiting


def _done(loop: asyncio.AbstractEventLoop, keys: Any) -> None:
    """Wake the coroutines of ``loop`` waiting for a fill of ``keys``."""
    waiting = _fills.get(loop)
    if waiting:
        for key in keys:
            event = waiting.pop(key, None)
            if event is not None:
                event.set()


async def _wait(loop: asyncio.AbstractEventLoop, seconds: float, key: str) -> None:
    event = _waiting(loop).get(key)
    if event is None:
        event = _waiting(loop)[key] = asyncio.Event()
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def drive_async(steps: Steps, store: AsyncStore, call: Callable[..., Awaitable[Any]]) -> Any:
    """Run ``steps`` to completion on the running event loop: each request awaited on
    ``store`` (or ``call``, the wrapped coroutine function). Same contract as :func:`drive`."""
    answer: Any = None
    error: BaseException | None = None
    loop = asyncio.get_running_loop()
    while True:
        try:
            request = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            return done.value
        error = None
        op = request[0]
        try:
            if op == LOOKUP:
                answer = await store.lookup(request[1], request[2])
            elif op == CALL:
                answer = await call(*request[1], **request[2])
            elif op == FILL:
                try:
                    answer = await store.fill(request[1], request[2], request[3], request[4])
                finally:
                    _done(loop, (request[1],))
            elif op == LOOKUP_MANY:
                answer = await store.lookup_many(request[1], request[2])
            elif op == FILL_MANY:
                try:
                    answer = await store.fill_many(request[1], request[2])
                finally:
                    _done(loop, [item[0] for item in request[1]])
            elif op == RELEASE:
                answer = None
                try:
                    await store.release(request[1], request[2])
                finally:
                    _done(loop, (request[1],))
            elif op == DELETE:
                answer = None
                await store.delete_many(request[1])
            elif op == PEEK:
                answer = await store.peek(request[1])
            elif op == SLEEP:
                answer = None
                await _wait(loop, request[1], request[2])
            else:  # pragma: no cover - a request no driver knows is a programming error
                raise AssertionError(f"unknown request {request!r}")
        except BaseException as exc:
            answer = None
            error = exc

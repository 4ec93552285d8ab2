"""Sync and async callers behind one interface, so that one behaviour suite runs for both.

A :class:`Kind` is given a sync engine (the ``engine`` fixture: SQLite or
PostgreSQL) and makes the sessions a test uses: plain :class:`Session` objects for
``sync``, :class:`AsyncSession` objects on the same database for ``async``
(aiosqlite on SQLite; asyncpg or psycopg on PostgreSQL). Each decorated function a
test calls exists twice, once ``def`` and once ``async def`` with the same body;
:meth:`Kind.fn` picks one and :meth:`Kind.call` runs it to completion, on this
kind's event loop for ``async``. Everything else a test does (assertions, counting
statements, reading the cache) is written once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from tests.conftest import SQLCounter

KINDS = ["sync", "async"]


class Flag:
    """A one-shot event a decorated function's body waits on and a test sets (or the reverse).

    ``sync`` bodies call :meth:`wait`, ``async`` bodies ``await`` :meth:`await_`.
    """

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self._thread = threading.Event()
        self._loop_event: asyncio.Event | None = None

    def set(self) -> None:
        self._thread.set()
        if self.kind.loop is not None:
            loop = self.kind.loop

            def set_in_loop() -> None:
                self._event().set()

            if _running_loop() is loop:
                set_in_loop()
            else:
                loop.call_soon_threadsafe(set_in_loop)

    def _event(self) -> asyncio.Event:
        if self._loop_event is None:
            self._loop_event = asyncio.Event()
            if self._thread.is_set():
                self._loop_event.set()
        return self._loop_event

    def wait(self, timeout: float = 10.0) -> None:
        if not self._thread.wait(timeout):
            raise AssertionError(f"flag not set within {timeout}s")

    async def await_(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._event().wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"flag not set within {timeout}s") from None

    def is_set(self) -> bool:
        return self._thread.is_set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Handle:
    """A session of either kind, driven synchronously by the test.

    ``arg`` is what the decorated functions receive (a ``Session`` or an
    ``AsyncSession``); ``sync`` is the ``Session`` that holds the identity map either
    way. The other methods do what their ``Session`` namesakes do, awaited for async.
    """

    def __init__(self, kind: Kind, session: Session | AsyncSession) -> None:
        self.kind = kind
        self.arg = session
        self.sync: Session = session.sync_session if isinstance(session, AsyncSession) else session

    def _do(self, result: Any) -> Any:
        return self.kind.run(result)

    def get(self, model: Any, pk: Any) -> Any:
        return self._do(self.arg.get(model, pk))

    def add(self, obj: Any) -> None:
        self.arg.add(obj)

    def delete(self, obj: Any) -> None:
        self._do(self.arg.delete(obj))

    def execute(self, statement: Any) -> Any:
        return self._do(self.arg.execute(statement))

    def flush(self) -> None:
        self._do(self.arg.flush())

    def commit(self) -> None:
        self._do(self.arg.commit())

    def rollback(self) -> None:
        self._do(self.arg.rollback())

    def close(self) -> None:
        self._do(self.arg.close())


class Kind:
    """One kind of caller (``sync`` or ``async``) on one database."""

    def __init__(self, name: str, engine: Engine, driver: str | None = None) -> None:
        self.name = name
        self.is_async = name != "sync"
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None
        self.async_engine: Any = None
        if self.is_async:
            self.loop = asyncio.new_event_loop()
            self.async_engine = create_async_engine(
                _async_url(engine, driver), **_async_options(engine, driver)
            )
        self.sql = SQLCounter(self.async_engine.sync_engine if self.is_async else engine)

    # -- running things ------------------------------------------------------------------

    def run(self, result: Any) -> Any:
        """``result`` itself for sync callers; the awaited coroutine for async ones."""
        if self.is_async and asyncio.iscoroutine(result):
            assert self.loop is not None
            return self.loop.run_until_complete(result)
        return result

    def fn(self, sync_fn: Any, async_fn: Any) -> Any:
        """The decorated function of this kind."""
        return async_fn if self.is_async else sync_fn

    def call(self, pair: tuple[Any, Any], *args: Any, **kwargs: Any) -> Any:
        """Call the ``(sync, async)`` pair's function of this kind to completion.

        :class:`Handle` arguments are passed as the session they hold.
        """
        fn = self.fn(*pair)
        args = tuple(a.arg if isinstance(a, Handle) else a for a in args)
        kwargs = {k: v.arg if isinstance(v, Handle) else v for k, v in kwargs.items()}
        return self.run(fn(*args, **kwargs))

    def flag(self) -> Flag:
        return Flag(self)

    def concurrently(self, *calls: Callable[[], Any]) -> list[Any]:
        """Run ``calls`` (each returning a coroutine for async) at the same time; their results.

        Threads for sync callers, tasks on one event loop for async ones. An exception
        of any call is raised.
        """
        if self.is_async:

            async def gather() -> list[Any]:
                return list(await asyncio.gather(*(c() for c in calls)))

            return self.run(gather())  # type: ignore[no-any-return]
        results: list[Any] = [None] * len(calls)
        errors: list[BaseException] = []

        def run(i: int, call: Callable[[], Any]) -> None:
            try:
                results[i] = call()
            except BaseException as exc:  # reported to the test below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if errors:
            raise errors[0]
        return results

    def start(self, call: Callable[[], Any]) -> Callable[[], Any]:
        """Start ``call`` in the background; returns a function that waits for its result.

        For async callers the task runs whenever the test drives the loop (any
        :meth:`run`, :meth:`until`); the returned function drives it to completion.
        """
        if self.is_async:
            assert self.loop is not None
            task = self.loop.create_task(call())
            return lambda: self.run(_finish(task))
        box: list[Any] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                box.append(call())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()

        def result() -> Any:
            thread.join(30)
            if errors:
                raise errors[0]
            return box[0]

        return result

    def until(self, flag: Flag, timeout: float = 10.0) -> None:
        """Wait (driving the event loop for async callers) until ``flag`` is set."""
        if self.is_async:
            self.run(flag.await_(timeout))
        else:
            flag.wait(timeout)

    # -- sessions ------------------------------------------------------------------------

    def new(self, **options: Any) -> Handle:
        if self.is_async:
            return Handle(self, AsyncSession(self.async_engine, **options))
        return Handle(self, Session(self.engine, **options))

    @contextmanager
    def session(self, **options: Any) -> Iterator[Handle]:
        handle = self.new(**options)
        try:
            yield handle
        finally:
            handle.close()

    def once(self, pair: tuple[Any, Any], *args: Any) -> Any:
        """Call the pair's function with a session of its own, closed afterwards."""
        with self.session() as s:
            return self.call(pair, s, *args)

    def close(self) -> None:
        self.sql.close()
        if self.is_async:
            assert self.loop is not None
            from cachedecor.config import configured_regions

            async def shutdown() -> None:
                for settings in configured_regions().values():
                    await settings.astore.aclose()
                await self.async_engine.dispose()

            try:
                self.loop.run_until_complete(shutdown())
            finally:
                self.loop.close()


async def _finish(task: asyncio.Task[Any]) -> Any:
    return await task


def _async_url(engine: Engine, driver: str | None) -> sqlalchemy.URL:
    if engine.url.get_backend_name() == "sqlite":
        return engine.url.set(drivername="sqlite+aiosqlite")
    return engine.url.set(drivername=f"postgresql+{driver or 'asyncpg'}")


def _async_options(engine: Engine, driver: str | None) -> dict[str, Any]:
    """The test schema of a PostgreSQL engine (see ``_pg_engine``), for the async driver."""
    if engine.url.get_backend_name() == "sqlite":
        return {}
    schema = engine.info["schema"]  # type: ignore[attr-defined]
    if (driver or "asyncpg") == "asyncpg":
        return {"connect_args": {"server_settings": {"search_path": schema}}}
    return {"connect_args": {"options": f"-csearch_path={schema}"}}

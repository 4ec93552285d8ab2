"""``cachedecor demo``: labels that say what happened, and a database left as it was found."""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from click.testing import CliRunner

import cachedecor.demo
from cachedecor.cli import main
from cachedecor.demo import DemoError, run_demo
from tests.servers import PG_URL, Memcached, free_port, unavailable

ROWS, REPEAT = 12, 5


def demo(**kwargs: Any) -> tuple[dict[str, Any], str]:
    out = io.StringIO()
    result = run_demo(rows=ROWS, repeat=REPEAT, out=out, **kwargs)
    return result, out.getvalue()


def labels(text: str) -> list[tuple[str, str]]:
    """(step title, label) of every step the demo printed."""
    return re.findall(r"^ +(\S.*?)\s+-> .*?\[(.*?)\]", text, re.M)


# --------------------------------------------------------------------------------------
# labels come from the counters


def test_on_the_memory_backend_a_first_read_misses_and_the_second_hits() -> None:
    result, text = demo()

    assert labels(text)[:5] == [
        ("read person 1", "miss, filled"),
        ("read person 1 again", "hit"),
        ("rename person 1 and commit", "1 key invalidated"),
        ("read person 1", "miss, filled"),
        ("read person 1 again", "hit"),
    ]
    assert labels(text)[5:9] == [
        ("rename person 1, flush, no commit", "cache not used"),
        ("same session reads its own write", "bypassed: own uncommitted write"),
        ("another session reads the committed row", "hit"),
        ("read person 1", "hit"),
    ]
    assert "invalidations before/after the rollback: 1/1" in text
    assert ("get_people([1..10])", "1 hit, 9 misses, 9 filled") in labels(text)
    assert ("get_people([1..10]) again", "10 hits") in labels(text)
    assert result["stats"]["invalidations"] == 1
    assert result["stats"]["bypasses"] == 1
    assert result["hits_timed"] == REPEAT
    assert "a hit takes" in text


def test_with_memcached_unreachable_no_read_is_labelled_a_hit() -> None:
    result, text = demo(memcached=f"127.0.0.1:{free_port()}")

    assert result["stats"]["hits"] == 0
    assert not [label for _, label in labels(text) if "hit" in label]
    assert ("read person 1 again", "cache error") in labels(text)
    assert f"(0 of {REPEAT} hits)" in text
    assert "not every read was a hit, so this is not the cost of a hit" in text
    assert "a hit takes" not in text
    assert re.search(r"the cache failed \d+ time\(s\)", text)


def test_on_memcached_the_second_read_hits(memcached: Memcached) -> None:
    result, text = demo(memcached=memcached.url)

    assert "cachedecor.pymemcache" in text
    assert labels(text)[:2] == [("read person 1", "miss, filled"), ("read person 1 again", "hit")]
    assert result["stats"]["errors"] == 0
    assert result["hits_timed"] == REPEAT


# --------------------------------------------------------------------------------------
# the database: a table of its own, dropped at the end, nothing else touched


def tables(engine: sqlalchemy.engine.Engine) -> dict[str, list[Any]]:
    """Every table of the engine's (default) schema with its rows."""
    metadata = sqlalchemy.MetaData()
    metadata.reflect(engine)
    with engine.connect() as conn:
        return {
            t.name: [tuple(r) for r in conn.execute(sqlalchemy.select(t))] for t in metadata.sorted_tables
        }


def user_tables(engine: sqlalchemy.engine.Engine) -> None:
    """The application's tables, one of them with the name older demos used."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE cachedecor_demo_people (id INTEGER PRIMARY KEY, name VARCHAR(20))")
        conn.exec_driver_sql("INSERT INTO cachedecor_demo_people VALUES (1, 'kept')")
        conn.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO users VALUES (7)")


EXPECTED = {"cachedecor_demo_people": [(1, "kept")], "users": [(7,)]}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = sqlalchemy.create_engine(url)
    user_tables(engine)
    engine.dispose()
    yield url


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """A URL whose connections use a fresh schema (search_path) holding the user's tables."""
    schema = f"cd_demo_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sqlalchemy.exc.OperationalError as exc:
        admin.dispose()
        unavailable(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
    url = sqlalchemy.engine.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    engine = sqlalchemy.create_engine(url)
    user_tables(engine)
    engine.dispose()
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")  # type: ignore[no-any-return]


def test_the_demo_uses_a_table_of_its_own_and_drops_it(database: str) -> None:
    result, text = demo(database=database)

    table = result["table"]
    assert re.fullmatch(r"cachedecor_demo_[0-9a-f]{8}", table)
    assert f"table {table}, created for this run and dropped at the end; no other table is touched" in text
    assert text.rstrip().endswith(f"dropped table {table}")
    engine = sqlalchemy.create_engine(database)
    assert tables(engine) == EXPECTED
    engine.dispose()


def test_the_demos_table_is_dropped_when_the_run_fails(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any) -> float:
        raise KeyboardInterrupt

    monkeypatch.setattr(cachedecor.demo, "_median_us", interrupted)

    with pytest.raises(KeyboardInterrupt):
        demo(database=database)

    engine = sqlalchemy.create_engine(database)
    assert tables(engine) == EXPECTED
    engine.dispose()


def test_the_default_database_is_a_temporary_file_removed_at_the_end() -> None:
    _, text = demo()

    found = re.search(r"^database: sqlite:///(\S+)$", text, re.M)
    assert found is not None
    assert not Path(found.group(1)).parent.exists()


# --------------------------------------------------------------------------------------
# the command


def test_the_demo_command_runs() -> None:
    result = CliRunner().invoke(main, ["demo", "--rows", str(ROWS), "--repeat", "3"])

    assert result.exit_code == 0, result.output
    assert "region counters" in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(
            ["--memcached", "memcache://127.0.0.1:11211"], "is a URL; write host:port", id="memcached-url"
        ),
        pytest.param(
            ["--database", f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"],
            "cannot create the demo's table",
            id="unreachable-database",
        ),
        pytest.param(["--database", "nosuchdialect://x"], "--database", id="unknown-dialect"),
    ],
)
def test_the_demo_command_reports_what_it_cannot_use_on_one_line(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(main, ["demo", "--rows", str(ROWS), "--repeat", "3", *args])

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.output


def test_run_demo_refuses_too_few_rows() -> None:
    with pytest.raises(DemoError, match="at least 11 rows"):
        run_demo(rows=3, repeat=1, out=io.StringIO())

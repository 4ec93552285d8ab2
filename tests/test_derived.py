"""Column properties that are not table columns are never cached.

``Team.member_count`` counts related ``Member`` rows and ``Team.shout`` is an
expression: an entry holds neither, and a hit loads them (current) on first access.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import cached_by_pk, invalidates
from cachedecor.config import region_settings
from cachedecor.rows import model_plan
from tests.conftest import SQLCounter, once
from tests.models import Member, Team
from tests.servers import Memcached


@cached_by_pk(Team)
def get_team(session: Session, team_id: int) -> Team | None:
    return session.get(Team, team_id)


@cached_by_pk(Team, many=True)
def get_teams(session: Session, team_ids: list[int]) -> list[Team]:
    return [t for t in (session.get(Team, i) for i in team_ids) if t is not None]


@invalidates(Member)
def add_member(session: Session, member_id: int, team_id: int) -> None:
    session.add(Member(id=member_id, team_id=team_id))
    session.commit()


@pytest.fixture
def team(engine: Engine, cache: Memcached) -> Engine:
    """Team 1, "red", with 19 members, cached."""
    with Session(engine) as s:
        s.add(Team(id=1, name="red"))
        s.add_all([Member(id=i, team_id=1) for i in range(1, 20)])
        s.commit()
    assert once(engine, get_team, 1).member_count == 19  # type: ignore[union-attr]
    cachedecor.reset_stats()
    return engine


@pytest.fixture
def sql(team: Engine) -> Iterator[SQLCounter]:
    counter = SQLCounter(team)
    yield counter
    counter.close()


def hits() -> int:
    return cachedecor.stats("default")["default"]["hits"]


class TestEntries:
    def test_the_entry_holds_only_table_columns(self, team: Engine) -> None:
        key = get_team.cache_key(1)
        settings = region_settings("default")
        _, _, _, values = settings.codec.decode(key, settings.store.get(key))
        assert model_plan(Team).by_class[Team].keys == ("id", "name")
        assert values == [1, "red"]


class TestHits:
    def test_a_hit_leaves_derived_columns_unloaded(self, team: Engine, sql: SQLCounter) -> None:
        with Session(team) as s:
            hit = get_team(s, 1)
            assert hits() == 1 and sql.count == 0
            loaded = sqlalchemy.inspect(hit).dict
            assert "member_count" not in loaded and "shout" not in loaded

    def test_a_hit_shows_the_current_member_count_after_a_member_is_added(self, team: Engine) -> None:
        once(team, add_member, 20, 1)
        with Session(team) as s:
            hit = get_team(s, 1)
            assert hits() == 1
            assert hit.member_count == 20  # type: ignore[union-attr]

    def test_a_many_hit_shows_the_current_member_count(self, team: Engine) -> None:
        once(team, add_member, 20, 1)
        with Session(team) as s:
            (hit,) = get_teams(s, [1])
            assert hits() == 1
            assert hit.member_count == 20  # type: ignore[attr-defined]

    def test_shout_loads_on_first_access(self, team: Engine, sql: SQLCounter) -> None:
        with Session(team) as s:
            hit = get_team(s, 1)
            assert sql.count == 0
            assert hit.shout == "red!"  # type: ignore[union-attr]
            assert sql.selects() == 1

    def test_shout_is_computed_by_the_database_not_taken_from_the_entry(self, team: Engine) -> None:
        with Session(team) as s:  # a write that invalidates nothing: the entry keeps "red"
            s.execute(update(Team).where(Team.id == 1).values(name="blue"))
            s.commit()
        with Session(team) as s:
            hit = get_team(s, 1)
            assert hits() == 1
            assert hit.name == "red"  # type: ignore[union-attr]
            assert hit.shout == "blue!"  # type: ignore[union-attr]

    def test_derived_columns_load_together_in_one_select(self, team: Engine, sql: SQLCounter) -> None:
        with Session(team) as s:
            hit = get_team(s, 1)
            assert (hit.member_count, hit.shout) == (19, "red!")  # type: ignore[union-attr]
            assert sql.selects() == 1

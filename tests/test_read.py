"""@cached_by_pk: hits, misses and what a hit returns, on every supported backend.

Hits and misses are proven by counting the SQL statements the engine executes.
"""

from __future__ import annotations

import datetime
import decimal
import inspect
import uuid
import zoneinfo
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import cachedecor
from cachedecor import UsageError, cached_by_pk
from tests.conftest import SQLCounter, once
from tests.models import (
    Color,
    Employee,
    Engineer,
    Everything,
    Manager,
    Membership,
    Post,
    Truck,
    User,
    Vehicle,
)


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    """Load one user."""
    return session.get(User, user_id)


@cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    return list(session.scalars(select(User).where(User.id.in_(user_ids))))


@cached_by_pk(User, cache_none=True)
def get_user_or_none(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(User, pk="user_id")
def load_user(*, session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(Membership, pk=("tenant", "member_id"))
def get_membership(session: Session, tenant: str, member_id: int) -> Membership | None:
    return session.get(Membership, (tenant, member_id))


@cached_by_pk(Membership)
def get_membership_by_tuple(session: Session, key: tuple[str, int]) -> Membership | None:
    return session.get(Membership, key)


@cached_by_pk(Employee)
def get_employee(session: Session, employee_id: int) -> Employee | None:
    return session.get(Employee, employee_id)


@cached_by_pk(Vehicle)
def get_vehicle(session: Session, vehicle_id: int) -> Vehicle | None:
    return session.get(Vehicle, vehicle_id)


@cached_by_pk(Everything)
def get_everything(session: Session, key: uuid.UUID) -> Everything | None:
    return session.get(Everything, key)


def add_users(engine: Engine, n: int = 3) -> None:
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}", bio=f"bio of {i}") for i in range(1, n + 1)])
        s.add_all([Post(id=10 * i, user_id=i, title=f"post of {i}") for i in range(1, n + 1)])
        s.commit()


@pytest.fixture
def users(engine: Engine, backend: str) -> Engine:
    add_users(engine)
    return engine


class TestHitsAndMisses:
    def test_first_read_queries_the_database_and_second_does_not(
        self, users: Engine, sql: SQLCounter
    ) -> None:
        with Session(users) as s:
            assert get_user(s, 1).name == "user1"
        assert sql.selects() == 1
        with Session(users) as s:
            assert get_user(s, 1).name == "user1"
        assert sql.selects() == 1
        assert cachedecor.stats("default")["default"]["hits"] == 1
        assert cachedecor.stats("default")["default"]["misses"] == 1
        assert cachedecor.stats("default")["default"]["fills"] == 1

    def test_hit_returns_an_instance_attached_to_the_callers_session(self, users: Engine) -> None:
        once(users, get_user, 1)
        with Session(users) as s:
            user = get_user(s, 1)
            assert user in s
            assert user is s.get(User, 1)
            assert not s.dirty and not s.new

    def test_hit_without_a_session_returns_a_detached_instance(self, users: Engine, sql: SQLCounter) -> None:
        @cached_by_pk(User)
        def fetch(user_id: int) -> User | None:
            with Session(users) as s:
                return s.get(User, user_id)

        first = fetch(2)
        sql.reset()
        second = fetch(2)
        assert sql.count == 0
        assert second is not first
        assert second.name == "user2"
        assert inspect_state(second).detached

    def test_relationships_lazy_load_from_a_hit(self, users: Engine, sql: SQLCounter) -> None:
        once(users, get_user, 1)
        with Session(users) as s:
            sql.reset()
            user = get_user(s, 1)
            assert sql.count == 0
            assert [p.title for p in user.posts] == ["post of 1"]
            assert sql.selects() == 1

    def test_unloaded_deferred_column_stays_unloaded_and_loads_on_access(
        self, users: Engine, sql: SQLCounter
    ) -> None:
        once(users, get_user, 1)
        with Session(users) as s:
            sql.reset()
            user = get_user(s, 1)
            assert "bio" not in user.__dict__
            assert sql.count == 0
            assert user.bio == "bio of 1"
            assert sql.selects() == 1

    def test_instance_already_in_the_identity_map_wins_with_its_pending_changes(self, users: Engine) -> None:
        once(users, get_user, 1)
        with Session(users) as s:
            mine = s.get(User, 1)
            mine.name = "changed, not flushed"
            assert get_user(s, 1) is mine
            assert mine.name == "changed, not flushed"
            assert mine in s.dirty

    def test_a_none_result_is_not_cached_by_default(self, users: Engine, sql: SQLCounter) -> None:
        with Session(users) as s:
            assert get_user(s, 99) is None
            assert get_user(s, 99) is None
        assert sql.selects() == 2

    def test_cache_none_caches_a_missing_row(self, users: Engine, sql: SQLCounter) -> None:
        with Session(users) as s:
            assert get_user_or_none(s, 99) is None
        with Session(users) as s:
            assert get_user_or_none(s, 99) is None
        assert sql.selects() == 1

    def test_pk_named_keyword_only_parameter(self, users: Engine, sql: SQLCounter) -> None:
        with Session(users) as s:
            assert load_user(session=s, user_id=3).name == "user3"
        with Session(users) as s:
            assert load_user(session=s, user_id=3).name == "user3"
        assert sql.selects() == 1

    def test_scoped_session_is_recognised_as_the_session(self, users: Engine, sql: SQLCounter) -> None:
        scoped = scoped_session(sessionmaker(users))
        try:
            get_user(scoped, 1)
            sql.reset()
            user = get_user(scoped, 1)
            assert sql.count == 0
            assert user in scoped()
        finally:
            scoped.remove()


class TestKeysOfCalls:
    def test_composite_key_from_several_parameters(
        self, engine: Engine, backend: str, sql: SQLCounter
    ) -> None:
        with Session(engine) as s:
            s.add_all(
                [Membership(tenant="acme", id=1, role="admin"), Membership(tenant="zeta", id=1, role="user")]
            )
            s.commit()
        sql.reset()
        with Session(engine) as s:
            assert get_membership(s, "acme", 1).role == "admin"
            assert get_membership(s, "zeta", 1).role == "user"
        with Session(engine) as s:
            assert get_membership(s, "acme", 1).role == "admin"
            assert get_membership(s, "zeta", 1).role == "user"
        assert sql.selects() == 2

    def test_composite_key_from_one_tuple_argument_shares_entries(
        self, engine: Engine, backend: str, sql: SQLCounter
    ) -> None:
        with Session(engine) as s:
            s.add(Membership(tenant="acme", id=7, role="admin"))
            s.commit()
        sql.reset()
        assert once(engine, get_membership_by_tuple, ("acme", 7)).role == "admin"
        assert once(engine, get_membership, "acme", 7).role == "admin"
        assert sql.selects() == 1
        assert get_membership_by_tuple.cache_key(("acme", 7)) == get_membership.cache_key(("acme", 7))

    def test_a_key_with_none_calls_the_function_like_the_undecorated_one(
        self, engine: Engine, backend: str
    ) -> None:
        calls: list[Any] = []

        @cached_by_pk(User)
        def lookup(session: Session, user_id: Any) -> Any:
            calls.append(user_id)
            return None

        assert once(engine, lookup, None) is None
        assert once(engine, lookup, None) is None
        assert calls == [None, None]
        counters = cachedecor.stats()["default"]
        assert counters["uncacheable"] == 2
        assert counters["hits"] == counters["misses"] == counters["fills"] == 0

    def test_a_composite_key_of_the_wrong_arity_calls_the_function(
        self, engine: Engine, backend: str
    ) -> None:
        calls: list[Any] = []

        @cached_by_pk(Membership)
        def lookup(session: Session, key: Any) -> Any:
            calls.append(key)
            return None

        assert once(engine, lookup, ("acme",)) is None
        assert calls == [("acme",)]
        assert cachedecor.stats()["default"]["uncacheable"] == 1

    def test_a_float_key_of_an_integer_row_is_served_but_never_cached_under_the_float(
        self, users: Engine, sql: SQLCounter
    ) -> None:
        first = once(users, get_user, 1.0)
        second = once(users, get_user, 1.0)
        assert first.name == second.name == "user1"  # type: ignore[union-attr]
        counters = cachedecor.stats()["default"]
        assert counters["uncacheable"] == 2 and counters["fills"] == 0 and counters["hits"] == 0
        once(users, get_user, 1)
        sql.reset()
        assert once(users, get_user, 1).name == "user1"  # type: ignore[union-attr]
        assert sql.count == 0


class TestInheritance:
    def test_joined_inheritance_hit_returns_the_subclass(
        self, engine: Engine, backend: str, sql: SQLCounter
    ) -> None:
        with Session(engine) as s:
            s.add_all([Manager(id=1, name="m", budget=10), Engineer(id=2, name="e", language="rust")])
            s.commit()
        once(engine, get_employee, 1)
        once(engine, get_employee, 2)
        sql.reset()
        with Session(engine) as s:
            manager = get_employee(s, 1)
            engineer = get_employee(s, 2)
            assert type(manager) is Manager and type(engineer) is Engineer
            assert sql.count == 0
            assert (manager.budget, engineer.language) == (10, "rust")

    def test_single_table_inheritance_hit_returns_the_subclass(
        self, engine: Engine, backend: str, sql: SQLCounter
    ) -> None:
        with Session(engine) as s:
            s.add_all([Truck(id=1, payload=500), Vehicle(id=2)])
            s.commit()
        once(engine, get_vehicle, 1)
        once(engine, get_vehicle, 2)
        sql.reset()
        with Session(engine) as s:
            truck, car = get_vehicle(s, 1), get_vehicle(s, 2)
            assert (type(truck), truck.payload, type(car)) == (Truck, 500, Vehicle)
        assert sql.count == 0


class TestValuesRoundTrip:
    def test_every_column_type_comes_back_exactly(self, engine: Engine, backend: str) -> None:
        key = uuid.uuid4()
        paris = zoneinfo.ZoneInfo("Europe/Paris")
        values: dict[str, Any] = {
            "at_naive": datetime.datetime(2024, 2, 29, 23, 59, 59, 999999),
            "at_aware": datetime.datetime(2024, 7, 1, 12, 30, tzinfo=paris),
            "day": datetime.date(1999, 12, 31),
            "clock": datetime.time(8, 15, 30, 250),
            "span": datetime.timedelta(days=3, seconds=7, microseconds=11),
            "amount": decimal.Decimal("12345.678900"),
            "blob": bytes(range(256)),
            "color": Color.GREEN,
            "doc": {"a": [1, 2.5, "x", None, True], "b": {"nested": "ü"}},
            "ratio": 0.1,
            "flag": True,
            "text": "naïve \u2013 text",
        }
        with Session(engine) as s:
            s.add(Everything(id=key, **values))
            s.commit()
        with Session(engine) as s:
            loaded = get_everything(s, key)
            expected = {name: getattr(loaded, name) for name in values}
        with Session(engine) as s:
            hit = get_everything(s, key)
            got = {name: getattr(hit, name) for name in values}
        assert cachedecor.stats()["default"]["hits"] == 1
        assert got == expected
        for name in values:
            assert type(got[name]) is type(expected[name]), name
        assert got["at_aware"].utcoffset() == expected["at_aware"].utcoffset()

    def test_null_columns_come_back_as_none(self, engine: Engine, backend: str) -> None:
        key = uuid.uuid4()
        with Session(engine) as s:
            s.add(Everything(id=key))
            s.commit()
        once(engine, get_everything, key)
        hit = once(engine, get_everything, key)
        assert cachedecor.stats()["default"]["hits"] == 1
        assert hit.at_aware is None and hit.color is None and hit.doc is None


class TestMany:
    def test_one_multi_get_and_one_call_with_the_missing_keys_only(
        self, users: Engine, sql: SQLCounter
    ) -> None:
        calls: list[list[int]] = []

        @cached_by_pk(User, many=True)
        def fetch(session: Session, ids: list[int]) -> list[User]:
            calls.append(list(ids))
            return list(session.scalars(select(User).where(User.id.in_(ids))))

        once(users, get_user, 2)
        with Session(users) as s:
            result = fetch(s, [3, 1, 2])
        assert [u.id for u in result] == [3, 1, 2]
        assert calls == [[3, 1]]
        with Session(users) as s:
            assert [u.id for u in fetch(s, [1, 2, 3])] == [1, 2, 3]
        assert calls == [[3, 1]]

    def test_order_follows_the_request_with_first_occurrence_of_duplicates(self, users: Engine) -> None:
        with Session(users) as s:
            assert [u.id for u in get_users(s, [2, 1, 2, 3, 1])] == [2, 1, 3]
        with Session(users) as s:
            assert [u.id for u in get_users(s, [2, 1, 2, 3, 1])] == [2, 1, 3]

    def test_rows_that_do_not_exist_are_left_out(self, users: Engine) -> None:
        with Session(users) as s:
            assert [u.id for u in get_users(s, [5, 1, 6])] == [1]

    def test_all_hits_do_not_call_the_function(self, users: Engine, sql: SQLCounter) -> None:
        once(users, get_users, [1, 2, 3])
        sql.reset()
        with Session(users) as s:
            result = get_users(s, [3, 2, 1])
            assert all(u in s for u in result)
        assert sql.count == 0

    def test_empty_request_returns_empty_list(self, users: Engine, sql: SQLCounter) -> None:
        assert once(users, get_users, []) == []
        assert sql.count == 0


class TestWrapper:
    def test_keeps_name_docstring_and_signature(self) -> None:
        assert get_user.__name__ == "get_user"
        assert get_user.__doc__ == "Load one user."
        assert str(inspect.signature(get_user)) == "(session: 'Session', user_id: 'int') -> 'User | None'"
        assert get_user.__wrapped__.__name__ == "get_user"

    def test_cache_key_is_key_for_in_the_default_namespace(self, backend: str) -> None:
        assert get_user.cache_key(5) == cachedecor.key_for(User, 5)

    def test_region_is_the_configured_dogpile_region(self, backend: str) -> None:
        assert get_user.region is cachedecor.get_region("default")

    def test_unconfigured_region_raises_region_not_configured(self, sqlite_engine: Engine) -> None:
        @cached_by_pk(User, region="nowhere")
        def fetch(session: Session, user_id: int) -> User | None:
            return session.get(User, user_id)

        with pytest.raises(cachedecor.RegionNotConfigured, match="nowhere"):
            once(sqlite_engine, fetch, 1)

    def test_decorating_before_configuring_works(self, sqlite_engine: Engine) -> None:
        @cached_by_pk(User, region="late")
        def fetch(session: Session, user_id: int) -> User | None:
            return session.get(User, user_id)

        add_users(sqlite_engine, 1)
        cachedecor.configure_regions({"regions": {"late": {"backend": "dogpile.cache.memory"}}})
        once(sqlite_engine, fetch, 1)
        once(sqlite_engine, fetch, 1)
        assert cachedecor.stats("late")["late"]["hits"] == 1

    def test_invalidate_attribute_deletes_the_entry(self, users: Engine, sql: SQLCounter) -> None:
        once(users, get_user, 1)
        get_user.invalidate(1)
        sql.reset()
        once(users, get_user, 1)
        assert sql.selects() == 1

    def test_per_function_expiration_time_is_validated(self) -> None:
        with pytest.raises(TypeError, match="expiration_time"):
            cached_by_pk(User, expiration_time=-1)(lambda session, user_id: None)

    def test_decorating_a_non_mapped_class_raises(self) -> None:
        with pytest.raises(TypeError, match="mapped class"):
            cached_by_pk(int)

    def test_returning_another_type_is_a_usage_error_naming_both_classes(self, users: Engine) -> None:
        @cached_by_pk(User)
        def wrong(session: Session, user_id: int) -> Any:
            return session.get(Post, user_id * 10)

        for _ in range(2):  # the same on the second call: nothing cached
            with pytest.raises(UsageError, match=r"wrong is decorated with @cached_by_pk\(User\).*Post"):
                once(users, wrong, 1)
        counters = cachedecor.stats()["default"]
        assert counters["fills"] == 0 and counters["hits"] == 0

    def test_returning_another_row_is_returned_uncached_and_counted(self, users: Engine) -> None:
        @cached_by_pk(User)
        def wrong(session: Session, user_id: int) -> User | None:
            return session.get(User, user_id + 1)

        assert once(users, wrong, 1).id == 2  # type: ignore[union-attr]
        assert once(users, wrong, 1).id == 2  # type: ignore[union-attr]
        counters = cachedecor.stats()["default"]
        assert counters["uncacheable"] == 2 and counters["fills"] == 0


class TestSessionState:
    def test_row_already_in_the_session_before_a_miss_does_not_fill(
        self, users: Engine, sql: SQLCounter
    ) -> None:
        with Session(users) as s:
            held = s.get(User, 1)
            assert get_user(s, 1) is held
        assert cachedecor.stats()["default"]["fills"] == 0
        sql.reset()
        once(users, get_user, 1)
        assert sql.selects() == 1

    def test_expired_identity_map_instance_is_refreshed_from_the_cache(
        self, users: Engine, sql: SQLCounter
    ) -> None:
        once(users, get_user, 1)
        with Session(users) as s:
            user = get_user(s, 1)
            s.commit()  # expires every instance
            sql.reset()
            again = get_user(s, 1)
            assert again is user
            assert again.name == "user1"
            assert sql.count == 0


def inspect_state(obj: Any) -> Any:
    from sqlalchemy import inspect as sa_inspect

    return sa_inspect(obj)

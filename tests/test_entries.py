"""An entry names what it holds: a hit whose entry holds another row, or a row written
under another mapping, is a miss (counted), never returned."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import cachedecor
from cachedecor import cached_by_pk
from cachedecor.config import region_settings
from cachedecor.rows import model_plan
from tests.conftest import once
from tests.models import Color, Employee, Engineer, Everything, Manager, User


@cached_by_pk(User)
def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(User, many=True)
def get_users(session: Session, user_ids: list[int]) -> list[User]:
    return [u for u in (session.get(User, i) for i in user_ids) if u is not None]


@cached_by_pk(User, cache_none=True)
def get_user_or_none(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


@cached_by_pk(Employee, cache_none=True)
def get_employee(session: Session, employee_id: int) -> Employee | None:
    return session.get(Employee, employee_id)


@cached_by_pk(Manager, cache_none=True)
def get_manager(session: Session, manager_id: int) -> Manager | None:
    return session.get(Manager, manager_id)


@cached_by_pk(Everything)
def get_thing(session: Session, thing_id: uuid.UUID) -> Everything | None:
    return session.get(Everything, thing_id)


@pytest.fixture
def users(engine: Engine, backend: str) -> Engine:
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"user{i}") for i in (1, 2)])
        s.commit()
    return engine


def store() -> object:
    return region_settings("default").store


def copy_entry(source: str, target: str) -> None:
    """Put the stored bytes of ``source`` under ``target`` (as a misrouted write would)."""
    data = store().get(source)  # type: ignore[attr-defined]
    assert data is not None
    store().delete_many([target])  # type: ignore[attr-defined]
    token = store().lease(target, 5)  # type: ignore[attr-defined]
    assert store().fill(target, data, token, 300)  # type: ignore[attr-defined]


def counters() -> dict[str, int]:
    return cachedecor.stats("default")["default"]


class TestIdentity:
    def test_an_entry_of_another_row_under_a_key_is_a_counted_miss(self, users: Engine) -> None:
        once(users, get_user, 2)
        copy_entry(get_user.cache_key(2), get_user.cache_key(1))
        assert once(users, get_user, 1).name == "user1"  # type: ignore[union-attr]
        assert counters()["mismatches"] == 1 and counters()["hits"] == 0
        assert once(users, get_user, 1).name == "user1"  # type: ignore[union-attr]
        assert counters()["hits"] == 1  # refilled with the right row

    def test_many_refuses_an_entry_of_another_row(self, users: Engine) -> None:
        once(users, get_user, 2)
        copy_entry(get_user.cache_key(2), get_user.cache_key(1))
        rows = once(users, get_users, [1, 2])
        assert [(u.id, u.name) for u in rows] == [(1, "user1"), (2, "user2")]
        assert counters()["mismatches"] == 1

    def test_a_cached_no_such_row_is_not_served_for_another_key(self, users: Engine) -> None:
        assert once(users, get_user_or_none, 99) is None
        copy_entry(get_user_or_none.cache_key(99), get_user_or_none.cache_key(1))
        assert once(users, get_user_or_none, 1).name == "user1"  # type: ignore[union-attr]
        assert counters()["mismatches"] == 1

    def test_an_entry_written_under_another_mapping_is_a_counted_miss(self, users: Engine) -> None:
        once(users, get_user, 1)
        key = get_user.cache_key(1)
        settings = region_settings("default")
        payload = settings.codec.decode(key, store().get(key))  # type: ignore[attr-defined]
        payload[2] ^= 1  # the fingerprint of a mapping with other columns
        payload[3][1] = "written by another version"
        store().delete_many([key])  # type: ignore[attr-defined]
        token = store().lease(key, 5)  # type: ignore[attr-defined]
        store().fill(key, settings.codec.encode(key, payload), token, 300)  # type: ignore[attr-defined]
        assert once(users, get_user, 1).name == "user1"  # type: ignore[union-attr]
        assert counters()["mismatches"] == 1

    def test_the_entry_names_its_key_class_and_mapping(self, users: Engine) -> None:
        once(users, get_user, 1)
        key = get_user.cache_key(1)
        payload = region_settings("default").codec.decode(key, store().get(key))  # type: ignore[attr-defined]
        plan = model_plan(User).by_class[User]
        assert payload[:3] == [key, "User", plan.fingerprint]


class TestValues:
    @pytest.mark.parametrize("stored", ["BLUE", 3, ["RED"]])
    def test_an_enum_value_that_names_no_member_is_a_counted_bad_entry(
        self, engine: Engine, backend: str, stored: object
    ) -> None:
        thing = uuid.UUID(int=1)
        with Session(engine) as s:
            s.add(Everything(id=thing, color=Color.GREEN))
            s.commit()
        once(engine, get_thing, thing)
        key = get_thing.cache_key(thing)
        settings = region_settings("default")
        payload = settings.codec.decode(key, store().get(key))  # type: ignore[attr-defined]
        column = model_plan(Everything).by_class[Everything].keys.index("color")
        assert payload[3][column] == "GREEN"
        payload[3][column] = stored
        store().delete_many([key])  # type: ignore[attr-defined]
        token = store().lease(key, 5)  # type: ignore[attr-defined]
        store().fill(key, settings.codec.encode(key, payload), token, 300)  # type: ignore[attr-defined]
        assert once(engine, get_thing, thing).color is Color.GREEN  # type: ignore[union-attr]
        assert counters()["bad_entries"] == 1 and counters()["hits"] == 0
        assert once(engine, get_thing, thing).color is Color.GREEN  # type: ignore[union-attr]
        assert counters()["hits"] == 1  # refilled


class TestHierarchies:
    @pytest.fixture
    def staff(self, engine: Engine, backend: str) -> Engine:
        with Session(engine) as s:
            s.add_all([Manager(id=1, name="m", budget=5), Engineer(id=2, name="e")])
            s.commit()
        return engine

    def test_a_subclass_reader_shares_the_rows_key_with_the_root_reader(self, staff: Engine) -> None:
        assert get_manager.cache_key(1) == get_employee.cache_key(1)
        once(staff, get_employee, 1)
        manager = once(staff, get_manager, 1)
        assert isinstance(manager, Manager) and counters()["hits"] == 1

    def test_a_subclass_reader_never_serves_a_sibling_and_never_caches_its_none(self, staff: Engine) -> None:
        assert once(staff, get_manager, 2) is None  # an Engineer: no Manager 2
        assert isinstance(once(staff, get_employee, 2), Engineer)  # not a cached None
        assert once(staff, get_manager, 2) is None  # the Engineer's entry is not served as a Manager
        assert counters()["hits"] == 0

    def test_a_readers_own_exception_after_a_siblings_entry_is_raised_once(self, staff: Engine) -> None:
        calls: list[int] = []

        @cached_by_pk(Manager)
        def failing_manager(session: Session, manager_id: int) -> Manager | None:
            calls.append(manager_id)
            raise RuntimeError("the database is gone")

        once(staff, get_employee, 2)  # caches the Engineer under the shared key
        with pytest.raises(RuntimeError, match="the database is gone"):
            once(staff, failing_manager, 2)
        assert calls == [2]
        assert counters()["errors"] == 0

"""Keys: always valid for memcached, distinct for distinct primary keys, loud when ambiguous."""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, mapped_column

from cachedecor import ConfigError, InvalidKeyError, key_for
from cachedecor.keys import MAX_KEY_LENGTH, KeyMaker, mangle_key, model_fingerprint
from tests.models import Employee, Engineer, Manager, Membership, Truck, User, Vehicle

SETTINGS = settings(max_examples=200, deadline=None)


class UuidBase(DeclarativeBase):
    pass


class Thing(UuidBase):
    __tablename__ = "things"
    id = mapped_column(String(36), primary_key=True)


def assert_valid(key: str) -> None:
    raw = key.encode()
    assert len(raw) <= MAX_KEY_LENGTH
    assert all(0x21 <= b <= 0x7E for b in raw), key


ints = st.integers(min_value=-(2**70), max_value=2**70)
texts = st.text(max_size=3000)


@SETTINGS
@given(ints)
def test_integer_keys_are_valid(pk: int) -> None:
    assert_valid(key_for(User, pk))


@SETTINGS
@given(texts)
def test_text_keys_of_any_unicode_and_length_are_valid(pk: str) -> None:
    assert_valid(key_for(Thing, pk))


@SETTINGS
@given(st.lists(texts, min_size=2, max_size=2, unique=True))
def test_distinct_text_keys_give_distinct_keys(pks: list[str]) -> None:
    a, b = pks
    assert key_for(Thing, a) != key_for(Thing, b)


@SETTINGS
@given(st.lists(ints, min_size=2, max_size=2, unique=True))
def test_distinct_integer_keys_give_distinct_keys(pks: list[int]) -> None:
    a, b = pks
    assert key_for(User, a) != key_for(User, b)


@SETTINGS
@given(st.lists(st.uuids(), min_size=2, max_size=2, unique=True))
def test_uuid_keys_are_valid_and_distinct(pks: list[uuid.UUID]) -> None:
    a, b = (key_for(Thing, pk) for pk in pks)
    assert_valid(a)
    assert a != b


composite = st.tuples(texts, ints)


@SETTINGS
@given(st.lists(composite, min_size=2, max_size=2, unique=True))
def test_composite_keys_are_valid_and_distinct(pks: list[tuple[str, int]]) -> None:
    a, b = (key_for(Membership, pk) for pk in pks)
    assert_valid(a)
    assert_valid(b)
    assert a != b


@SETTINGS
@given(composite)
def test_keys_are_stable(pk: tuple[str, int]) -> None:
    assert key_for(Membership, pk) == key_for(Membership, pk) == key_for(Membership, list(pk))


@SETTINGS
@given(texts)
def test_long_keys_keep_the_readable_prefix(pk: str) -> None:
    key = key_for(Thing, pk)
    assert key.startswith(f"cachedecor:things:{model_fingerprint(Thing)}:")


def test_a_key_reads_namespace_table_fingerprint_and_key() -> None:
    assert key_for(User, 42) == f"cachedecor:cd_users:{model_fingerprint(User)}:42"
    assert (
        key_for(Membership, ("acme", 7))
        == f"cachedecor:cd_memberships:{model_fingerprint(Membership)}:acme,7"
    )


def test_separators_inside_text_keys_are_escaped() -> None:
    assert key_for(Membership, ("a,b", 1)) != key_for(Membership, ("a", 1))
    assert ":" not in key_for(Thing, "x:y").rsplit(":", 1)[1]


@pytest.mark.parametrize(
    "value",
    [
        datetime.date(2024, 1, 2),
        datetime.datetime(2024, 1, 2, 3, 4),
        decimal.Decimal("1.50"),
        b"\x00\xff",
        1.5,
    ],
)
def test_other_key_types_have_stable_text(value: Any) -> None:
    assert_valid(key_for(Thing, value))
    assert key_for(Thing, value) == key_for(Thing, value)


def test_equal_decimals_share_a_key() -> None:
    assert key_for(Thing, decimal.Decimal("1.50")) == key_for(Thing, decimal.Decimal("1.5"))


class TestAmbiguousKeys:
    @pytest.mark.parametrize("pk", [None, ("acme", None), (None, 1)])
    def test_none_in_a_key_raises(self, pk: Any) -> None:
        model = User if pk is None else Membership
        with pytest.raises(InvalidKeyError, match="None"):
            key_for(model, pk)

    @pytest.mark.parametrize("pk", [("acme",), ("acme", 1, 2), "acme"])
    def test_wrong_arity_raises(self, pk: Any) -> None:
        with pytest.raises(InvalidKeyError, match="2"):
            key_for(Membership, pk)

    @pytest.mark.parametrize("pk", [object(), float("nan"), decimal.Decimal("NaN"), {"a": 1}])
    def test_values_without_a_stable_text_form_raise(self, pk: Any) -> None:
        with pytest.raises(InvalidKeyError):
            key_for(Thing, pk)

    def test_invalid_key_error_is_a_cache_error_and_a_value_error(self) -> None:
        import cachedecor

        assert issubclass(InvalidKeyError, cachedecor.CacheError)
        assert issubclass(InvalidKeyError, ValueError)


class TestFingerprint:
    def test_changes_when_a_column_changes(self) -> None:
        class BaseA(DeclarativeBase):
            pass

        class BaseB(DeclarativeBase):
            pass

        class V1(BaseA):
            __tablename__ = "items"
            id = mapped_column(Integer, primary_key=True)
            name = mapped_column(String(10))

        class V2(BaseB):
            __tablename__ = "items"
            id = mapped_column(Integer, primary_key=True)
            name = mapped_column(String(20))

        V2.__name__ = V2.__qualname__ = V1.__qualname__
        V2.__module__ = V1.__module__
        assert model_fingerprint(V1) != model_fingerprint(V2)
        assert key_for(V1, 1) != key_for(V2, 1)

    def test_is_stable_for_one_model(self) -> None:
        assert model_fingerprint(User) == model_fingerprint(User)
        assert len(model_fingerprint(User)) == 8

    def test_differs_between_classes_of_one_hierarchy(self) -> None:
        prints = {model_fingerprint(m) for m in (Employee, Manager, Engineer)}
        assert len(prints) == 3

    def test_single_table_subclasses_get_their_own_table_label(self) -> None:
        assert key_for(Vehicle, 1) != key_for(Truck, 1)
        assert ":cd_vehicles.Truck:" in key_for(Truck, 1)


class TestNamespaces:
    def test_namespace_is_the_first_part(self) -> None:
        assert KeyMaker(User, "app1")(5).startswith("app1:cd_users:")

    @pytest.mark.parametrize("namespace", ["", "a b", "a:b", "x" * 65, "ü", "app\n"])
    def test_bad_namespaces_are_config_errors(self, namespace: str) -> None:
        with pytest.raises(ConfigError):
            KeyMaker(User, namespace)


class TestMangleKey:
    def test_plain_keys_pass_unchanged(self) -> None:
        assert mangle_key("module:function|1") == "module:function|1"

    def test_a_trailing_newline_is_not_plain(self) -> None:
        assert_valid(mangle_key("0\n"))
        assert mangle_key("0\n") != mangle_key("0")

    @SETTINGS
    @given(st.lists(texts.filter(bool), min_size=2, max_size=2, unique=True))
    def test_any_key_becomes_valid_and_distinct(self, keys: list[str]) -> None:
        a, b = (mangle_key(k) for k in keys)
        assert_valid(a)
        assert_valid(b)
        assert a != b

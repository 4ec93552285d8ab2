"""Cache keys: valid for memcached, distinct, stable, readable, and tied to the model's shape."""

from __future__ import annotations

import decimal
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

import cachedecor
from cachedecor import ConfigError, InvalidKeyError, key_for
from cachedecor.errors import UsageError
from cachedecor.keys import MAX_KEY_LENGTH, KeyMaker, mangle_key
from cachedecor.rows import class_tag, mapping_fingerprint
from tests.models import Employee, Engineer, Everything, Manager, Membership, Truck, User, Vehicle

ROOT = Path(__file__).resolve().parent.parent
PROPERTY = settings(max_examples=150, deadline=None)


class KeyBase(DeclarativeBase):
    pass


class Tag(KeyBase):
    """A model whose primary key is a string."""

    __tablename__ = "kt_tags"
    name: Mapped[str] = mapped_column(String(5000), primary_key=True)


# Any unicode, surrogates, spaces and control characters included; some long enough to be hashed.
any_text = st.characters(exclude_categories=())
texts = st.one_of(st.text(any_text, max_size=40), st.text(any_text, min_size=200, max_size=5000))
ints = st.integers()
uuids = st.uuids()
memberships = st.tuples(texts, ints)

model_and_pk = st.one_of(
    ints.map(lambda pk: (User, pk)),
    texts.map(lambda pk: (Tag, pk)),
    uuids.map(lambda pk: (Everything, pk)),
    memberships.map(lambda pk: (Membership, pk)),
)

MEMCACHED_KEY = re.compile(r"[\x21-\x7e]{1,250}")


def assert_valid_memcached_key(key: str) -> None:
    assert MEMCACHED_KEY.fullmatch(key), key
    assert len(key.encode()) <= MAX_KEY_LENGTH


def prefix_of(model: Any) -> str:
    return f"cachedecor:{model.__tablename__}:"


# --------------------------------------------------------------------------------------
# properties of every key


@PROPERTY
@given(model_and_pk)
def test_every_key_is_a_valid_memcached_key(case: tuple[Any, Any]) -> None:
    model, pk = case

    assert_valid_memcached_key(key_for(model, pk))


@PROPERTY
@given(model_and_pk)
def test_every_key_starts_with_the_readable_prefix(case: tuple[Any, Any]) -> None:
    model, pk = case

    assert key_for(model, pk).startswith(prefix_of(model))


@PROPERTY
@given(model_and_pk)
def test_keys_are_stable(case: tuple[Any, Any]) -> None:
    model, pk = case

    assert key_for(model, pk) == key_for(model, pk)
    assert KeyMaker(model)(pk) == key_for(model, pk)


@PROPERTY
@given(
    st.lists(model_and_pk, max_size=8).map(lambda cases: [pk for _, pk in cases]),
    st.sampled_from([None, ("tenant_a", None), (None, 3)]),
)
@example([1, 1, 10**18, -(10**18), 10**19, True], None)
def test_keys_for_many_are_the_keys_of_each(pks: list[Any], space: Any) -> None:
    for model in (User, Tag, Everything, Membership):
        maker = KeyMaker(model)
        each: dict[str, Any] = {}
        for pk in pks:
            try:
                each.setdefault(maker(pk, space), pk)
            except (UsageError, ValueError, TypeError) as exc:
                with pytest.raises(type(exc)):
                    maker.keys_for(pks, space)
                break
        else:
            many = maker.keys_for(pks, space)
            assert list(many.items()) == list(each.items())


@PROPERTY
@given(st.lists(ints, unique=True, min_size=2))
def test_distinct_integer_keys_give_distinct_cache_keys(pks: list[int]) -> None:
    assert len({key_for(User, pk) for pk in pks}) == len(pks)


@PROPERTY
@given(st.lists(texts, unique=True, min_size=2))
@example(["a b", "a%20b", "a+b", "a_b"])
@example(["x" * 300 + "a", "x" * 300 + "b"])
@example(["é", "e\u0301", "\ud800", "\udc00", "\ud83d\ude00", "\U0001f600"])
def test_distinct_string_keys_give_distinct_cache_keys(pks: list[str]) -> None:
    assert len({key_for(Tag, pk) for pk in pks}) == len(pks)


@PROPERTY
@given(st.lists(uuids, unique=True, min_size=2))
def test_distinct_uuid_keys_give_distinct_cache_keys(pks: list[uuid.UUID]) -> None:
    assert len({key_for(Everything, pk) for pk in pks}) == len(pks)


@PROPERTY
@given(st.lists(memberships, unique=True, min_size=2))
@example([("a,1", 2), ("a", 12), ("a:1", 2), ("a", "1,2")])
@example([("t" * 300, 1), ("t" * 300, 2)])
def test_distinct_composite_keys_give_distinct_cache_keys(pks: list[tuple[Any, Any]]) -> None:
    assert len({key_for(Membership, pk) for pk in pks}) == len(pks)


@PROPERTY
@given(st.text(any_text, min_size=MAX_KEY_LENGTH))
def test_long_keys_keep_the_readable_prefix_and_fit_the_limit(pk: str) -> None:
    key = key_for(Tag, pk)

    assert key.startswith(prefix_of(Tag))
    assert len(key) <= MAX_KEY_LENGTH


def test_short_key_is_namespace_table_and_primary_key() -> None:
    assert key_for(User, 42) == "cachedecor:cd_users:42"


def test_a_translated_schema_and_a_shard_token_are_part_of_the_key() -> None:
    assert key_for(User, 42, schema="tenant_1") == "cachedecor:tenant_1.cd_users:42"
    assert key_for(User, 42, schema="tenant_2") != key_for(User, 42, schema="tenant_1")
    assert key_for(User, 42, identity_token="east") == "cachedecor:cd_users@east:42"
    assert key_for(User, 42, schema="a.b") != key_for(User, 42, schema="a", identity_token=None)


def test_composite_key_lists_its_values_in_mapper_order() -> None:
    assert key_for(Membership, ("acme", 7)) == prefix_of(Membership) + "acme,7"


def test_composite_key_may_be_given_as_a_list() -> None:
    assert key_for(Membership, ["acme", 7]) == key_for(Membership, ("acme", 7))


def test_single_key_may_be_given_as_a_one_tuple() -> None:
    assert key_for(User, (42,)) == key_for(User, 42)


def test_same_primary_key_of_different_models_gives_different_keys() -> None:
    assert key_for(User, 1) != key_for(Employee, 1)


def test_keys_are_the_same_in_another_process() -> None:
    code = (
        "from cachedecor import key_for; from tests.models import Membership; "
        "print(key_for(Membership, ('a b', 1)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}

    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout

    assert out.strip() == key_for(Membership, ("a b", 1))


# --------------------------------------------------------------------------------------
# ambiguous or unsupported primary keys


@pytest.mark.parametrize(
    ("model", "pk"),
    [
        pytest.param(User, None, id="none"),
        pytest.param(User, (None,), id="none-in-one-tuple"),
        pytest.param(Membership, ("acme", None), id="none-in-composite"),
        pytest.param(Membership, (None, 1), id="none-first-in-composite"),
    ],
)
def test_none_in_a_primary_key_is_an_invalid_key(model: Any, pk: Any) -> None:
    with pytest.raises(InvalidKeyError, match="None"):
        key_for(model, pk)


@pytest.mark.parametrize(
    ("model", "pk"),
    [
        pytest.param(Membership, "acme", id="scalar-for-composite"),
        pytest.param(Membership, ("acme",), id="too-few"),
        pytest.param(Membership, ("acme", 1, 2), id="too-many"),
        pytest.param(Membership, (), id="empty-tuple"),
        pytest.param(User, (1, 2), id="two-for-single"),
    ],
)
def test_wrong_number_of_primary_key_values_is_an_invalid_key(model: Any, pk: Any) -> None:
    with pytest.raises(InvalidKeyError, match=model.__name__):
        key_for(model, pk)


@pytest.mark.parametrize(
    "pk",
    [
        pytest.param(object(), id="object"),
        pytest.param({"id": 1}, id="dict"),
        pytest.param({1}, id="set"),
        pytest.param(1 + 2j, id="complex"),
        pytest.param(float("nan"), id="float-nan"),
        pytest.param(float("inf"), id="float-inf"),
        pytest.param(decimal.Decimal("NaN"), id="decimal-nan"),
        pytest.param(decimal.Decimal("-Infinity"), id="decimal-infinity"),
    ],
)
def test_unsupported_primary_key_value_is_an_invalid_key(pk: Any) -> None:
    with pytest.raises(InvalidKeyError):
        key_for(User, pk)


def test_nested_tuple_in_a_composite_key_is_an_invalid_key() -> None:
    with pytest.raises(InvalidKeyError):
        key_for(Membership, (("acme",), 1))


def test_invalid_key_error_is_a_cache_error() -> None:
    with pytest.raises(cachedecor.CacheError):
        key_for(User, None)


def test_unmapped_class_is_refused() -> None:
    with pytest.raises(TypeError, match="not a mapped class"):
        KeyMaker(Path)


# --------------------------------------------------------------------------------------
# the fingerprint follows the model's shape


def thing(*columns: tuple[str, TypeEngine[Any]]) -> type:
    """A model ``Thing`` on table ``things`` with ``columns``, on a registry of its own."""

    class Base(DeclarativeBase):
        pass

    attrs: dict[str, Any] = {
        "__tablename__": "things",
        "__module__": __name__,
        "__qualname__": "Thing",
        "id": mapped_column(Integer, primary_key=True),
    }
    attrs.update({name: mapped_column(type_) for name, type_ in columns})
    return type("Thing", (Base,), attrs)


def thing_in(module: str, *columns: tuple[str, TypeEngine[Any]]) -> type:
    """``thing`` defined in another Python module (another version of the application)."""

    class Base(DeclarativeBase):
        pass

    attrs: dict[str, Any] = {
        "__tablename__": "things",
        "__module__": module,
        "__qualname__": "Thing",
        "id": mapped_column(Integer, primary_key=True),
    }
    attrs.update({name: mapped_column(type_) for name, type_ in columns})
    return type("Thing", (Base,), attrs)


def test_the_key_of_a_row_does_not_depend_on_the_module_or_the_mapped_columns() -> None:
    v1 = thing_in("app.models", ("name", String(50)))
    v2 = thing_in("app.v2.account.models", ("name", String(50)), ("age", Integer()))

    assert key_for(v1, 1) == key_for(v2, 1) == "cachedecor:things:1"


def test_fingerprint_is_the_same_for_the_same_shape_in_another_module_and_registry() -> None:
    first = thing_in("app.models", ("name", String(50)))
    second = thing_in("legacy.models", ("name", String(50)))

    assert mapping_fingerprint(sa_mapper(first)) == mapping_fingerprint(sa_mapper(second))


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param([("name", String(50)), ("age", Integer())], id="column-added"),
        pytest.param([], id="column-removed"),
        pytest.param([("title", String(50))], id="column-renamed"),
        pytest.param([("name", BigInteger())], id="type-changed"),
    ],
)
def test_fingerprint_changes_when_the_columns_change(changed: list[tuple[str, TypeEngine[Any]]]) -> None:
    before = thing(("name", String(50)))
    after = thing(*changed)

    assert mapping_fingerprint(sa_mapper(before)) != mapping_fingerprint(sa_mapper(after))
    assert key_for(before, 1) == key_for(after, 1)


def test_every_class_of_a_hierarchy_shares_the_key_of_a_row() -> None:
    assert key_for(Employee, 1) == key_for(Manager, 1) == key_for(Engineer, 1) == "cachedecor:cd_employees:1"
    assert key_for(Vehicle, 1) == key_for(Truck, 1) == "cachedecor:cd_vehicles:1"


def test_classes_of_a_hierarchy_are_named_by_polymorphic_identity_with_their_own_fingerprint() -> None:
    assert [class_tag(sa_mapper(m)) for m in (Employee, Manager, Engineer)] == [
        "employee",
        "manager",
        "engineer",
    ]
    fingerprints = {mapping_fingerprint(sa_mapper(m)) for m in (Employee, Manager, Engineer, Vehicle, Truck)}
    assert len(fingerprints) == 5


def sa_mapper(model: Any) -> Any:
    return sqlalchemy.inspect(model)


# --------------------------------------------------------------------------------------
# namespaces


@pytest.mark.parametrize("namespace", ["app", "app.v2", "my-app_3", "x" * 64])
def test_namespace_starts_the_key(namespace: str) -> None:
    assert key_for(User, 1, namespace=namespace) == f"{namespace}:cd_users:1"


def test_different_namespaces_give_different_keys() -> None:
    assert key_for(User, 1, namespace="a") != key_for(User, 1, namespace="b")


@pytest.mark.parametrize(
    "namespace",
    [
        pytest.param("", id="empty"),
        pytest.param("my app", id="space"),
        pytest.param("a:b", id="colon"),
        pytest.param("a#b", id="hash"),
        pytest.param("café", id="non-ascii"),
        pytest.param("x" * 65, id="too-long"),
        pytest.param("app\n", id="trailing-newline"),
    ],
)
def test_invalid_namespace_is_a_config_error(namespace: str) -> None:
    with pytest.raises(ConfigError, match="namespace"):
        KeyMaker(User, namespace)
    with pytest.raises(ConfigError, match="namespace"):
        key_for(User, 1, namespace=namespace)


# --------------------------------------------------------------------------------------
# mangle_key: dogpile's key_mangler for cachedecor's regions

plain_keys = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=MAX_KEY_LENGTH
)


@PROPERTY
@given(plain_keys)
def test_mangle_key_leaves_memcached_safe_keys_unchanged(key: str) -> None:
    assert mangle_key(key) == key


@PROPERTY
@given(st.text(any_text, max_size=2000))
@example("")
@example("module:function|two words")
@example("tab\tand\nnewline")
@example("\x7f")
@example("plain\n")
@example("x" * (MAX_KEY_LENGTH + 1))
def test_mangle_key_makes_every_key_valid(key: str) -> None:
    assert_valid_memcached_key(mangle_key(key))


@PROPERTY
@given(st.lists(st.text(any_text, max_size=600), unique=True, min_size=2))
@example(["a b", "a_b", "a\tb", "a\x00b", "aéb"])
@example(["y" * 300 + "1", "y" * 300 + "2"])
def test_mangle_key_keeps_distinct_keys_distinct(keys: list[str]) -> None:
    assert len({mangle_key(k) for k in keys}) == len(keys)


def test_mangled_key_keeps_a_readable_prefix() -> None:
    assert mangle_key("module:function|two words").startswith("module:function|two_words#")

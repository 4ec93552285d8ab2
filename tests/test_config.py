"""configure_regions / get_region / reset: every source form, coercion, and early, named errors.

Configuration never connects to a server, so memcached regions here point at free ports
that nothing listens on, except where a test really uses the cache.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dogpile.cache
import pytest
from dogpile.cache.api import CacheBackend
from dogpile.cache.backends.memory import MemoryBackend
from pymemcache.client.base import Client

import cachedecor
from cachedecor import CacheError, ConfigError, RegionNotConfigured
from cachedecor.backends import MEMCACHED_DEFAULTS, PyMemcacheBackend
from cachedecor.config import (
    ARGUMENT_RANGES,
    BACKEND_ARGUMENTS,
    ENV_VAR,
    REGION_OPTIONS,
    REGION_RANGES,
    RegionSettings,
    check_arguments,
    read_outbox_settings,
    region_settings,
    settings_of,
)
from cachedecor.config.regions import client_arguments
from tests.servers import Memcached, free_port, memcached_binary, unavailable

MEMORY = "dogpile.cache.memory"

# The INI example of API.md, with {p1} and {p2} for the ports.
API_EXAMPLE_INI = """\
[cachedecor]
regions = default, users
; optional, signs every entry with HMAC (see Security)
secret = change-me

[cachedecor.default]
backend = dogpile.cache.pymemcache
expiration_time = 300
arguments.url = 127.0.0.1:{p1}
compress_threshold = 1024
compress_level = 6

[cachedecor.users]
backend = dogpile.cache.pymemcache
expiration_time = 60
arguments.url = 127.0.0.1:{p1}, 127.0.0.1:{p2}
arguments.connect_timeout = 0.2
arguments.timeout = 0.2
"""


def write(tmp_path: Path, text: str, name: str = "cache.ini") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def api_example(tmp_path: Path) -> tuple[Path, int, int]:
    p1, p2 = free_port(), free_port()
    return write(tmp_path, API_EXAMPLE_INI.format(p1=p1, p2=p2)), p1, p2


def memory(**options: Any) -> dict[str, Any]:
    """Nested config: region ``r`` on the memory backend."""
    return {"regions": {"r": {"backend": MEMORY, **options}}}


def memcached(**arguments: Any) -> dict[str, Any]:
    """Nested config: region ``r`` on cachedecor's memcached backend (nothing listening)."""
    return {
        "regions": {
            "r": {
                "backend": "cachedecor.pymemcache",
                "arguments": {"url": "127.0.0.1:11299", **arguments},
            }
        }
    }


def flat(**options: str) -> dict[str, str]:
    """Flat config of region ``r`` on the memory backend; ``options`` are ``r``'s keys as strings."""
    settings = {"cachedecor.regions": "r", "cachedecor.r.backend": MEMORY}
    settings.update({f"cachedecor.r.{k}": v for k, v in options.items()})
    return settings


def described(settings: RegionSettings) -> dict[str, Any]:
    """Everything cachedecor resolved for a region, without the live objects."""
    return {
        "name": settings.name,
        "backend": settings.backend,
        "backend_class": type(settings.region.actual_backend),
        "expiration_time": settings.expiration_time,
        "dogpile_expiration_time": settings.region.expiration_time,
        "namespace": settings.namespace,
        "lease_timeout": settings.lease_timeout,
        "lease_wait": settings.lease_wait,
        "max_entry_size": settings.max_entry_size,
        "arguments": dict(settings.arguments),
        "codec": settings.codec,
        "store": type(settings.store),
    }


def client_options(name: str) -> list[tuple[Any, Any, Any]]:
    """(connect_timeout, timeout, no_delay) of each pymemcache client of region ``name``."""
    clients = region_settings(name).store.client.clients  # type: ignore[attr-defined]
    return [(c.connect_timeout, c.timeout, c.no_delay) for c in clients.values()]


# --------------------------------------------------------------------------------------
# source forms


def test_ini_file_of_the_api_example_configures_its_regions(tmp_path: Path) -> None:
    path, p1, p2 = api_example(tmp_path)

    regions = cachedecor.configure_regions(path)

    assert sorted(regions) == ["default", "users"]
    default, users = region_settings("default"), region_settings("users")
    assert (default.backend, default.expiration_time) == ("cachedecor.pymemcache", 300)
    assert default.arguments["url"] == [f"127.0.0.1:{p1}"]
    assert (default.codec.compress_threshold, default.codec.compress_level) == (1024, 6)
    assert (users.backend, users.expiration_time) == ("cachedecor.pymemcache", 60)
    assert users.arguments["url"] == [f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"]
    assert (users.arguments["connect_timeout"], users.arguments["timeout"]) == (0.2, 0.2)


def test_ini_path_may_be_a_string(tmp_path: Path) -> None:
    path, _, _ = api_example(tmp_path)

    assert sorted(cachedecor.configure_regions(str(path))) == ["default", "users"]


def test_global_secret_signs_every_region(tmp_path: Path) -> None:
    path, _, _ = api_example(tmp_path)

    cachedecor.configure_regions(path)

    assert region_settings("default").codec.secret == b"change-me"
    assert region_settings("users").codec.secret == b"change-me"


def test_region_secret_overrides_the_global_secret() -> None:
    config = {
        "regions": {"a": {"backend": MEMORY, "secret": "own"}, "b": {"backend": MEMORY}},
        "secret": "shared",
    }

    cachedecor.configure_regions(config)

    assert region_settings("a").codec.secret == b"own"
    assert region_settings("b").codec.secret == b"shared"


def test_nested_dict_configures_its_regions() -> None:
    port = free_port()
    config = {
        "regions": {
            "default": {
                "backend": "cachedecor.pymemcache",
                "expiration_time": 300,
                "arguments": {"url": [f"127.0.0.1:{port}"]},
                "compress_threshold": 2048,
            },
            "local": {"backend": MEMORY, "expiration_time": 60},
        },
        "secret": "s3cret",
    }

    regions = cachedecor.configure_regions(config)

    assert sorted(regions) == ["default", "local"]
    default = region_settings("default")
    assert default.arguments["url"] == [f"127.0.0.1:{port}"]
    assert (default.expiration_time, default.codec.compress_threshold) == (300, 2048)
    assert default.codec.secret == b"s3cret"
    assert isinstance(region_settings("local").region.actual_backend, MemoryBackend)


def test_flat_dict_configures_its_regions_and_ignores_other_settings() -> None:
    settings = {
        "sqlalchemy.url": "sqlite://",
        "pyramid.reload_templates": "true",
        "cachedecor.regions": "default, users",
        "cachedecor.default.backend": MEMORY,
        "cachedecor.default.expiration_time": "120",
        "cachedecor.users.backend": MEMORY,
    }

    regions = cachedecor.configure_regions(settings)

    assert sorted(regions) == ["default", "users"]
    assert region_settings("default").expiration_time == 120


@pytest.mark.parametrize("prefix", ["myapp.cache.", "myapp.cache"], ids=["with-dot", "without-dot"])
def test_flat_dict_with_a_custom_prefix_reads_only_its_keys(prefix: str) -> None:
    settings = {
        "myapp.cache.regions": "default",
        "myapp.cache.default.backend": MEMORY,
        "myapp.cache.default.expiration_time": "45",
        "cachedecor.regions": "other",  # not ours under this prefix
        "cachedecor.other.backend": "no.such.backend",
    }

    regions = cachedecor.configure_regions(settings, prefix=prefix)

    assert list(regions) == ["default"]
    assert region_settings("default").expiration_time == 45


def test_ini_file_with_a_custom_prefix_reads_its_sections(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[cachedecor.default]\nbackend = no.such.backend\n\n"
        "[myapp.cache]\nregions = default\n\n[myapp.cache.default]\nbackend = dogpile.cache.memory\n",
    )

    cachedecor.configure_regions(path, prefix="myapp.cache.")

    assert region_settings("default").backend == MEMORY


def test_environment_variable_names_the_ini_file_used_by_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, _ = api_example(tmp_path)
    monkeypatch.setenv(ENV_VAR, str(path))

    regions = cachedecor.configure_regions(None)

    assert sorted(regions) == ["default", "users"]
    assert region_settings("users").expiration_time == 60


def test_none_without_the_environment_variable_is_one_memory_region() -> None:
    assert ENV_VAR not in os.environ

    regions = cachedecor.configure_regions()

    assert list(regions) == ["default"]
    assert region_settings("default").backend == MEMORY
    assert isinstance(regions["default"].actual_backend, MemoryBackend)


def test_ini_sections_and_flat_keys_are_the_same_settings(tmp_path: Path) -> None:
    port = free_port()
    path = write(
        tmp_path,
        f"""\
[cachedecor]
regions = mc, mem
secret = k

[cachedecor.mc]
backend = dogpile.cache.pymemcache
expiration_time = 90
compress_threshold = 10
compress_level = 3
compression = zstd
namespace = app.v2
lease_timeout = 7
lease_wait = 0.25
max_entry_size = 5000
arguments.url = 127.0.0.1:{port}
arguments.connect_timeout = 0.3
arguments.timeout = 0.4
arguments.no_delay = false
arguments.distributed_lock = yes
arguments.lock_timeout = 3

[cachedecor.mem]
backend = dogpile.cache.memory
expiration_time = 0
secret = own
""",
    )
    settings = {
        "cachedecor.regions": "mc, mem",
        "cachedecor.secret": "k",
        "cachedecor.mc.backend": "dogpile.cache.pymemcache",
        "cachedecor.mc.expiration_time": "90",
        "cachedecor.mc.compress_threshold": "10",
        "cachedecor.mc.compress_level": "3",
        "cachedecor.mc.compression": "zstd",
        "cachedecor.mc.namespace": "app.v2",
        "cachedecor.mc.lease_timeout": "7",
        "cachedecor.mc.lease_wait": "0.25",
        "cachedecor.mc.max_entry_size": "5000",
        "cachedecor.mc.arguments.url": f"127.0.0.1:{port}",
        "cachedecor.mc.arguments.connect_timeout": "0.3",
        "cachedecor.mc.arguments.timeout": "0.4",
        "cachedecor.mc.arguments.no_delay": "false",
        "cachedecor.mc.arguments.distributed_lock": "yes",
        "cachedecor.mc.arguments.lock_timeout": "3",
        "cachedecor.mem.backend": "dogpile.cache.memory",
        "cachedecor.mem.expiration_time": "0",
        "cachedecor.mem.secret": "own",
    }

    cachedecor.configure_regions(path)
    from_ini = {name: described(region_settings(name)) for name in ("mc", "mem")}
    cachedecor.reset()
    cachedecor.configure_regions(settings)
    from_flat = {name: described(region_settings(name)) for name in ("mc", "mem")}

    assert from_ini == from_flat
    assert from_ini["mc"]["namespace"] == "app.v2"  # the settings were really read


def test_ini_default_section_does_not_leak_into_cachedecor_sections(tmp_path: Path) -> None:
    # Paste-deploy files commonly carry a [DEFAULT] section for the application.
    path = write(
        tmp_path,
        "[DEFAULT]\ndebug = false\n\n"
        "[cachedecor]\nregions = default\n\n[cachedecor.default]\nbackend = dogpile.cache.memory\n",
    )

    assert list(cachedecor.configure_regions(path)) == ["default"]


# --------------------------------------------------------------------------------------
# coercion and memcached arguments


def test_ini_strings_are_coerced_to_their_types() -> None:
    cachedecor.configure_regions(
        {
            "cachedecor.regions": "r",
            "cachedecor.r.backend": "cachedecor.pymemcache",
            "cachedecor.r.expiration_time": " 300 ",
            "cachedecor.r.lease_wait": "0.5",
            "cachedecor.r.compress_threshold": "2048",
            "cachedecor.r.arguments.url": "127.0.0.1:11298 ,127.0.0.1:11299",
            "cachedecor.r.arguments.timeout": "1.5",
            "cachedecor.r.arguments.no_delay": "off",
            "cachedecor.r.arguments.lock_timeout": "9",
        }
    )

    settings = region_settings("r")
    assert settings.expiration_time == 300
    assert settings.lease_wait == 0.5
    assert settings.codec.compress_threshold == 2048
    assert settings.arguments == {
        "url": ["127.0.0.1:11298", "127.0.0.1:11299"],
        "timeout": 1.5,
        "no_delay": False,
        "lock_timeout": 9,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("yes", True),
        ("on", True),
        ("1", True),
        (" TRUE ", True),
        ("false", False),
        ("no", False),
        ("off", False),
        ("0", False),
        ("False", False),
    ],
)
def test_bool_words_are_coerced(text: str, expected: bool) -> None:
    cachedecor.configure_regions(memcached(no_delay=text))

    assert region_settings("r").arguments["no_delay"] is expected


def test_url_list_in_a_dict_is_kept_as_a_list() -> None:
    cachedecor.configure_regions(memcached(url=["127.0.0.1:11298", " 127.0.0.1:11299"]))

    assert region_settings("r").arguments["url"] == ["127.0.0.1:11298", "127.0.0.1:11299"]


def test_zero_expiration_time_means_entries_never_expire() -> None:
    cachedecor.configure_regions(flat(expiration_time="0"))

    assert region_settings("r").expiration_time == 0
    assert region_settings("r").region.expiration_time is None


def test_dogpile_pymemcache_backend_is_served_by_cachedecor_pymemcache() -> None:
    config = memcached()
    config["regions"]["r"]["backend"] = "dogpile.cache.pymemcache"

    cachedecor.configure_regions(config)

    assert region_settings("r").backend == "cachedecor.pymemcache"
    assert isinstance(region_settings("r").region.actual_backend, PyMemcacheBackend)


@pytest.mark.parametrize("backend", ["dogpile.cache.pymemcache", "cachedecor.pymemcache"])
def test_connect_timeout_timeout_and_no_delay_reach_every_pymemcache_client(backend: str) -> None:
    cachedecor.configure_regions(
        {
            "cachedecor.regions": "r",
            "cachedecor.r.backend": backend,
            "cachedecor.r.arguments.url": f"127.0.0.1:{free_port()}, 127.0.0.1:{free_port()}",
            "cachedecor.r.arguments.connect_timeout": "0.2",
            "cachedecor.r.arguments.timeout": "0.3",
            "cachedecor.r.arguments.no_delay": "false",
        }
    )

    assert client_options("r") == [(0.2, 0.3, False), (0.2, 0.3, False)]


def test_memcached_region_without_timeouts_still_has_finite_ones() -> None:
    cachedecor.configure_regions(memcached())

    [(connect_timeout, timeout, _)] = client_options("r")
    assert connect_timeout is not None and 0 < connect_timeout < 10
    assert timeout is not None and 0 < timeout < 10


# --------------------------------------------------------------------------------------
# bad configuration fails at configure time, naming the region and the option


def redis(**arguments: Any) -> dict[str, Any]:
    return {
        "regions": {
            "r": {
                "backend": "dogpile.cache.redis",
                "arguments": {"url": "redis://127.0.0.1:1/0", **arguments},
            }
        }
    }


BAD_CONFIGS = [
    pytest.param(
        {"regions": {"r": {"backend": "no.such.backend"}}},
        ["cachedecor.r.backend", "no.such.backend"],
        id="unknown-backend",
    ),
    pytest.param(memory(colour="red"), ["cachedecor.r.colour", "unknown option"], id="unknown-region-option"),
    pytest.param(flat(expiry="60"), ["cachedecor.r.expiry", "unknown option"], id="unknown-flat-option"),
    pytest.param(memcached(bogus="1"), ["cachedecor.r.arguments.bogus"], id="unknown-memcached-argument"),
    pytest.param(
        redis(bogus="1"), ["cachedecor.r.arguments.bogus", "dogpile.cache.redis"], id="unknown-redis-argument"
    ),
    pytest.param(
        memory(arguments={"url": "x"}), ["cachedecor.r.arguments.url", MEMORY], id="unknown-memory-argument"
    ),
    pytest.param(
        flat(expiration_time="soon"), ["cachedecor.r.expiration_time", "soon"], id="non-numeric-expiry"
    ),
    pytest.param(
        flat(expiration_time="1.5"), ["cachedecor.r.expiration_time", "1.5"], id="fractional-expiry"
    ),
    pytest.param(flat(expiration_time="-1"), ["cachedecor.r.expiration_time", "-1"], id="negative-expiry"),
    pytest.param(
        flat(compress_threshold="-5"),
        ["cachedecor.r.compress_threshold", "-5"],
        id="negative-compress-threshold",
    ),
    pytest.param(
        flat(compress_level="10"), ["cachedecor.r", "compress_level", "10"], id="compress-level-too-high"
    ),
    pytest.param(
        flat(compress_level="max"), ["cachedecor.r.compress_level", "max"], id="compress-level-not-int"
    ),
    pytest.param(flat(compression="lz4"), ["cachedecor.r", "compression", "lz4"], id="unknown-compression"),
    pytest.param(flat(serializer="pickle"), ["cachedecor.r.serializer", "pickle"], id="unknown-serializer"),
    pytest.param(flat(lease_wait="nan"), ["cachedecor.r.lease_wait", "nan"], id="non-finite-number"),
    pytest.param(memcached(no_delay="maybe"), ["cachedecor.r.arguments.no_delay", "maybe"], id="bad-bool"),
    pytest.param(
        memcached(timeout="slow"), ["cachedecor.r.arguments.timeout", "slow"], id="non-numeric-timeout"
    ),
    pytest.param(
        memcached(connect_timeout=0), ["cachedecor.r.arguments.connect_timeout"], id="zero-connect-timeout"
    ),
    pytest.param(
        memcached(url="127.0.0.1"), ["cachedecor.r.arguments.url", "127.0.0.1"], id="url-without-port"
    ),
    pytest.param(
        memcached(url="localhost:http"), ["cachedecor.r.arguments.url", "localhost:http"], id="url-bad-port"
    ),
    pytest.param(memcached(url="a:1,,b:2"), ["cachedecor.r.arguments.url"], id="url-empty-item"),
    pytest.param(
        {"regions": {"r": {"expiration_time": 60}}}, ["cachedecor.r.backend", "missing"], id="no-backend"
    ),
    pytest.param(
        {"regions": {"r": {"backend": "cachedecor.pymemcache"}}},
        ["cachedecor.r.arguments.url", "missing"],
        id="memcached-without-url",
    ),
    pytest.param(
        {"regions": {"r": {"backend": "dogpile.cache.pymemcache"}}},
        ["cachedecor.r.arguments.url", "missing"],
        id="dogpile-memcached-without-url",
    ),
    pytest.param(
        {"cachedecor.regions": "r, s", "cachedecor.r.backend": MEMORY},
        ["'s'", "cachedecor.regions", "not defined"],
        id="listed-not-defined",
    ),
    pytest.param(
        {"cachedecor.regions": "r", "cachedecor.r.backend": MEMORY, "cachedecor.s.backend": MEMORY},
        ["'s'", "cachedecor.regions", "not listed"],
        id="defined-not-listed",
    ),
    pytest.param(memory(namespace="my app"), ["cachedecor.r.namespace", "my app"], id="namespace-with-space"),
    pytest.param(memory(namespace="a:b"), ["cachedecor.r.namespace", "a:b"], id="namespace-with-colon"),
    pytest.param(memory(namespace=""), ["cachedecor.r.namespace"], id="empty-namespace"),
    pytest.param(memory(secret=""), ["cachedecor.r.secret", "empty"], id="empty-region-secret"),
    pytest.param({**memory(), "secret": "  "}, ["cachedecor.secret", "empty"], id="empty-global-secret"),
    pytest.param({**memory(), "region": {}}, ["'region'"], id="unknown-top-level-option"),
    pytest.param(
        memcached(tls_context="yes"),
        ["cachedecor.r.arguments.tls_context", "object"],
        id="object-argument-as-string",
    ),
    pytest.param(
        memory(arguments={"cache_dict": "{}"}),
        ["cachedecor.r.arguments.cache_dict"],
        id="object-argument-memory",
    ),
    pytest.param({"regions": {"my region": {"backend": MEMORY}}}, ["'my region'"], id="bad-region-name"),
    pytest.param({"regions": {5: {"backend": MEMORY}}}, ["5", "region name"], id="non-string-region-name"),
    pytest.param({"regions": {"r": "dogpile.cache.memory"}}, ["'r'", "dict"], id="region-options-not-a-dict"),
    pytest.param({"unrelated.key": "1"}, ["no regions"], id="no-regions-at-all"),
    pytest.param(["cachedecor.regions"], ["list"], id="source-of-wrong-type"),
]


@pytest.mark.parametrize(("source", "fragments"), BAD_CONFIGS)
def test_bad_configuration_is_a_config_error_naming_the_option(source: Any, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(source)

    for fragment in fragments:
        assert fragment in str(raised.value)


def test_config_error_is_a_cache_error_and_a_value_error() -> None:
    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(flat(expiration_time="soon"))

    assert isinstance(raised.value, CacheError)
    assert isinstance(raised.value, ValueError)


# --------------------------------------------------------------------------------------
# INI files that cannot be used


def test_missing_ini_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.ini"

    with pytest.raises(ConfigError, match="does not exist") as raised:
        cachedecor.configure_regions(path)

    assert str(path) in str(raised.value)


def test_missing_ini_file_named_by_the_environment_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "absent.ini"
    monkeypatch.setenv(ENV_VAR, str(path))

    with pytest.raises(ConfigError, match="does not exist") as raised:
        cachedecor.configure_regions()

    assert str(path) in str(raised.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_unreadable_ini_file_is_a_config_error(tmp_path: Path) -> None:
    path, _, _ = api_example(tmp_path)
    path.chmod(0)

    with pytest.raises(ConfigError, match="cannot be read") as raised:
        cachedecor.configure_regions(path)

    assert str(path) in str(raised.value)


def test_directory_given_as_ini_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read") as raised:
        cachedecor.configure_regions(tmp_path)

    assert str(tmp_path) in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("regions = default\n", id="option-before-any-section"),
        pytest.param("[cachedecor\nregions = default\n", id="unclosed-section-header"),
        pytest.param("[cachedecor]\nregions = a\nregions = b\n", id="duplicate-option"),
        pytest.param("[cachedecor]\n[cachedecor]\n", id="duplicate-section"),
        pytest.param("[cachedecor]\nthis line has no separator\n", id="line-without-equals"),
    ],
)
def test_malformed_ini_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError, match="not valid INI") as raised:
        cachedecor.configure_regions(path)

    assert str(path) in str(raised.value)


def test_ini_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.ini"
    path.write_bytes("[cachedecor]\nsecret = caf\xe9\n".encode("latin-1"))

    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(path)

    assert str(path) in str(raised.value)


def test_ini_file_without_a_cachedecor_section_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[app:main]\nuse = egg:myapp\n")

    with pytest.raises(ConfigError, match=r"no \[cachedecor\]") as raised:
        cachedecor.configure_regions(path)

    assert str(path) in str(raised.value)


# --------------------------------------------------------------------------------------
# reconfiguring, failing and forgetting


def test_failed_configure_leaves_configured_regions_unchanged() -> None:
    cachedecor.configure_regions({"regions": {"a": {"backend": MEMORY}, "b": {"backend": MEMORY}}})
    before = {name: region_settings(name) for name in ("a", "b")}

    with pytest.raises(ConfigError):
        cachedecor.configure_regions(
            {
                "regions": {
                    "a": {"backend": MEMORY, "expiration_time": 5},  # valid, but the whole source is not
                    "c": {"backend": MEMORY, "expiration_time": "soon"},
                }
            }
        )

    assert {name: region_settings(name) for name in ("a", "b")} == before
    assert all(region_settings(name) is before[name] for name in ("a", "b"))
    with pytest.raises(RegionNotConfigured):
        cachedecor.get_region("c")


def test_configuring_again_replaces_named_regions_and_keeps_the_others() -> None:
    cachedecor.configure_regions({"regions": {"a": {"backend": MEMORY}, "b": {"backend": MEMORY}}})
    kept = region_settings("b")
    old_a = cachedecor.get_region("a")

    regions = cachedecor.configure_regions({"regions": {"a": {"backend": MEMORY, "expiration_time": 7}}})

    assert cachedecor.get_region("a") is not old_a
    assert region_settings("a").expiration_time == 7
    assert region_settings("b") is kept
    assert sorted(regions) == ["a", "b"]


def test_configure_returns_every_region_configured_so_far() -> None:
    cachedecor.configure_regions(memory())
    regions = cachedecor.configure_regions({"regions": {"s": {"backend": MEMORY}}})

    assert sorted(regions) == ["r", "s"]
    assert regions["r"] is cachedecor.get_region("r")
    assert regions["s"] is cachedecor.get_region("s")


def test_reconfigured_region_takes_the_new_settings() -> None:
    cachedecor.configure_regions(flat(expiration_time="10"))

    cachedecor.configure_regions(flat(expiration_time="20"))

    assert region_settings("r").expiration_time == 20


def test_get_region_without_a_name_is_the_default_region() -> None:
    regions = cachedecor.configure_regions()

    assert cachedecor.get_region() is regions["default"]


def test_unconfigured_region_raises_region_not_configured_saying_how_to_configure_it() -> None:
    cachedecor.configure_regions(memory())

    with pytest.raises(RegionNotConfigured) as raised:
        cachedecor.get_region("reports")

    assert isinstance(raised.value, CacheError)
    assert isinstance(raised.value, LookupError)
    assert "'reports'" in str(raised.value)
    assert "configure_regions" in str(raised.value)
    assert raised.value.name == "reports"


def test_reset_forgets_every_region() -> None:
    cachedecor.configure_regions(memory())

    cachedecor.reset()

    with pytest.raises(RegionNotConfigured):
        cachedecor.get_region("r")


# --------------------------------------------------------------------------------------
# dogpile's own region API on configured regions


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


def test_dogpile_set_and_get_work_on_a_memory_region() -> None:
    region = cachedecor.configure_regions(memory())["r"]

    region.set("a point", Point(1, 2))
    value = region.get("a point")

    assert isinstance(value, Point)
    assert (value.x, value.y) == (1, 2)


def test_dogpile_cache_on_arguments_with_spaces_in_arguments_works_on_memcached(memcached: Memcached) -> None:
    region = cachedecor.configure_regions(
        {"regions": {"r": {"backend": "cachedecor.pymemcache", "arguments": {"url": memcached.url}}}}
    )["r"]
    calls: list[str] = []

    @region.cache_on_arguments()
    def shout(text: str) -> str:
        calls.append(text)
        return text.upper()

    assert shout("two words") == "TWO WORDS"
    assert shout("two words") == "TWO WORDS"
    assert shout("two  words") == "TWO  WORDS"
    assert calls == ["two words", "two  words"]


def test_dogpile_retry_timeout_is_the_dead_timeout() -> None:
    cachedecor.configure_regions(
        {
            "regions": {
                "r": {
                    "backend": "dogpile.cache.pymemcache",
                    "arguments": {"url": "h:1", "hashclient_retry_timeout": "7"},
                }
            }
        }
    )
    assert region_settings("r").store.backend.health.dead_timeout == 7.0  # type: ignore[attr-defined]


def test_a_serde_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"cachedecor\.r\.arguments\.serde: not accepted.*never unpickles"):
        cachedecor.configure_regions(
            {
                "regions": {
                    "r": {"backend": "dogpile.cache.pymemcache", "arguments": {"url": "h:1", "serde": "x"}}
                }
            }
        )


# --------------------------------------------------------------------------------------
# memcached servers in arguments.url


@pytest.mark.parametrize(
    ("server", "fragments"),
    [
        pytest.param(
            "memcache://127.0.0.1:41211",
            ["is a URL", "write host:port: '127.0.0.1:41211'"],
            id="memcache-scheme",
        ),
        pytest.param("memcached://cache:11211/", ["is a URL", "'cache:11211'"], id="memcached-scheme"),
        pytest.param("a:b:41211", ["'a:b' is not a host name", "host:port"], id="two-colons"),
        pytest.param(
            "::1:11211", ["IPv6 address goes in brackets", "[::1]:11211"], id="ipv6-without-brackets"
        ),
        pytest.param("[::1]", ["has no port", "[::1]:11211"], id="ipv6-without-port"),
        pytest.param("[nope]:11211", ["'nope' is not an IPv6 address"], id="bracketed-non-ipv6"),
        pytest.param("unix:/run/mc.sock", ["Unix socket", "'/run/mc.sock'"], id="unix-scheme"),
        pytest.param("cache", ["has no port", "cache:11211"], id="no-port"),
        pytest.param("cache:0", ["port", "1 to 65535"], id="port-zero"),
        pytest.param("cache:65536", ["port", "1 to 65535"], id="port-too-large"),
        pytest.param("cache:", ["port", "1 to 65535"], id="empty-port"),
        pytest.param(":11211", ["'' is not a host name"], id="empty-host"),
        pytest.param("cache server:11211", ["'cache server' is not a host name"], id="space-in-host"),
        pytest.param("300.0.0.1:11211", ["'300.0.0.1' is not an IPv4 address"], id="bad-ipv4"),
    ],
)
def test_a_server_that_is_not_host_port_is_refused_saying_what_to_write(
    server: str, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(memcached(url=f"127.0.0.1:11211, {server}"))

    assert str(raised.value).startswith(f"cachedecor.r.arguments.url: {server!r}")
    for fragment in fragments:
        assert fragment in str(raised.value)


@pytest.mark.parametrize(
    "server",
    [
        "127.0.0.1:11211",
        "cache-1.internal.example:11211",
        "my_host:1",
        "[::1]:11211",
        "[fe80::1%eth0]:11211",
        "/run/mc.sock",
    ],
)
def test_host_port_ipv6_in_brackets_and_unix_sockets_are_accepted(server: str) -> None:
    cachedecor.configure_regions(memcached(url=server))

    assert region_settings("r").arguments["url"] == [server]


def _connectable(family: int, address: Any) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


@contextmanager
def memcached_listening(family: int, address: Any, *listen: str) -> Iterator[None]:
    """A memcached process started with ``listen`` options, running once ``address`` accepts."""
    binary = memcached_binary()
    if binary is None:
        unavailable("memcached is not installed (make test installs it)")
    assert binary is not None
    command = [
        binary,
        *listen,
        "-U",
        "0",
        "-t",
        "1",
        "-m",
        "8",
        *(["-u", "root"] if os.geteuid() == 0 else []),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _connectable(family, address):
            assert process.poll() is None, f"memcached exited: {command}"
            assert time.monotonic() < deadline, f"memcached does not accept connections: {command}"
            time.sleep(0.01)
        yield
    finally:
        process.kill()
        process.wait()


def _free_ipv6_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError as exc:
            unavailable(f"no IPv6 loopback: {exc}")
        return int(sock.getsockname()[1])


def test_a_region_on_an_ipv6_server_stores_there() -> None:
    port = _free_ipv6_port()
    with memcached_listening(socket.AF_INET6, ("::1", port), "-l", "::1", "-p", str(port)):
        region = cachedecor.configure_regions(memcached(url=f"[::1]:{port}"))["r"]

        region.set("ipv6 key", "stored")

        assert region.get("ipv6 key") == "stored"
        raw = Client(("::1", port))
        assert raw.get(region.key_mangler("ipv6 key")) is not None  # type: ignore[misc]
        raw.close()


def test_a_region_on_a_unix_socket_stores_there(tmp_path: Path) -> None:
    path = str(tmp_path / "memcached.sock")
    with memcached_listening(socket.AF_UNIX, path, "-s", path):
        region = cachedecor.configure_regions(memcached(url=path))["r"]

        region.set("unix key", "stored")

        assert region.get("unix key") == "stored"
        raw = Client(path)
        assert raw.get(region.key_mangler("unix key")) is not None  # type: ignore[misc]
        raw.close()


# --------------------------------------------------------------------------------------
# every numeric option has a valid range, checked at configure time


def test_every_numeric_argument_of_every_backend_has_a_range() -> None:
    numeric = {
        (backend, arg)
        for backend, schema in BACKEND_ARGUMENTS.items()
        for arg, kind in schema.items()
        if kind in (int, float)
    }

    assert numeric == {(backend, arg) for backend, ranges in ARGUMENT_RANGES.items() for arg in ranges}


def test_every_numeric_region_option_has_a_range() -> None:
    numeric = {option for option, (kind, _) in REGION_OPTIONS.items() if kind in (int, float)}

    assert numeric - set(REGION_RANGES) == {"compress_level"}  # its range depends on the algorithm
    assert set(REGION_RANGES) <= numeric


def test_memcached_defaults_are_in_range() -> None:
    ranges = ARGUMENT_RANGES["cachedecor.pymemcache"]
    for arg, value in MEMCACHED_DEFAULTS.items():
        if arg in ranges:
            ranges[arg].check(value, arg)


def _edges(kind: type, low: float, exclusive: bool, high: float | None) -> tuple[list[Any], list[Any]]:
    """(values just inside the range, values just outside)."""
    step = 1 if kind is int else 0.001
    first = low + step if exclusive else low
    inside = [kind(first)] + ([kind(high)] if high is not None else [])
    outside = [kind(low if exclusive else low - step)] + ([kind(high + step)] if high is not None else [])
    return inside, outside


RANGED_ARGUMENTS = [
    pytest.param(backend, arg, id=f"{backend}-{arg}")
    for backend, ranges in ARGUMENT_RANGES.items()
    for arg in ranges
]


@pytest.mark.parametrize(("backend", "arg"), RANGED_ARGUMENTS)
def test_a_numeric_argument_takes_its_range_and_nothing_outside(backend: str, arg: str) -> None:
    valid = ARGUMENT_RANGES[backend][arg]
    inside, outside = _edges(BACKEND_ARGUMENTS[backend][arg], valid.low, valid.exclusive, valid.high)

    for value in inside:
        assert check_arguments("r", backend, {arg: str(value)})[arg] == value
    for value in outside:
        with pytest.raises(ConfigError) as raised:
            check_arguments("r", backend, {arg: str(value)})
        assert str(raised.value).startswith(f"cachedecor.r.arguments.{arg}: must be {valid.expected()}, got ")


@pytest.mark.parametrize("option", sorted(REGION_RANGES))
def test_a_numeric_region_option_takes_its_range_and_nothing_outside(option: str) -> None:
    valid = REGION_RANGES[option]
    inside, outside = _edges(REGION_OPTIONS[option][0], valid.low, valid.exclusive, valid.high)

    for value in inside:
        cachedecor.configure_regions(flat(**{option: str(value)}))
    for value in outside:
        with pytest.raises(ConfigError, match=rf"^cachedecor\.r\.{option}: must be .*, got "):
            cachedecor.configure_regions(flat(**{option: str(value)}))


@pytest.mark.parametrize(
    ("arg", "value", "fragments"),
    [
        pytest.param(
            "invalidation_retry_interval",
            "0",
            ["at least 0.01 seconds", "spin", "got 0"],
            id="retry-interval-zero",
        ),
        pytest.param(
            "invalidation_retry_for", "-1", ["more than 0 seconds", "got -1"], id="retry-for-negative"
        ),
        pytest.param("max_pending_invalidations", "0", ["1 or more", "got 0"], id="max-pending-zero"),
        pytest.param(
            "memcached_expire_time", "-5", ["between 0 and 2592000 seconds", "got -5"], id="expire-negative"
        ),
        pytest.param("memcached_expire_time", "2592001", ["absolute Unix time"], id="expire-over-30-days"),
        pytest.param(
            "lock_timeout", "-1", ["between 0 and 2592000 seconds", "got -1"], id="lock-timeout-negative"
        ),
        pytest.param("hashclient_retry_timeout", "-1", ["0 or more seconds"], id="retry-timeout-negative"),
        pytest.param("hashclient_retry_attempts", "-1", ["0 or more"], id="retry-attempts-negative"),
    ],
)
def test_out_of_range_memcached_arguments_in_an_ini_file_fail_at_configure_time(
    tmp_path: Path, arg: str, value: str, fragments: list[str]
) -> None:
    path = write(
        tmp_path,
        "[cachedecor]\nregions = default\n\n[cachedecor.default]\nbackend = dogpile.cache.pymemcache\n"
        f"arguments.url = 127.0.0.1:41211\narguments.{arg} = {value}\n",
    )

    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(path)

    assert str(raised.value).startswith(f"cachedecor.default.arguments.{arg}: must be ")
    for fragment in fragments:
        assert fragment in str(raised.value)
    with pytest.raises(RegionNotConfigured):
        cachedecor.get_region("default")


@pytest.mark.parametrize(
    ("arg", "value", "fragment"),
    [
        pytest.param("port", "0", "between 1 and 65535", id="port"),
        pytest.param("db", "-1", "0 or more", id="db"),
        pytest.param("socket_timeout", "0", "more than 0 seconds", id="socket-timeout"),
        pytest.param("lock_sleep", "0", "busy loop", id="lock-sleep"),
        pytest.param("redis_expiration_time", "-1", "0 or more seconds", id="expiration"),
    ],
)
def test_out_of_range_redis_arguments_fail_at_configure_time(arg: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=rf"^cachedecor\.r\.arguments\.{arg}: must be .*{fragment}"):
        cachedecor.configure_regions(redis(**{arg: value}))


# --------------------------------------------------------------------------------------
# "did you mean": misspelled regions, options, arguments, backends


def test_a_misspelled_ini_section_says_did_you_mean_and_what_is_missing(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[cachedecor]\nregions = default\n\n[cachedecor.defualt]\nbackend = dogpile.cache.memory\n",
    )

    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(path)

    assert str(raised.value) == (
        "section [cachedecor.defualt] configures region 'defualt', which cachedecor.regions does not "
        "list (default): did you mean 'default'? Region 'default' is listed but not defined"
    )


def test_a_misspelled_region_in_a_flat_dict_says_did_you_mean() -> None:
    settings = {
        "cachedecor.regions": "default, users",
        "cachedecor.default.backend": MEMORY,
        "cachedecor.user.backend": MEMORY,
    }

    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(settings)

    assert "cachedecor.user.* configures region 'user'" in str(raised.value)
    assert "did you mean 'users'?" in str(raised.value)
    assert "Region 'users' is listed but not defined" in str(raised.value)


def test_a_listed_region_with_nothing_close_defined_says_what_to_add(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[cachedecor]\nregions = default, reports\n\n[cachedecor.default]\nbackend = dogpile.cache.memory\n",
    )

    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(path)

    assert str(raised.value) == (
        "region 'reports' is listed in cachedecor.regions but not defined: add a [cachedecor.reports] "
        "section (defined: default)"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        pytest.param(
            memory(expiraton_time=5),
            "cachedecor.r.expiraton_time: unknown option; did you mean 'expiration_time'?",
            id="region-option",
        ),
        pytest.param(
            {"cachedecor.r.backend": "dogpile.cache.pymemcache", "cachedecor.r.argument.url": "h:1"},
            "cachedecor.r.argument.url: unknown option; did you mean 'arguments.url'?",
            id="arguments-prefix",
        ),
        pytest.param(
            memcached(conect_timeout="1"),
            "cachedecor.r.arguments.conect_timeout: unknown argument for backend cachedecor.pymemcache; "
            "did you mean 'connect_timeout'?",
            id="memcached-argument",
        ),
        pytest.param(
            redis(socket_timout="1"),
            "cachedecor.r.arguments.socket_timout: unknown argument for backend dogpile.cache.redis; "
            "did you mean 'socket_timeout'?",
            id="redis-argument",
        ),
        pytest.param(
            {"regions": {"r": {"backend": "dogpile.cache.pymemcached"}}},
            "cachedecor.r.backend: unknown backend 'dogpile.cache.pymemcached'; did you mean "
            "'dogpile.cache.pymemcache'?",
            id="backend",
        ),
        pytest.param(
            {"regions": {"r": {"backend": "memory"}}},
            "cachedecor.r.backend: unknown backend 'memory'; did you mean 'dogpile.cache.memory'?",
            id="backend-short-name",
        ),
        pytest.param(
            {"cachedecor.region": "r", "cachedecor.r.backend": MEMORY},
            "unknown option 'cachedecor.region'; did you mean 'regions'?",
            id="global-option",
        ),
        pytest.param(
            {"region": {"r": {"backend": MEMORY}}},
            "no regions are configured: did you mean 'regions' (not 'region')",
            id="nested-regions-key",
        ),
        pytest.param(
            {"cachedecr.regions": "r", "cachedecr.r.backend": MEMORY},
            "no regions are configured: did you mean 'cachedecor.regions' (not 'cachedecr.regions')?",
            id="flat-prefix",
        ),
        pytest.param(
            {**memory(), "secrets": "x"},
            "unknown top-level option 'secrets'; did you mean 'secret'?",
            id="nested-top-level",
        ),
        pytest.param(
            memory(serializer="msgpak"),
            "cachedecor.r.serializer: unknown serializer 'msgpak'; did you mean 'msgpack'?",
            id="serializer",
        ),
    ],
)
def test_a_misspelled_name_says_did_you_mean(source: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(source)

    assert str(raised.value).startswith(message)


def test_a_misspelled_ini_prefix_says_did_you_mean(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[cachdecor]\nregions = default\n\n[cachdecor.default]\nbackend = dogpile.cache.memory\n"
    )

    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(path)

    assert str(raised.value).endswith("section; did you mean [cachedecor] (not [cachdecor])?")


def test_a_name_close_to_nothing_gets_no_suggestion() -> None:
    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(memory(colour="red"))

    assert "did you mean" not in str(raised.value)


# --------------------------------------------------------------------------------------
# backends cachedecor cannot use: the reason first


REFUSED = [
    pytest.param("dogpile.cache.dbm", {}, "DBM file", id="dbm-without-filename"),
    pytest.param("dogpile.cache.dbm", {"filename": "/nonexistent/dir/cache.dbm"}, "DBM file", id="dbm"),
    pytest.param("dogpile.cache.null", {"bogus": 1}, "stores nothing", id="null"),
    pytest.param("dogpile.cache.pylibmc", {"url": "127.0.0.1:11211"}, "through pylibmc", id="pylibmc"),
    pytest.param(
        "dogpile.cache.bmemcached",
        {"url": "127.0.0.1:11211"},
        "through python-binary-memcached",
        id="bmemcached",
    ),
    pytest.param(
        "dogpile.cache.memcached", {"url": "127.0.0.1:11211"}, "through python-memcached", id="memcached"
    ),
]


@pytest.mark.parametrize(("backend", "arguments", "fragment"), REFUSED)
def test_a_refused_backend_says_first_that_cachedecor_cannot_use_it_and_why(
    backend: str, arguments: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions({"regions": {"r": {"backend": backend, "arguments": arguments}}})

    message = str(raised.value)
    assert message.startswith(f"cachedecor.r.backend: cachedecor cannot use {backend!r}: ")
    assert fragment in message
    assert "no atomic add and compare-and-set" in message
    assert "leases" in message


def test_the_other_memcached_clients_point_to_pymemcache() -> None:
    with pytest.raises(
        ConfigError, match=r"use backend = dogpile\.cache\.pymemcache with the same arguments\.url"
    ):
        cachedecor.configure_regions({"regions": {"r": {"backend": "dogpile.cache.pylibmc"}}})


class NoLeases(CacheBackend):  # type: ignore[misc]
    """A third-party backend: cachedecor has no lease-safe store for it."""

    def __init__(self, arguments: dict[str, Any]) -> None:
        raise AssertionError("cachedecor must refuse the backend before creating it")


class OwnMemory(MemoryBackend):  # type: ignore[misc]
    """A third-party subclass of a backend cachedecor supports."""


dogpile.cache.register_backend("tests.no_leases", __name__, "NoLeases")  # type: ignore[no-untyped-call]
dogpile.cache.register_backend("tests.own_memory", __name__, "OwnMemory")  # type: ignore[no-untyped-call]


def test_a_third_party_backend_without_a_lease_store_is_refused_before_it_is_created() -> None:
    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(
            {"regions": {"r": {"backend": "tests.no_leases", "arguments": {"x": 1}}}}
        )

    assert str(raised.value).startswith(
        f"cachedecor.r.backend: cachedecor cannot use 'tests.no_leases' ({__name__}.NoLeases): "
        "it has no atomic add and compare-and-set"
    )


def test_a_third_party_subclass_of_a_supported_backend_is_accepted() -> None:
    region = cachedecor.configure_regions({"regions": {"r": {"backend": "tests.own_memory"}}})["r"]

    assert isinstance(region.actual_backend, OwnMemory)


def test_a_backend_whose_client_package_is_missing_names_the_package() -> None:
    import sys

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
        with pytest.raises(ConfigError) as raised:
            cachedecor.configure_regions(redis())

    assert str(raised.value).startswith(
        "cachedecor.r.backend: backend 'dogpile.cache.redis' needs the Python package 'redis'"
    )


def test_retry_attempts_counts_tries_so_zero_is_refused_with_the_range() -> None:
    config = {
        "regions": {
            "default": {
                "backend": "cachedecor.pymemcache",
                "arguments": {"url": ["127.0.0.1:11211"], "enable_retry_client": True, "retry_attempts": 0},
            }
        }
    }
    with pytest.raises(cachedecor.ConfigError, match=r"arguments\.retry_attempts: must be 1 or more"):
        cachedecor.configure_regions(config)


def test_settings_of_is_the_region_settings_or_none_and_changes_on_reconfiguration() -> None:
    assert settings_of("default") is None
    cachedecor.configure_regions({"regions": {"default": {"backend": MEMORY}}})
    first = settings_of("default")
    assert first is region_settings("default")

    cachedecor.configure_regions({"regions": {"default": {"backend": MEMORY}}})

    assert settings_of("default") is region_settings("default") is not first


def test_read_outbox_settings_reads_the_outbox_options_alone() -> None:
    source = {
        "cachedecor.outbox_url": "postgresql://u@h/db",
        "cachedecor.outbox_table": "cache.box",
        "cachedecor.r.backend": "no.such.backend",  # regions are not checked
    }

    settings = read_outbox_settings(source)

    assert settings is not None
    assert (settings.table, settings.schema, settings.interval) == ("box", "cache", 0.1)
    assert read_outbox_settings({"regions": {"r": {"backend": MEMORY}}}) is None
    assert settings_of("r") is None  # configures nothing


@pytest.mark.parametrize("table", [ARGUMENT_RANGES, BACKEND_ARGUMENTS, REGION_OPTIONS, REGION_RANGES])
def test_the_option_tables_are_read_only(table: Any) -> None:
    with pytest.raises(TypeError):
        table["x"] = None


# --------------------------------------------------------------------------------------
# every argument accepted takes effect: moved to where the client takes it, or refused


def test_connection_arguments_of_a_cluster_move_into_its_connection_kwargs() -> None:
    """dogpile's cluster backends pass only ``url`` and ``connection_kwargs`` to the client."""
    backend = "dogpile.cache.redis_cluster"
    raw = {
        "url": "redis://127.0.0.1:7000",
        "socket_timeout": "0.25",
        "socket_connect_timeout": "0.5",
        "password": "secret",
        "ssl": "true",
        "redis_expiration_time": "60",
    }

    arguments = client_arguments(backend, check_arguments("r", backend, raw), "r.arguments")

    assert arguments == {
        "url": "redis://127.0.0.1:7000",
        "redis_expiration_time": 60,
        "connection_kwargs": {
            "socket_timeout": 0.25,
            "socket_connect_timeout": 0.5,
            "password": "secret",
            "ssl": True,
        },
    }


def test_host_and_port_of_a_cluster_without_url_become_a_startup_node_in_connection_kwargs() -> None:
    arguments = client_arguments("dogpile.cache.valkey_cluster", {"host": "h", "port": 7000}, "r.arguments")

    assert arguments == {"connection_kwargs": {"host": "h", "port": 7000}}


def test_the_timeouts_of_a_sentinel_backend_reach_the_sentinels_too() -> None:
    arguments = client_arguments(
        "dogpile.cache.redis_sentinel",
        {
            "sentinels": [("h", 26379)],
            "socket_timeout": 0.25,
            "sentinel_kwargs": {"socket_connect_timeout": 1},
        },
        "r.arguments",
    )

    assert arguments["socket_timeout"] == 0.25  # dogpile gives it to the master and replicas
    assert arguments["sentinel_kwargs"] == {"socket_timeout": 0.25, "socket_connect_timeout": 1}


def region_on(backend: str, **arguments: Any) -> dict[str, Any]:
    return {"regions": {"r": {"backend": backend, "arguments": arguments}}}


CLUSTER = "dogpile.cache.redis_cluster"
SENTINEL = "dogpile.cache.redis_sentinel"
SENTINEL_URL = "redis+sentinel://127.0.0.1:26379/mymaster"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(
            region_on(CLUSTER, url="redis://127.0.0.1:1", connection_pool=object()),
            "cachedecor.r.arguments.connection_pool: would have no effect on dogpile.cache.redis_cluster",
            id="cluster-connection-pool",
        ),
        pytest.param(
            region_on(CLUSTER, url="redis://127.0.0.1:1", host="127.0.0.1"),
            "cachedecor.r.arguments.host: would have no effect beside cachedecor.r.arguments.url",
            id="cluster-host-beside-url",
        ),
        pytest.param(
            region_on(CLUSTER, url="redis://127.0.0.1:1", db=1),
            "cachedecor.r.arguments.db: a cluster has only database 0",
            id="cluster-db",
        ),
        pytest.param(
            region_on(
                CLUSTER,
                url="redis://127.0.0.1:1",
                socket_timeout=0.25,
                connection_kwargs={"socket_timeout": 1},
            ),
            "cachedecor.r.arguments.socket_timeout: given twice, 0.25 here and 1 in "
            "cachedecor.r.arguments.connection_kwargs",
            id="cluster-timeout-twice",
        ),
        pytest.param(
            region_on("dogpile.cache.redis", url="redis://127.0.0.1:1", db=3),
            "cachedecor.r.arguments.db: would have no effect beside cachedecor.r.arguments.url",
            id="redis-db-beside-url",
        ),
        pytest.param(
            region_on(SENTINEL, url=SENTINEL_URL, host="127.0.0.1"),
            "cachedecor.r.arguments.host: would have no effect on dogpile.cache.redis_sentinel",
            id="sentinel-host",
        ),
        pytest.param(
            region_on(SENTINEL, db=0),
            "cachedecor.r.arguments.url: missing: dogpile.cache.redis_sentinel needs its sentinels",
            id="sentinel-without-sentinels",
        ),
        pytest.param(
            region_on(SENTINEL, url=SENTINEL_URL, service_name="other"),
            "cachedecor.r.arguments.service_name: given beside cachedecor.r.arguments.url",
            id="sentinel-service-twice",
        ),
    ],
)
def test_an_argument_that_would_have_no_effect_is_a_config_error_naming_it(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        cachedecor.configure_regions(config)

    assert str(raised.value).startswith(message)
    assert settings_of("r") is None


# --------------------------------------------------------------------------------------
# Sentinel by URL


def sentinel_source(form: str, url: str, tmp_path: Path) -> Any:
    if form == "ini":
        return str(
            write(
                tmp_path,
                f"[cachedecor]\nregions = r\n\n[cachedecor.r]\nbackend = {SENTINEL}\n"
                f"arguments.url = {url}\narguments.socket_timeout = 0.5\n",
            )
        )
    if form == "flat":
        return {
            "cachedecor.regions": "r",
            "cachedecor.r.backend": SENTINEL,
            "cachedecor.r.arguments.url": url,
            "cachedecor.r.arguments.socket_timeout": "0.5",
        }
    return region_on(SENTINEL, url=url, socket_timeout=0.5)


@pytest.mark.parametrize("form", ["ini", "flat", "nested"])
def test_a_sentinel_url_in_each_form_configures_the_sentinels_and_the_service(
    form: str, tmp_path: Path
) -> None:
    url = "redis+sentinel://:pw@127.0.0.1:26379,[::1]:26380/cache/2"

    cachedecor.configure_regions(sentinel_source(form, url, tmp_path))

    backend = region_settings("r").region.actual_backend
    assert backend.sentinels == [("127.0.0.1", 26379), ("::1", 26380)]
    assert (backend.service_name, backend.db, backend.password) == ("cache", 2, "pw")
    assert backend.sentinel_kwargs["socket_timeout"] == 0.5


def test_a_valkey_sentinel_url_has_its_own_scheme() -> None:
    arguments = client_arguments(
        "dogpile.cache.valkey_sentinel", {"url": "valkey+sentinel://h:26379/m"}, "r.arguments"
    )

    assert (arguments["sentinels"], arguments["service_name"]) == ([("h", 26379)], "m")
    assert "db" not in arguments


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("redis://127.0.0.1:26379/mymaster", id="not-sentinel-scheme"),
        pytest.param("valkey+sentinel://127.0.0.1:26379/mymaster", id="other-library"),
        pytest.param("redis+sentinel://127.0.0.1/mymaster", id="no-port"),
        pytest.param("redis+sentinel://127.0.0.1:99999/mymaster", id="port-out-of-range"),
        pytest.param("redis+sentinel://127.0.0.1:26379", id="no-service"),
        pytest.param("redis+sentinel://127.0.0.1:26379/", id="empty-service"),
        pytest.param("redis+sentinel://127.0.0.1:26379/mymaster/zero", id="db-not-a-number"),
        pytest.param("redis+sentinel://127.0.0.1:26379/mymaster/0/x", id="too-deep"),
        pytest.param("redis+sentinel://127.0.0.1:26379/mymaster?db=1", id="query"),
        pytest.param("redis+sentinel://127.0.0.1:26379,/mymaster", id="empty-sentinel"),
    ],
)
def test_a_malformed_sentinel_url_is_a_config_error_naming_arguments_url(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^cachedecor\.r\.arguments\.url: "):
        cachedecor.configure_regions(region_on(SENTINEL, url=url))

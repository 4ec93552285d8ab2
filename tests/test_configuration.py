"""configure_regions(): every source form, coercion, and every mistake caught up front."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import cachedecor
from cachedecor import ConfigError, RegionNotConfigured
from cachedecor.config import region_settings

API_INI = """
[cachedecor]
regions = default, users
; optional, signs every entry with HMAC (see Security)
secret = change-me

[cachedecor.default]
backend = dogpile.cache.pymemcache
expiration_time = 300
arguments.url = 127.0.0.1:11211
compress_threshold = 1024
compress_level = 6

[cachedecor.users]
backend = dogpile.cache.pymemcache
expiration_time = 60
arguments.url = 127.0.0.1:11211, 127.0.0.1:11212
arguments.connect_timeout = 0.2
arguments.timeout = 0.2
"""

FLAT = {
    "cachedecor.regions": "default, users",
    "cachedecor.secret": "change-me",
    "cachedecor.default.backend": "dogpile.cache.pymemcache",
    "cachedecor.default.expiration_time": "300",
    "cachedecor.default.arguments.url": "127.0.0.1:11211",
    "cachedecor.default.compress_threshold": "1024",
    "cachedecor.default.compress_level": "6",
    "cachedecor.users.backend": "dogpile.cache.pymemcache",
    "cachedecor.users.expiration_time": "60",
    "cachedecor.users.arguments.url": "127.0.0.1:11211, 127.0.0.1:11212",
    "cachedecor.users.arguments.connect_timeout": "0.2",
    "cachedecor.users.arguments.timeout": "0.2",
    "unrelated.setting": "ignored",
}


def write(tmp_path: Path, text: str, name: str = "cache.ini") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def summary(name: str) -> tuple[Any, ...]:
    s = region_settings(name)
    return (s.backend, s.expiration_time, dict(s.arguments), s.codec, s.namespace, s.lease_timeout)


class TestSources:
    def test_the_api_example_ini_file(self, tmp_path: Path) -> None:
        regions = cachedecor.configure_regions(write(tmp_path, API_INI))
        assert sorted(regions) == ["default", "users"]
        users = region_settings("users")
        assert users.backend == "cachedecor.pymemcache"
        assert users.expiration_time == 60
        assert users.arguments["url"] == ["127.0.0.1:11211", "127.0.0.1:11212"]
        assert users.arguments["timeout"] == 0.2
        assert region_settings("default").codec.compress_level == 6
        assert region_settings("default").codec.secret == b"change-me"

    def test_ini_sections_and_flat_keys_are_the_same_settings(self, tmp_path: Path) -> None:
        cachedecor.configure_regions(write(tmp_path, API_INI))
        from_ini = {name: summary(name) for name in ("default", "users")}
        cachedecor.reset()
        cachedecor.configure_regions(FLAT)
        assert {name: summary(name) for name in ("default", "users")} == from_ini

    def test_nested_dict_with_typed_values(self) -> None:
        cachedecor.configure_regions(
            {
                "regions": {
                    "default": {
                        "backend": "cachedecor.pymemcache",
                        "expiration_time": 300,
                        "arguments": {"url": ["127.0.0.1:11211"], "timeout": 0.3},
                        "compress_threshold": 2048,
                    }
                },
                "secret": "s",
            }
        )
        s = region_settings("default")
        assert (s.expiration_time, s.arguments["timeout"], s.codec.compress_threshold) == (300, 0.3, 2048)

    def test_flat_dict_with_a_custom_prefix(self) -> None:
        settings = {
            "myapp.cache.regions": "fast",
            "myapp.cache.fast.backend": "dogpile.cache.memory",
            "myapp.cache.fast.expiration_time": "5",
            "cachedecor.fast.backend": "not read: other prefix",
        }
        assert list(cachedecor.configure_regions(settings, prefix="myapp.cache.")) == ["fast"]
        assert region_settings("fast").expiration_time == 5

    def test_ini_with_a_custom_prefix_reads_its_own_sections(self, tmp_path: Path) -> None:
        path = write(tmp_path, "[app.cache]\nregions = r\n\n[app.cache.r]\nbackend = dogpile.cache.memory\n")
        assert list(cachedecor.configure_regions(path, prefix="app.cache")) == ["r"]

    def test_none_reads_the_file_named_by_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CACHEDECOR_CONFIG", str(write(tmp_path, API_INI)))
        assert sorted(cachedecor.configure_regions()) == ["default", "users"]

    def test_none_without_the_environment_is_one_memory_region(self) -> None:
        assert list(cachedecor.configure_regions()) == ["default"]
        assert region_settings("default").backend == "dogpile.cache.memory"

    def test_regions_may_be_omitted_when_every_defined_region_is_wanted(self) -> None:
        regions = cachedecor.configure_regions(
            {"cachedecor.a.backend": "dogpile.cache.memory", "cachedecor.b.backend": "dogpile.cache.memory"}
        )
        assert sorted(regions) == ["a", "b"]

    def test_path_like_objects_are_accepted(self, tmp_path: Path) -> None:
        assert sorted(cachedecor.configure_regions(Path(write(tmp_path, API_INI)))) == ["default", "users"]


class TestCoercion:
    @pytest.mark.parametrize(
        ("raw", "expected"), [("true", True), ("Yes", True), ("on", True), ("0", False), ("off", False)]
    )
    def test_bools_from_strings(self, raw: str, expected: bool) -> None:
        cachedecor.configure_regions(
            {
                "cachedecor.default.backend": "cachedecor.pymemcache",
                "cachedecor.default.arguments.url": "h:1",
                "cachedecor.default.arguments.no_delay": raw,
            }
        )
        assert region_settings("default").arguments["no_delay"] is expected

    def test_numbers_from_strings_with_spaces(self) -> None:
        cachedecor.configure_regions(
            {
                "cachedecor.default.backend": "dogpile.cache.memory",
                "cachedecor.default.expiration_time": " 42 ",
                "cachedecor.default.lease_wait": "0.25",
            }
        )
        assert (region_settings("default").expiration_time, region_settings("default").lease_wait) == (
            42,
            0.25,
        )

    def test_timeouts_reach_the_memcached_clients(self) -> None:
        cachedecor.configure_regions(
            {
                "cachedecor.default.backend": "dogpile.cache.pymemcache",
                "cachedecor.default.arguments.url": "127.0.0.1:11211, 127.0.0.1:11212",
                "cachedecor.default.arguments.connect_timeout": "0.2",
                "cachedecor.default.arguments.timeout": "0.3",
            }
        )
        clients = region_settings("default").store.client.clients  # type: ignore[attr-defined]
        assert sorted(clients) == ["127.0.0.1:11211", "127.0.0.1:11212"]
        for client in clients.values():
            assert (client.connect_timeout, client.timeout, client.no_delay) == (0.2, 0.3, True)

    def test_memcached_defaults_never_wait_forever(self) -> None:
        cachedecor.configure_regions(
            {
                "cachedecor.default.backend": "cachedecor.pymemcache",
                "cachedecor.default.arguments.url": "127.0.0.1:11211",
            }
        )
        client = next(iter(region_settings("default").store.client.clients.values()))  # type: ignore[attr-defined]
        assert 0 < client.connect_timeout < 1 and 0 < client.timeout < 1 and client.no_delay


BAD: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown backend",
        {"regions": {"r": {"backend": "nope.backend"}}},
        r"cachedecor\.r\.backend.*unknown backend",
    ),
    ("missing backend", {"regions": {"r": {"expiration_time": 3}}}, r"cachedecor\.r\.backend.*missing"),
    (
        "unknown option",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "expire": 3}}},
        r"cachedecor\.r\.expire.*unknown option",
    ),
    (
        "non-numeric expiry",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "expiration_time": "soon"}}},
        r"cachedecor\.r\.expiration_time.*integer",
    ),
    (
        "negative expiry",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "expiration_time": -1}}},
        r"cachedecor\.r\.expiration_time.*0 or more",
    ),
    (
        "bool as a number",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "expiration_time": True}}},
        r"cachedecor\.r\.expiration_time",
    ),
    (
        "negative threshold",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "compress_threshold": -5}}},
        r"cachedecor\.r\.compress_threshold",
    ),
    (
        "bad compress_level",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "compress_level": 42}}},
        r"cachedecor\.r.*compress_level",
    ),
    (
        "bad compression",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "compression": "lzma"}}},
        r"cachedecor\.r.*compression",
    ),
    (
        "bad serializer",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "serializer": "pickle"}}},
        r"cachedecor\.r\.serializer.*pickle",
    ),
    (
        "bad namespace",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "namespace": "a b"}}},
        r"cachedecor\.r\.namespace",
    ),
    (
        "zero lease timeout",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "lease_timeout": 0}}},
        r"cachedecor\.r\.lease_timeout",
    ),
    (
        "empty secret",
        {"regions": {"r": {"backend": "dogpile.cache.memory"}}, "secret": ""},
        r"cachedecor\.secret.*empty",
    ),
    (
        "empty region secret",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "secret": ""}}},
        r"cachedecor\.r\.secret.*empty",
    ),
    (
        "unknown memcached argument",
        {
            "regions": {
                "r": {"backend": "cachedecor.pymemcache", "arguments": {"url": "h:1", "colour": "red"}}
            }
        },
        r"cachedecor\.r\.arguments\.colour.*unknown argument",
    ),
    (
        "unknown argument of dogpile's pymemcache",
        {
            "regions": {
                "r": {"backend": "dogpile.cache.pymemcache", "arguments": {"url": "h:1", "serde": "x"}}
            }
        },
        r"cachedecor\.r\.arguments\.serde",
    ),
    (
        "unknown redis argument",
        {"regions": {"r": {"backend": "dogpile.cache.redis", "arguments": {"urls": "redis://x"}}}},
        r"cachedecor\.r\.arguments\.urls.*dogpile\.cache\.redis",
    ),
    (
        "unknown memory argument",
        {"regions": {"r": {"backend": "dogpile.cache.memory", "arguments": {"size": 3}}}},
        r"cachedecor\.r\.arguments\.size",
    ),
    (
        "missing url",
        {"regions": {"r": {"backend": "cachedecor.pymemcache"}}},
        r"cachedecor\.r\.arguments\.url",
    ),
    (
        "url without port",
        {"regions": {"r": {"backend": "cachedecor.pymemcache", "arguments": {"url": "host"}}}},
        r"cachedecor\.r\.arguments\.url.*host:port",
    ),
    (
        "bad bool",
        {
            "regions": {
                "r": {"backend": "cachedecor.pymemcache", "arguments": {"url": "h:1", "no_delay": "maybe"}}
            }
        },
        r"cachedecor\.r\.arguments\.no_delay.*true or false",
    ),
    (
        "negative timeout",
        {"regions": {"r": {"backend": "cachedecor.pymemcache", "arguments": {"url": "h:1", "timeout": -1}}}},
        r"cachedecor\.r\.arguments\.timeout",
    ),
    (
        "object argument given as text",
        {
            "regions": {
                "r": {"backend": "cachedecor.pymemcache", "arguments": {"url": "h:1", "tls_context": "yes"}}
            }
        },
        r"cachedecor\.r\.arguments\.tls_context.*Python object",
    ),
    (
        "bad port",
        {"regions": {"r": {"backend": "dogpile.cache.redis", "arguments": {"port": 70000}}}},
        r"cachedecor\.r\.arguments\.port",
    ),
    (
        "backend without compare-and-set",
        {"regions": {"r": {"backend": "dogpile.cache.null"}}},
        r"cachedecor\.r\.backend.*compare-and-set",
    ),
    (
        "unknown top-level option",
        {"regions": {"r": {"backend": "dogpile.cache.memory"}}, "region": {}},
        r"unknown top-level option 'region'",
    ),
    ("empty regions", {"regions": {}}, r"regions"),
    ("bad region name", {"regions": {"a b": {"backend": "dogpile.cache.memory"}}}, r"region name 'a b'"),
    (
        "listed but not defined",
        {"cachedecor.regions": "a, b", "cachedecor.a.backend": "dogpile.cache.memory"},
        r"region 'b' is listed in cachedecor\.regions but not defined",
    ),
    (
        "defined but not listed",
        {
            "cachedecor.regions": "a",
            "cachedecor.a.backend": "dogpile.cache.memory",
            "cachedecor.b.backend": "dogpile.cache.memory",
        },
        r"region 'b' is defined but not listed",
    ),
    ("flat key without option", {"cachedecor.default": "x"}, r"unknown option 'cachedecor\.default'"),
]


@pytest.mark.parametrize(("source", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_configuration_is_a_config_error_naming_the_option(source: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cachedecor.configure_regions(source)


class TestFiles:
    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="does not exist"):
            cachedecor.configure_regions(tmp_path / "absent.ini")

    def test_unreadable_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cannot be read"):
            cachedecor.configure_regions(tmp_path)  # a directory, unreadable as a file even for root

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
    def test_file_without_read_permission(self, tmp_path: Path) -> None:
        path = write(tmp_path, API_INI)
        path.chmod(0)
        with pytest.raises(ConfigError, match="cannot be read"):
            cachedecor.configure_regions(path)

    def test_malformed_ini(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="not valid INI"):
            cachedecor.configure_regions(write(tmp_path, "[cachedecor\nregions = a\n"))

    def test_ini_without_a_cachedecor_section(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"no \[cachedecor\]"):
            cachedecor.configure_regions(write(tmp_path, "[app]\nx = 1\n"))

    def test_environment_naming_a_missing_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CACHEDECOR_CONFIG", str(tmp_path / "gone.ini"))
        with pytest.raises(ConfigError, match=r"gone\.ini"):
            cachedecor.configure_regions()

    def test_other_source_types_are_refused(self) -> None:
        with pytest.raises(ConfigError, match="INI path, a dict or None"):
            cachedecor.configure_regions(42)  # type: ignore[arg-type]


class TestReconfiguration:
    def test_a_failed_configuration_changes_nothing(self) -> None:
        cachedecor.configure_regions({"regions": {"a": {"backend": "dogpile.cache.memory"}}})
        before = region_settings("a")
        with pytest.raises(ConfigError):
            cachedecor.configure_regions(
                {
                    "regions": {
                        "a": {"backend": "dogpile.cache.memory", "expiration_time": 1},
                        "b": {"backend": "nope"},
                    }
                }
            )
        assert region_settings("a") is before
        with pytest.raises(RegionNotConfigured):
            region_settings("b")

    def test_configuring_again_replaces_the_named_regions_and_keeps_the_others(self) -> None:
        cachedecor.configure_regions(
            {"regions": {"a": {"backend": "dogpile.cache.memory"}, "b": {"backend": "dogpile.cache.memory"}}}
        )
        b = region_settings("b")
        regions = cachedecor.configure_regions(
            {"regions": {"a": {"backend": "dogpile.cache.memory", "expiration_time": 9}}}
        )
        assert sorted(regions) == ["a", "b"]
        assert region_settings("a").expiration_time == 9
        assert region_settings("b") is b

    def test_reset_forgets_every_region(self) -> None:
        cachedecor.configure_regions()
        cachedecor.reset()
        with pytest.raises(RegionNotConfigured):
            cachedecor.get_region()


class TestRegions:
    def test_get_region_returns_the_dogpile_region(self) -> None:
        from dogpile.cache.region import CacheRegion

        regions = cachedecor.configure_regions()
        assert isinstance(cachedecor.get_region(), CacheRegion)
        assert cachedecor.get_region("default") is regions["default"]

    def test_unconfigured_region_error_says_how_to_configure_it(self) -> None:
        with pytest.raises(RegionNotConfigured) as info:
            cachedecor.get_region("users")
        assert isinstance(info.value, cachedecor.CacheError) and isinstance(info.value, LookupError)
        assert "'users'" in str(info.value) and "configure_regions" in str(info.value)
        assert info.value.name == "users"

    def test_dogpile_api_on_a_memory_region(self) -> None:
        region = cachedecor.configure_regions()["default"]
        region.set("k", {"a": 1})
        assert region.get("k") == {"a": 1}

    def test_every_config_error_is_a_cache_error(self) -> None:
        assert issubclass(ConfigError, cachedecor.CacheError)

"""Every source (INI file, nested dict, flat dotted dict, the environment) -> one flat form."""

from __future__ import annotations

import configparser
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cachedecor.config.options import GLOBAL_OPTIONS
from cachedecor.config.suggestions import closest, did_you_mean
from cachedecor.errors import ConfigError

__all__ = ["ENV_VAR", "Parsed", "check_region_name", "parse"]

#: Environment variable naming the INI file used by ``configure_regions(None)``.
ENV_VAR = "CACHEDECOR_CONFIG"


@dataclass
class Parsed:
    """A source in the one flat form every source is turned into, not yet validated.

    Keys are as the user wrote them (without the prefix); values are raw (strings from an
    INI file, whatever a dict held). A region named only by its ``arguments.*`` has an
    empty entry in ``regions``.
    """

    #: the top-level options (those of :data:`~cachedecor.config.options.GLOBAL_OPTIONS`
    #: found); a nested dict's ``regions`` becomes the list of its region names
    globals: dict[str, Any] = field(default_factory=dict)
    #: region name -> option -> raw value (``arguments.*`` excluded)
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: region name -> argument -> raw value (the ``arguments.*`` options)
    arguments: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: where the settings come from: "ini", "flat" or "nested" (to name a region's options)
    form: str = "flat"


def check_region_name(name: str, origin: str) -> str:
    """``name`` if it is a valid region name (letters, digits, ``_`` and ``-``, not empty).

    :raises ConfigError: naming ``origin`` (where the name was written) and the name.
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ConfigError(f"{origin}: region name {name!r} must be letters, digits, '_' or '-'")
    return name


def _from_flat(settings: Mapping[str, Any], prefix: str, form: str = "flat") -> Parsed:
    parsed = Parsed(form=form)
    for full_key, value in settings.items():
        if not isinstance(full_key, str) or not full_key.startswith(prefix):
            continue
        rest = full_key[len(prefix) :]
        if rest in GLOBAL_OPTIONS:
            parsed.globals[rest] = value
            continue
        name, dot, option = rest.partition(".")
        if not dot or not option:
            raise ConfigError(
                f"unknown option {full_key!r};{did_you_mean(rest, GLOBAL_OPTIONS)} expected "
                f"{prefix}regions, {prefix}secret, {prefix}outbox_url (and the other outbox_* options) "
                f"or {prefix}<region>.<option>"
            )
        check_region_name(name, full_key)
        if option.startswith("arguments."):
            arg = option[len("arguments.") :]
            if not arg:
                raise ConfigError(f"{full_key!r}: empty argument name")
            parsed.arguments.setdefault(name, {})[arg] = value
            parsed.regions.setdefault(name, {})
        else:
            parsed.regions.setdefault(name, {})[option] = value
    return parsed


def _from_nested(source: Mapping[str, Any]) -> Parsed:
    parsed = Parsed(form="nested")
    for key in source:
        if key not in GLOBAL_OPTIONS:
            raise ConfigError(
                f"unknown top-level option {key!r};{did_you_mean(str(key), GLOBAL_OPTIONS)} expected "
                f"'regions' (a dict of regions) and optionally 'secret' and the outbox_* options"
            )
    regions = source.get("regions")
    if not isinstance(regions, Mapping) or not regions:
        raise ConfigError("'regions' must be a non-empty dict of region name -> options")
    for key in GLOBAL_OPTIONS:
        if key != "regions" and key in source:
            parsed.globals[key] = source[key]
    for name, options in regions.items():
        check_region_name(name, "regions")
        if not isinstance(options, Mapping):
            raise ConfigError(f"region {name!r}: options must be a dict, got {options!r}")
        opts = dict(options)
        args = opts.pop("arguments", {})
        if not isinstance(args, Mapping):
            raise ConfigError(f"region {name!r}: option 'arguments' must be a dict, got {args!r}")
        parsed.regions[name] = opts
        parsed.arguments[name] = dict(args)
    parsed.globals["regions"] = list(regions)
    return parsed


def _read_ini(path: str | os.PathLike[str], prefix: str) -> dict[str, str]:
    section = prefix.rstrip(".")
    # A [DEFAULT] section (Paste-deploy files have one) would otherwise add its keys to
    # every section; "\n" can never be a section name, so [DEFAULT] is just ignored.
    parser = configparser.ConfigParser(interpolation=None, default_section="\n")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {os.fspath(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {os.fspath(path)!r} cannot be read: {exc}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {os.fspath(path)!r} is not valid INI: {exc}") from None
    flat: dict[str, str] = {}
    found = False
    for name in parser.sections():
        if name == section:
            found = True
            for key, value in parser.items(name, raw=True):
                flat[f"{prefix}{key}"] = value
        elif name.startswith(section + "."):
            found = True
            for key, value in parser.items(name, raw=True):
                flat[f"{prefix}{name[len(section) + 1 :]}.{key}"] = value
    if not found:
        raise ConfigError(
            f"configuration file {os.fspath(path)!r} has no [{section}] or [{section}.<region>] "
            f"section{_misspelled_section(section, parser.sections())}"
        )
    return flat


def _misspelled_section(section: str, sections: list[str]) -> str:
    """``"; did you mean [cachedecor.default] (not [cachdecor.default])?"`` or ``""``."""
    parts = section.count(".") + 1
    for name in sections:
        head, tail = ".".join(name.split(".")[:parts]), name.split(".")[parts:]
        if difflib.SequenceMatcher(None, head, section).ratio() >= 0.8:
            meant = ".".join([section, *tail])
            return f"; did you mean [{meant}] (not [{name}])?"
    return ""


def parse(source: Any, prefix: str) -> Parsed:
    """Any source :func:`~cachedecor.configure_regions` takes, in the flat form.

    ``source`` is an INI path, a nested dict, a flat dotted dict (keys selected by
    ``prefix``, which ends with ``"."``) or ``None`` (``$CACHEDECOR_CONFIG``, else one
    memory region ``default``). Only the form is checked here (region names, known
    top-level options, a readable file); the options are checked by
    :mod:`cachedecor.config.regions`. Reads the file, nothing else.

    :raises ConfigError: for a source of the wrong form, saying what was expected.
    """
    if source is None:
        path = os.environ.get(ENV_VAR)
        if not path:
            return Parsed(
                globals={"regions": ["default"]},
                regions={"default": {"backend": "dogpile.cache.memory"}},
                arguments={"default": {}},
            )
        return _from_flat(_read_ini(path, prefix), prefix, form="ini")
    if isinstance(source, (str, os.PathLike)):
        return _from_flat(_read_ini(source, prefix), prefix, form="ini")
    if isinstance(source, Mapping):
        if "regions" in source and isinstance(source["regions"], Mapping):
            return _from_nested(source)
        parsed = _from_flat(source, prefix)
        if not parsed.regions and not parsed.globals:
            close = _did_you_mean_key(source, prefix)
            if close:
                raise ConfigError(f"no regions are configured:{close}")
        return parsed
    raise ConfigError(f"configure_regions() takes an INI path, a dict or None, not {type(source).__name__}")


def _did_you_mean_key(source: Mapping[str, Any], prefix: str) -> str:
    """A hint for a dict with no key of ours: a misspelled ``regions`` or prefix."""
    for key in source:
        if not isinstance(key, str):
            continue
        if key != "regions" and closest(key, ["regions"]):
            return f" did you mean 'regions' (not {key!r}) for a nested configuration?"
        dots = prefix.count(".")
        parts = key.split(".", dots)
        if (
            len(parts) > dots
            and difflib.SequenceMatcher(None, ".".join(parts[:dots]) + ".", prefix).ratio() >= 0.8
        ):
            return f" did you mean {prefix + parts[dots]!r} (not {key!r})?"
    return ""

"""
Several mirrors on one port: a mirror is a name (its URL prefix ``/NAME/``
and its directory ``CACHE_DIR/NAME/``), its sources and its kind, which
chooses its freshness rules.  They are read from the ``[mirrors.NAME]``
tables of a TOML configuration file (``--config``), whose other keys are
the command-line options by name.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from pkgcache.freshness import VOLATILE_BY_KIND
from pkgcache.sources import Source

KINDS = ("generic", "debian", "ubuntu", "gentoo", "rpm", "pypi", "npm")
assert set(KINDS) == set(VOLATILE_BY_KIND)
#: Kinds whose documents link to files on a host of their own.
KINDS_WITH_FILES = ("pypi", "npm")

#: A name that is one plain path segment: never ``.``, ``..``, a hidden or
#: reserved name (those start with a dot), or anything a URL must escape.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_MIRROR_KEYS = {"kind", "sources", "files", "volatile", "volatile-max-age"}


class ConfigError(ValueError):
    """A configuration file that cannot be used, said in one line."""


@dataclass(frozen=True)
class Mirror:
    """
    :ivar name: the URL prefix and directory of its tree.
    :ivar sources: tried in this order.
    :ivar kind: a key of :data:`~pkgcache.freshness.VOLATILE_BY_KIND`.
    :ivar volatile: more patterns of volatile files.
    :ivar volatile_max_age: its own freshness, if not the global one.
    :ivar files: for ``pypi`` (required) and ``npm`` (optional): where
        the files its documents link to live (failover, in order); served
        under ``/NAME/files/``.
    """

    name: str
    sources: tuple[Source, ...]
    kind: str = "generic"
    volatile: tuple[str, ...] = ()
    volatile_max_age: Optional[float] = None
    files: tuple[Source, ...] = ()


@dataclass
class Config:
    """
    :ivar options: the file's other keys, as the command line names them.
    :ivar mirrors: in the order the file gives them.
    """

    options: dict[str, Any] = field(default_factory=dict)
    mirrors: list[Mirror] = field(default_factory=list)


def load_config(path: str) -> Config:
    """
    :raises ConfigError: for a file that cannot be read or parsed (with its
        line), or a mirror that is not well defined.
    """
    # The TOML parser is only needed with --config: --source and --mirror
    # serve without it.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.9 and 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None
    mirrors = document.pop("mirrors", {})
    if not isinstance(mirrors, dict):
        raise ConfigError(f"{path}: 'mirrors' must be tables: [mirrors.NAME]")
    return Config(
        options=document,
        mirrors=[_mirror(path, name, table) for name, table in mirrors.items()],
    )


def _mirror(path: str, name: str, table: Any) -> Mirror:
    where = f"{path}: [mirrors.{name}]"
    if not _SAFE_NAME.match(name):
        raise ConfigError(
            f"{where}: a mirror's name is one path segment of letters, digits, '.', '_' "
            "or '-', not starting with '.', '_' or '-'"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(table) - _MIRROR_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    kind = table.get("kind", "generic")
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    parsed = _urls(where, "sources", table.get("sources"))
    files: tuple[Source, ...] = ()
    if kind == "pypi":
        if "files" not in table:
            raise ConfigError(
                f"{where}: kind 'pypi' needs 'files': the URLs of the host its pages link to"
            )
        files = _urls(where, "files", table["files"])
    elif "files" in table and kind in KINDS_WITH_FILES:
        # npm: for documents whose tarball links are not below the sources.
        files = _urls(where, "files", table["files"])
    elif "files" in table:
        raise ConfigError(f"{where}: 'files' is for kinds {' and '.join(KINDS_WITH_FILES)} only")
    volatile = table.get("volatile", [])
    if not isinstance(volatile, list) or not all(isinstance(v, str) for v in volatile):
        raise ConfigError(f"{where}: 'volatile' must be a list of regular expressions")
    for pattern in volatile:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{where}: {pattern!r} is not a regular expression: {error}") from None
    max_age = table.get("volatile-max-age")
    if max_age is not None and (
        isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or not max_age >= 0
    ):
        raise ConfigError(f"{where}: 'volatile-max-age' must be a number of seconds, 0 or more")
    return Mirror(
        name, parsed, kind, tuple(volatile), None if max_age is None else float(max_age), files
    )


def _urls(where: str, key: str, value: Any) -> tuple[Source, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key!r} must be a list of at least one URL")
    try:
        return tuple(Source(url) for url in value)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def mirror_from_table(where: str, name: str, table: Any) -> Mirror:
    """
    A mirror given as a ``[mirrors.NAME]`` table's keys, from anywhere but
    a file (``--mirror``), checked exactly as a file's tables are.

    :param where: what gave it, the start of each error's message.
    :raises ConfigError: as :func:`load_config` does for such a table.
    """
    return _mirror(where, name, table)

"""
What a Debian archive's ``Release`` and ``InRelease`` files say.

A suite's ``dists/<suite>/InRelease`` (or ``Release``) lists every index file
under that directory with its size and SHA-256, and says whether the mirror
also serves each one under ``by-hash/SHA256/<hash>``.  Knowing that lets a
cache tell a current index from a stale one and treat by-hash paths as
immutable.

Nothing here verifies the OpenPGP signature: apt does that on the client,
against the very bytes the cache passes on.  What is read here only guides the
cache.  Only the signed part of an ``InRelease`` file is read, so text added
outside it cannot change what the cache believes.

Everything here is pure: bytes and path strings in, values out.
"""

from __future__ import annotations

import string

from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from itertools import islice
from types import MappingProxyType
from typing import Iterator, Mapping, Optional

_SIGNED_MESSAGE_START = "-----BEGIN PGP SIGNED MESSAGE-----"
_SIGNATURE_START = "-----BEGIN PGP SIGNATURE-----"
#: What apt's ``StringToBool`` reads as true.
_TRUE_WORDS = frozenset({"yes", "true", "with", "on", "enable"})
_SHA256_HEX_LENGTH = 64
_RELEASE_NAMES = frozenset({"InRelease", "Release"})
#: A suite's files that no Release file lists.
_UNLISTED_NAMES = _RELEASE_NAMES | {"Release.gpg"}


@dataclass(frozen=True)
class IndexEntry:
    """One line of a ``SHA256:`` section: what a listed file must be."""

    size: int
    #: Lowercase hex, as the ``by-hash/SHA256/`` name.
    sha256: str


@dataclass(frozen=True)
class ReleaseFile:
    """
    The parts of a ``Release`` file pkgcache uses.

    :ivar date: the ``Date:`` field in seconds since the epoch; None if it is
        missing or unreadable.
    :ivar sha256: entries of the ``SHA256:`` section, keyed by the path
        relative to the ``Release`` file's directory
        (``main/binary-amd64/Packages.xz``).
    :ivar acquire_by_hash: whether the archive says (``Acquire-By-Hash: yes``)
        that apt may fetch listed files under ``by-hash/SHA256/``.
    """

    date: Optional[float]
    sha256: Mapping[str, IndexEntry]
    acquire_by_hash: bool


def parse_release(data: bytes) -> ReleaseFile:
    """
    Read a ``Release`` file, or an ``InRelease`` file (the same text
    clear-signed).

    Tolerant, because apt, not the cache, judges the file: unknown fields,
    malformed ``SHA256:`` lines and CRLF line ends are passed over, and
    whatever can be read is returned.  Only the first paragraph counts, as it
    does for apt.

    :raises ValueError: if ``data`` is not UTF-8 text.
    """
    # Split on LF only: str.splitlines would also split on form feeds and
    # Unicode separators.  A CR left at a line's end never matters, as every
    # test below strips or splits on whitespace.
    lines = _signed_text(data.decode("utf-8").split("\n"))
    date = None
    acquire_by_hash = False
    sha256: dict[str, IndexEntry] = {}
    # The field the current continuation lines belong to, lowercased; only
    # SHA256 has continuation lines we keep.  MD5Sum and SHA1 sections are as
    # long but are never stored.
    field: Optional[str] = None
    seen_any_field = False
    for line in lines:
        if not line.strip():
            if seen_any_field:
                break
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t":
            if field == "sha256":
                _add_sha256_entry(sha256, line)
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not name or any(c.isspace() for c in name):
            # Not a field: its continuation lines belong to nothing either.
            field = None
            continue
        field = name.lower()
        seen_any_field = True
        if field == "date":
            date = _parse_date(value)
        elif field == "acquire-by-hash":
            acquire_by_hash = value.strip().lower() in _TRUE_WORDS
        elif field == "sha256":
            # Normally empty: the entries follow on continuation lines.
            _add_sha256_entry(sha256, value)
    return ReleaseFile(
        date=date, sha256=MappingProxyType(sha256), acquire_by_hash=acquire_by_hash
    )


def _signed_text(lines: list[str]) -> Iterator[str]:
    """
    The signed text of a clear-signed message, dash-escaping undone; all
    lines if there is no signed message.

    Lines before the message or after its signature are never read, even
    where apt would reject the file for them rather than ignore them.
    """
    start = next(
        (i for i, line in enumerate(lines) if line.rstrip() == _SIGNED_MESSAGE_START),
        None,
    )
    if start is None:
        yield from lines
        return
    # Armor headers (``Hash: SHA512``) end at the first empty line.
    in_armor_headers = True
    for line in islice(lines, start + 1, None):
        if in_armor_headers:
            in_armor_headers = bool(line.strip())
            continue
        if line.rstrip() == _SIGNATURE_START:
            return
        yield line[2:] if line.startswith("- ") else line


def _parse_date(value: str) -> Optional[float]:
    """Seconds since the epoch; a date without a zone is taken as UTC."""
    try:
        moment = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError):
        # Python 3.9 raises TypeError on what it cannot parse, later ones
        # ValueError.
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _add_sha256_entry(entries: dict[str, IndexEntry], line: str) -> None:
    """Record a `` <hex> <size> <path>`` line; skip it if it is not one."""
    words = line.split()
    if len(words) != 3:
        return
    hex_digest, size, path = words
    if len(hex_digest) != _SHA256_HEX_LENGTH or not all(
        c in string.hexdigits for c in hex_digest
    ):
        return
    # int() alone would also take "+1", "1_000" and non-ASCII digits.
    if not (size.isascii() and size.isdigit()):
        return
    if not _is_plain_relative_path(path):
        # No request can name it, and a caller walking the entries must not
        # be led outside the suite.
        return
    entries[path] = IndexEntry(size=int(size), sha256=hex_digest.lower())


def _is_plain_relative_path(path: str) -> bool:
    return all(segment not in ("", ".", "..") for segment in path.split("/"))


def _split_at_suite(path: str) -> Optional[tuple[str, str]]:
    """
    ``(release_dir, rest)`` for a path inside a ``dists/<suite>/`` directory.

    The first ``dists`` segment followed by a suite and something inside it
    wins.  apt builds every index URI as ``<base>/dists/<suite>/<path>``, and
    the paths a Release file lists never hold a ``dists`` segment, so the
    first one is the one apt put there; a mirror whose base path holds a
    ``dists`` segment of its own is not supported.  A suite is one segment: for the old ``dists/stretch/updates`` layout of security
    archives this names ``dists/stretch``, where no Release file lies, so
    lookups there find nothing rather than something wrong.
    """
    segments = path.split("/")
    for index, segment in enumerate(segments[:-2]):
        if segment == "dists" and segments[index + 1]:
            rest = "/".join(segments[index + 2 :])
            if rest:
                return "/".join(segments[: index + 2]), rest
    return None


def release_directory(path: str) -> Optional[str]:
    """
    The directory whose ``InRelease``/``Release`` lists ``path``:
    ``/debian/dists/bookworm`` for
    ``/debian/dists/bookworm/main/binary-amd64/Packages.xz`` (and for its own
    ``InRelease``).

    :return: None if ``path`` is not inside a ``dists/<suite>/`` directory.
    """
    split = _split_at_suite(path)
    return None if split is None else split[0]


def relative_to_release(path: str) -> Optional[tuple[str, str]]:
    """
    ``(release_dir, relative_path)``, the key of ``path`` in that directory's
    :attr:`ReleaseFile.sha256`.

    :return: None if ``path`` is not inside a ``dists/<suite>/`` directory or
        is the suite's ``InRelease``, ``Release`` or ``Release.gpg``, which no
        Release file lists.
    """
    split = _split_at_suite(path)
    if split is None:
        return None
    if split[1] in _UNLISTED_NAMES:
        return None
    return split


def is_release_file(path: str) -> bool:
    """
    Whether ``path`` is a suite's own ``InRelease`` or ``Release``.

    A component's ``main/binary-amd64/Release`` is not: it is an index the
    suite's Release file lists like any other.
    """
    split = _split_at_suite(path)
    return split is not None and split[1] in _RELEASE_NAMES


def is_by_hash(path: str) -> bool:
    """Whether ``path`` names a file by its hash, so its content never changes."""
    return "by-hash" in path.split("/")


def by_hash_path(relative_path: str, sha256: str) -> str:
    """
    Where apt fetches ``relative_path`` when the archive has Acquire-By-Hash:
    ``main/binary-amd64/by-hash/SHA256/<sha256>`` for
    ``main/binary-amd64/Packages.xz``.
    """
    directory, _, _ = relative_path.rpartition("/")
    by_hash = f"by-hash/SHA256/{sha256}"
    return f"{directory}/{by_hash}" if directory else by_hash

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

The parsing is pure (bytes and path strings in, values out);
:class:`ReleaseTracker` applies it to the cache: an index is served and
published only while it matches the newest ``InRelease`` of its suite, and
an older ``InRelease`` (from a lagging mirror) never replaces a newer one.
"""

from __future__ import annotations

import string

from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from itertools import islice
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Optional

from twisted.logger import Logger
from zope.interface import implementer

from pkgcache.interfaces import IPublicationCheck
from pkgcache.metadata import EntryMetadata
from pkgcache.paths import CacheKey, UnsafePath, cache_key_from_postpath

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


#: The largest Release file read to check it (real ones are well under 1 MiB).
MAX_RELEASE_BYTES = 16 * 1024 * 1024

log = Logger()


@implementer(IPublicationCheck)
class ReleaseTracker:
    """
    The newest ``InRelease`` (or ``Release``) of each suite in the cache,
    and the consistency of the indexes it lists.

    - A cached index whose SHA-256 is not the one its suite's release lists
      is stale, however recently checked: apt would reject it.
    - A fetched index that does not match is not published.
    - A fetched release older (by ``Date``) than the cached one is not
      published; a newer one is, and then each index it lists that is
      cached under its canonical name and does not match is revalidated at
      once (``revalidate(key)``).

    A suite's release is read from the cache the first time one of its
    files is asked for, then kept in memory (a few hundred KiB per suite).

    :param store: the cache (a :class:`~pkgcache.store.CacheStore`).
    """

    def __init__(self, store, revalidate: Callable[[CacheKey], None]) -> None:
        self._store = store
        self._revalidate = revalidate
        self._releases: dict[str, Optional[ReleaseFile]] = {}
        self._fetched: dict[CacheKey, ReleaseFile] = {}

    def is_consistent(self, key: CacheKey, metadata: EntryMetadata) -> bool:
        entry = self._listed(str(key))
        return entry is None or metadata.sha256 == entry.sha256

    def may_publish(self, key: CacheKey, metadata: EntryMetadata, read) -> bool:
        path = str(key)
        if is_release_file(path):
            return self._may_publish_release(key, read)
        entry = self._listed(path)
        if entry is not None and metadata.sha256 != entry.sha256:
            log.warn("not caching {path}: its SHA-256 is not the one its suite's release lists",
                     path=path)
            return False
        return True

    def published(self, key: CacheKey, metadata: EntryMetadata, read) -> None:
        release = self._fetched.pop(key, None)
        if release is None:
            return
        directory = release_directory(str(key))
        self._releases[directory] = release
        checking = self._store.in_disk_thread(
            _mismatched_indexes, self._store, key.segments[:-1], release
        )
        checking.addCallbacks(
            lambda keys: [self._revalidate(stale) for stale in keys],
            lambda failure: log.info("could not check the indexes of {path}: {error}",
                                     path=directory, error=failure.getErrorMessage()),
        )

    def _may_publish_release(self, key: CacheKey, read) -> bool:
        data = _read_all(read)
        if data is None:
            return True
        try:
            release = parse_release(data)
        except ValueError:
            return True
        current = self._release_of(release_directory(str(key)))
        if current is not None and current.date and release.date and release.date < current.date:
            if not self._still_cached(key):
                current = None  # culled: nothing newer left to keep
        if current is not None and current.date and release.date and release.date < current.date:
            log.warn("not caching {path}: it is older (Date) than the one in the cache; "
                     "its source may lag behind", path=str(key))
            return False
        self._fetched[key] = release
        return True

    def _still_cached(self, key: CacheKey) -> bool:
        cached = self._store.open_file(key)
        if cached is None:
            return False
        cached.close()
        return True

    def _listed(self, path: str) -> Optional[IndexEntry]:
        where = relative_to_release(path)
        if where is None:
            return None
        release = self._release_of(where[0])
        return release.sha256.get(where[1]) if release is not None else None

    def _release_of(self, directory: str) -> Optional[ReleaseFile]:
        if directory not in self._releases:
            self._releases[directory] = self._load(directory)
        return self._releases[directory]

    def _load(self, directory: str) -> Optional[ReleaseFile]:
        """The suite's release in the cache (a small read, once per suite)."""
        segments = tuple(directory.strip("/").split("/"))
        for name in ("InRelease", "Release"):
            cached = self._store.open_file(CacheKey(segments + (name,)))
            if cached is None:
                continue
            try:
                data = _read_all(cached.read)
            finally:
                cached.close()
            if data is not None:
                try:
                    return parse_release(data)
                except ValueError:
                    continue
        return None


def _read_all(read) -> Optional[bytes]:
    """All of a small file through ``read(offset, length)``; None if too big."""
    parts = []
    offset = 0
    while True:
        data = read(offset, 1024 * 1024)
        if not data:
            return b"".join(parts)
        parts.append(data)
        offset += len(data)
        if offset > MAX_RELEASE_BYTES:
            return None


def _mismatched_indexes(store, suite: tuple[str, ...], release: ReleaseFile) -> list[CacheKey]:
    """
    The indexes ``release`` lists that are cached under their canonical
    names with other contents (blocks: disk thread only).
    """
    import os

    stale = []
    for relative, entry in release.sha256.items():
        try:
            key = cache_key_from_postpath(
                [segment.encode("utf-8") for segment in suite + tuple(relative.split("/"))]
            )
        except UnsafePath:
            continue
        try:
            fd = os.open(store.path_for(key).path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if EntryMetadata.read(fd).sha256 != entry.sha256:
                stale.append(key)
        finally:
            os.close(fd)
    return stale

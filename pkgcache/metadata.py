"""
What pkgcache keeps about a cached file besides its bytes and mtime: its
content type, its validators and when it was last checked with its source.

It is kept in an extended attribute of the file itself (``user.pkgcache``,
a small JSON object), so that it is written on the spool before the rename
and so published atomically with the bytes, is removed with the file by any
cull (``pkgcache-cull``, ``find -delete``, ``rm``), and leaves the cache
directory a plain mirror tree.  On a filesystem without user extended
attributes nothing is kept and every file is served as
``application/octet-stream``; pkgcache says so once in its log.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

from twisted.logger import Logger

XATTR_NAME = "user.pkgcache"
DEFAULT_CONTENT_TYPE = b"application/octet-stream"
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)

log = Logger()
_warned_unsupported = False


@dataclass(frozen=True)
class EntryMetadata:
    """
    :ivar content_type: the ``Content-Type`` the source sent, if any: hits
        are labelled as the miss was, never by a guess from the name.
    :ivar etag: the source's ``ETag``, sent back to it to revalidate, and
        to clients (whose ``If-None-Match`` it answers).
    :ivar last_modified: the source's ``Last-Modified``, exactly as sent,
        for ``If-Modified-Since`` (the file's mtime holds it as a time).
    :ivar source: the source the copy came from: validators are only
        meaningful to it.
    :ivar checked: when the copy was last known to match its source
        (fetched, or revalidated), in seconds since the epoch.
    :ivar sha256: the SHA-256 of the bytes (hex), for files whose
        consistency with an index is checked (Debian's).
    """

    content_type: Optional[bytes] = None
    etag: Optional[bytes] = None
    last_modified: Optional[bytes] = None
    source: Optional[str] = None
    checked: Optional[float] = None
    sha256: Optional[str] = None

    @property
    def served_content_type(self) -> bytes:
        return self.content_type or DEFAULT_CONTENT_TYPE

    def checked_at(self, when: float, etag: Optional[bytes] = None) -> "EntryMetadata":
        """The same copy, found to match its source at ``when``."""
        return replace(self, checked=when, etag=etag if etag is not None else self.etag)

    def write(self, fd: int) -> None:
        """Attach to the open file ``fd`` (blocks: disk thread only)."""
        fields = {}
        for name in _BYTES_FIELDS:
            value = getattr(self, name)
            if value is not None:
                fields[name.replace("_", "-")] = value.decode("latin-1")
        for name in _OTHER_FIELDS:
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        try:
            os.setxattr(fd, XATTR_NAME, json.dumps(fields).encode("utf-8"))
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            _warn_unsupported(error)

    @classmethod
    def read(cls, fd: int) -> "EntryMetadata":
        """What was attached to the open file ``fd``; nothing, if unreadable."""
        try:
            attribute = os.getxattr(fd, XATTR_NAME)
        except OSError:
            return cls()
        return _parsed(attribute)

    @classmethod
    def parse(cls, attribute: bytes) -> "EntryMetadata":
        """What the attribute's bytes say; nothing, if they do not parse."""
        try:
            fields = json.loads(attribute)
        except ValueError:
            return cls()
        if not isinstance(fields, dict):
            return cls()
        values: dict = {}
        for name in _BYTES_FIELDS:
            value = fields.get(name.replace("_", "-"))
            if isinstance(value, str):
                values[name] = value.encode("latin-1", "replace")
        for name, kinds in _OTHER_FIELDS.items():
            value = fields.get(name)
            if isinstance(value, kinds) and not isinstance(value, bool):
                values[name] = value
        return cls(**values)


#: The attributes of this many files (the hot ones) are parsed once, not
#: on every hit: a copy's attribute changes whenever its metadata does.
PARSED_ATTRIBUTES = 4096
_parsed = lru_cache(maxsize=PARSED_ATTRIBUTES)(EntryMetadata.parse)

_BYTES_FIELDS = ("content_type", "etag", "last_modified")
_OTHER_FIELDS = {"source": (str,), "checked": (int, float), "sha256": (str,)}


def _warn_unsupported(error: OSError) -> None:
    global _warned_unsupported
    if not _warned_unsupported:
        _warned_unsupported = True
        log.warn(
            "the cache's filesystem keeps no extended attributes ({error}): "
            "cached files will be served as application/octet-stream",
            error=error.strerror,
        )

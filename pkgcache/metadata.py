"""
What pkgcache keeps about a cached file besides its bytes and mtime.

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
from dataclasses import dataclass
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
    """

    content_type: Optional[bytes] = None

    @property
    def served_content_type(self) -> bytes:
        return self.content_type or DEFAULT_CONTENT_TYPE

    def write(self, fd: int) -> None:
        """Attach to the open file ``fd`` (blocks: disk thread only)."""
        fields = {}
        if self.content_type is not None:
            fields["content-type"] = self.content_type.decode("latin-1")
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
            fields = json.loads(os.getxattr(fd, XATTR_NAME))
        except (OSError, ValueError):
            return cls()
        content_type = fields.get("content-type") if isinstance(fields, dict) else None
        return cls(
            content_type=content_type.encode("latin-1") if isinstance(content_type, str) else None
        )


def _warn_unsupported(error: OSError) -> None:
    global _warned_unsupported
    if not _warned_unsupported:
        _warned_unsupported = True
        log.warn(
            "the cache's filesystem keeps no extended attributes ({error}): "
            "cached files will be served as application/octet-stream",
            error=error.strerror,
        )

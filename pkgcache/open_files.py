"""
Small immutable files kept open from one hit to the next, as nginx's
``open_file_cache``: a hit of one costs an ``fstat`` instead of an
``open``, an ``fstat``, an extended-attribute read and a ``close`` (system
calls are most of a small hit's time).

A kept descriptor is used only while its file still has a name: the
``fstat`` of each hit sees a cull, or a newer copy renamed over it, as no
links left (in any process), and the hit opens the path afresh.  Only
files up to :data:`KEPT_FILE_MAX_BYTES` are kept, at most
:func:`kept_files_limit` of them, so the disk space that unlinked but kept
files still hold is bounded (and freed when they are next asked for, or
pushed out).  Volatile files are never kept: their metadata (when last
checked) changes in place.

The last ``close`` of an unlinked file frees its blocks, which is disk
work: a kept file found unlinked is closed by the store's disk threads,
not the reactor's.
"""

from __future__ import annotations

import os
import resource as _rlimits
from collections import OrderedDict
from typing import Callable, Optional

#: Bigger files are opened for each hit: the open is small beside sending them.
KEPT_FILE_MAX_BYTES = 256 * 1024


def kept_files_limit() -> int:
    """How many files to keep open: an eighth of the descriptors we may
    open, at most 256 (the rest are for clients and sources)."""
    soft, _ = _rlimits.getrlimit(_rlimits.RLIMIT_NOFILE)
    return 256 if soft == _rlimits.RLIM_INFINITY else max(0, min(256, soft // 8))


class KeptFile:
    """One kept descriptor, shared by the hits that read it."""

    __slots__ = ("fd", "size", "mtime", "metadata", "users", "kept", "_files")

    def __init__(self, files: "OpenFiles", fd: int, size: int, mtime: float, metadata) -> None:
        self._files = files
        self.fd = fd
        self.size = size
        self.mtime = mtime
        self.metadata = metadata
        self.users = 0
        self.kept = True

    def release(self) -> None:
        """A hit is done with it: closed once nobody uses it and it is not kept."""
        self.users -= 1
        if self.users == 0 and not self.kept:
            self._files._close(self)


class OpenFiles:
    """
    The kept files of one store, by path, the least recently hit pushed out
    first.

    :param on_hit: called with each kept file's descriptor and ``fstat``
        (the store records the access time from it).
    :param close_unlinked: closes the descriptor of an unlinked file.
    """

    def __init__(
        self,
        limit: int,
        on_hit: Callable[[int, os.stat_result], None],
        close_unlinked: Callable[[int], None],
    ) -> None:
        self._limit = limit
        self._on_hit = on_hit
        self._close_unlinked = close_unlinked
        self._kept: OrderedDict[str, KeptFile] = OrderedDict()

    def get(self, path: str) -> Optional[KeptFile]:
        """The kept file of ``path``, in use until released, if it is still there."""
        kept = self._kept.get(path)
        if kept is None:
            return None
        info = os.fstat(kept.fd)
        if info.st_nlink == 0:
            self._drop(path, linked=False)
            return None
        self._kept.move_to_end(path)
        self._on_hit(kept.fd, info)
        kept.users += 1
        return kept

    def keep(self, path: str, fd: int, size: int, mtime: float, metadata) -> Optional[KeptFile]:
        """
        Keep ``fd``, just opened for a hit of ``path``, if it is small
        enough: the kept file (in use until released), or ``None`` if not.
        """
        if size > KEPT_FILE_MAX_BYTES or self._limit == 0:
            return None
        if path in self._kept:
            self._drop(path)
        kept = self._kept[path] = KeptFile(self, fd, size, mtime, metadata)
        kept.users = 1
        while len(self._kept) > self._limit:
            self._drop(next(iter(self._kept)))
        return kept

    def _drop(self, path: str, linked: Optional[bool] = None) -> None:
        kept = self._kept.pop(path)
        kept.kept = False
        if kept.users == 0:
            self._close(kept, linked)

    def _close(self, kept: KeptFile, linked: Optional[bool] = None) -> None:
        if linked is None:
            linked = os.fstat(kept.fd).st_nlink > 0
        if linked:
            os.close(kept.fd)
        else:
            self._close_unlinked(kept.fd)

    def close(self) -> None:
        """Keep nothing more (the store is closing)."""
        for path in list(self._kept):
            self._drop(path)
        self._limit = 0

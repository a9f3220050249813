"""
A spool file: where a download is written while it arrives, until it is
committed into the cache or discarded.

:class:`SpoolWriter` is the one place that knows how: it writes behind the
download in a disk thread (the reactor never waits for the disk), reads
back what is written for clients that follow the download, and ends in
exactly one of two ways:

- :meth:`~SpoolWriter.commit`: every byte on disk, ``fsync``, metadata and
  mtime set, ``rename`` over the cache path, ``fsync`` of the directory, so
  a crash at any moment leaves the whole file or nothing at the cache path;
- :meth:`~SpoolWriter.discard`: the name is removed (what was written stays
  readable by clients already following, through the open descriptor).

Used as ``async with spool: ...; await spool.commit(...)``, anything that
leaves the block without a commit (an exception, a cancel) discards it.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from pkgcache.metadata import EntryMetadata

#: How many buffers one ``writev`` may take (``IOV_MAX`` is 1024 on Linux).
_IOV_MAX = 512

log = Logger()

#: ``run(function, *args)``: runs ``function`` in a disk thread and returns a
#: Deferred that fires with its result in the reactor thread.
DiskRunner = Callable[..., Deferred]


class SpoolWriter:
    """
    A spool being written behind a download.

    :ivar written: how many bytes are on disk (readable with :meth:`read`).
    :ivar failure: why writing stopped (``ENOSPC``, ``EIO``...), if it did;
        the spool is then discarded and will never be committed.
    :ivar on_written: called after each write reaches the disk, so that the
        download can let go of the bytes it held for it.
    """

    def __init__(self, name: str, fd: int, target: str, run_in_disk_thread: DiskRunner) -> None:
        self.name = name
        self.target = target
        self._write_fd: Optional[int] = fd
        self._read_fd: Optional[int] = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        self._run = run_in_disk_thread
        self._pending: list[bytes] = []
        self._writing: Optional[Deferred[None]] = None
        self.written = 0
        self.failure: Optional[BaseException] = None
        self.committed = False
        self.on_written: Callable[[], None] = lambda: None

    async def __aenter__(self) -> "SpoolWriter":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.discard()

    def append(self, data: bytes) -> None:
        """Queue ``data`` for the disk; returns at once."""
        if self._write_fd is None or self.failure is not None:
            return
        self._pending.append(data)
        self._write_pending()

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of what is on disk, from ``offset``."""
        assert self._read_fd is not None, "spool already closed"
        return os.pread(self._read_fd, min(length, self.written - offset), offset)

    async def commit(self, mtime: float, metadata: EntryMetadata) -> None:
        """
        Make the spool the cache's copy of its file, once every byte queued
        is on disk.

        :raises OSError: if a write failed, or the cache path cannot be made
            (a parent name is a file, the disk is full); the spool is then
            discarded.
        """
        await self._settled()
        if self.failure is not None:
            raise self.failure
        fd, self._write_fd = self._write_fd, None
        assert fd is not None, "spool already committed or discarded"
        await self._run(_commit, fd, self.name, self.target, mtime, metadata)
        self.committed = True

    async def discard(self) -> None:
        """
        Stop writing and remove the spool's name, unless it was committed;
        waits for a write under way (its descriptor is closed after it).
        """
        self._pending.clear()
        await self._settled()
        fd, self._write_fd = self._write_fd, None
        if fd is not None:
            _unlink_quietly(self.name)
            os.close(fd)

    def close(self) -> None:
        """Release the read descriptor, once no client reads the spool."""
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    def _write_pending(self) -> None:
        if self._writing is not None or not self._pending or self._write_fd is None:
            return
        chunks, self._pending = self._pending, []
        self._writing = self._run(_write_all, self._write_fd, chunks)
        self._writing.addCallbacks(self._written, self._write_failed)

    def _written(self, count: int) -> None:
        self._writing = None
        self.written += count
        self.on_written()
        self._write_pending()

    def _write_failed(self, failure) -> None:
        self._writing = None
        self._pending.clear()
        self.failure = failure.value
        log.error(
            "writing the spool of {target} failed: {error}",
            target=self.target, error=failure.getErrorMessage(),
        )
        self.on_written()

    def _settled(self) -> "Deferred[None]":
        """Fires once no write is under way or queued (or writing failed)."""
        if self._writing is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()

        def again(_):
            self._settled().chainDeferred(waiter)

        # _written/_write_failed run first (added first), so by then a
        # follow-up write may be under way: wait for that one too.
        self._writing.addBoth(again)
        return waiter


def _write_all(fd: int, chunks: list[bytes]) -> int:
    """Append ``chunks`` to ``fd`` (blocks: disk thread only)."""
    total = 0
    for start in range(0, len(chunks), _IOV_MAX):
        views = [memoryview(chunk) for chunk in chunks[start : start + _IOV_MAX]]
        while views:
            written = os.writev(fd, views)
            total += written
            while views and written >= len(views[0]):
                written -= len(views.pop(0))
            if views and written:
                views[0] = views[0][written:]
    return total


def _commit(fd: int, name: str, target: str, mtime: float, metadata: EntryMetadata) -> None:
    """The blocking half of :meth:`SpoolWriter.commit` (disk thread only)."""
    try:
        os.fsync(fd)
        os.utime(fd, (time.time(), mtime))
        metadata.write(fd)
        parent = os.path.dirname(target)
        for attempt in range(2):
            os.makedirs(parent, exist_ok=True)
            try:
                os.replace(name, target)
                break
            except FileNotFoundError:
                # A cull may have removed the directory, just emptied, in
                # between: make it again, once.
                if attempt:
                    raise
        _fsync_directory(parent)
    except BaseException:
        _unlink_quietly(name)
        raise
    finally:
        # Closing the last write descriptor releases the spool's flock.
        os.close(fd)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warn("could not remove {path}: {error}", path=path, error=error)

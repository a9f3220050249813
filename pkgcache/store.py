"""
The on-disk cache: where published files live and how a spool becomes one.

Layout::

    CACHE_DIR/distfiles/ab/foo-1.2.tar.gz   published, complete, immutable
    CACHE_DIR/.pkgcache-spool/<random>.foo-1.2.tar.gz   being downloaded

Spools live in a directory of the cache itself, so that publication is a
``rename`` within one filesystem (atomic, never a silent copy), and under a
name that :mod:`pkgcache.paths` refuses to serve.  A spool is published only
by :meth:`Spool.publish`: ``fsync`` of the file, ``rename`` into place, then
``fsync`` of the directory, so neither a crash nor a power cut leaves a
partial file at a cache path.

Every live spool holds an exclusive ``flock``: the start-up sweep removes
only spools nobody holds, so a second pkgcache process on the same cache
directory never removes the first one's downloads, while a crashed process's
spools (its locks died with it) are cleaned up.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import time
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.filepath import FilePath, InsecurePath

from pkgcache.paths import RESERVED_TOP_LEVEL_NAMES, CacheKey

SPOOL_DIR_NAME = ".pkgcache-spool"
assert SPOOL_DIR_NAME in RESERVED_TOP_LEVEL_NAMES

#: A hit refreshes a file's atime only when it is older than this, so a busy
#: file costs one ``utime`` an hour rather than one per request.
ATIME_RESOLUTION_SECONDS = 3600

log = Logger()


class CacheStore:
    """
    A cache directory: look up published files, create and sweep spools.

    :param reactor: provides the thread pool that ``fsync`` runs in.
    """

    def __init__(self, cache_dir: FilePath, reactor) -> None:
        self.cache_dir = cache_dir
        self.spool_dir = cache_dir.child(SPOOL_DIR_NAME)
        self._reactor = reactor
        # mkstemp makes 0600 files; published files get the usual mode.
        self._file_mode = 0o666 & ~_current_umask()

    def create(self) -> None:
        """
        Make the cache and spool directories and check that we can write.

        :raises OSError: if the directory cannot be made or written to.
        """
        os.makedirs(self.spool_dir.path, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=self.spool_dir.path)
        probe.close()

    def path_for(self, key: CacheKey) -> FilePath:
        """
        Where ``key`` is (or would be) published.

        :class:`CacheKey` segments are safe already; ``FilePath.child``
        checks again, so this can never name a file outside the cache.
        """
        path = self.cache_dir
        for segment in key.segments:
            path = path.child(segment)
        return path

    def lookup(self, key: CacheKey) -> Optional[FilePath]:
        """
        The published file for ``key``, or ``None`` on a miss.

        A directory, a special file or a name whose parent is a file is a
        miss: pkgcache serves regular files only.
        """
        try:
            path = self.path_for(key)
        except InsecurePath:
            return None
        if path.isfile():
            return path
        return None

    def is_directory(self, key: CacheKey) -> bool:
        """
        Whether ``key`` names a directory of the cache (never served).
        """
        try:
            return self.path_for(key).isdir()
        except InsecurePath:
            return False

    def record_access(self, path: FilePath) -> None:
        """
        Set ``path``'s atime to now, at most once an hour.

        Culling orders files by atime; ``noatime`` and ``relatime`` mounts
        make the kernel's own atime useless for that, so we keep it.
        """
        try:
            status = os.stat(path.path)
            now = time.time()
            if now - status.st_atime >= ATIME_RESOLUTION_SECONDS:
                os.utime(path.path, (now, status.st_mtime))
        except OSError:
            # Culled or unreadable: the hit is served (or fails) regardless.
            pass

    def open_spool(self, key: CacheKey) -> "Spool":
        """
        Create a locked spool file for a download of ``key``.

        :raises OSError: if the spool directory is not writable.
        """
        os.makedirs(self.spool_dir.path, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix="", suffix="." + key.segments[-1][:64], dir=self.spool_dir.path
        )
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, self._file_mode)
        return Spool(name, fd, self.path_for(key), self._reactor)

    def sweep_stale_spools(self) -> int:
        """
        Remove spools left behind by a crashed process.

        Spools whose lock is held belong to a live process (maybe another
        pkgcache on the same directory) and are left alone.

        :return: how many spools were removed.
        """
        removed = 0
        try:
            names = os.listdir(self.spool_dir.path)
        except FileNotFoundError:
            return 0
        for name in names:
            path = os.path.join(self.spool_dir.path, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            else:
                os.unlink(path)
                removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info(
                "removed {count} stale spool files from {spool_dir}",
                count=removed,
                spool_dir=self.spool_dir.path,
            )
        return removed


class Spool:
    """
    A file being downloaded: appended to, read back while it grows, and in
    the end either published at its cache path or discarded.

    Readers use :meth:`read` (``pread`` on a descriptor of our own), which
    keeps working after the file is renamed into the cache or unlinked, so
    clients attached to a download are served whole whatever happens to the
    name.
    """

    def __init__(self, name: str, fd: int, target: FilePath, reactor) -> None:
        self.name = name
        self.target = target
        self._write_fd: Optional[int] = fd
        self._read_fd: Optional[int] = os.open(name, os.O_RDONLY)
        self._reactor = reactor
        self.size = 0

    def write(self, data: bytes) -> None:
        """
        Append ``data``.

        :raises OSError: on a write error (``ENOSPC``, ``EIO``...); the
            spool is then unusable and should be discarded.
        """
        assert self._write_fd is not None, "spool already closed for writing"
        view = memoryview(data)
        while view:
            written = os.write(self._write_fd, view)
            view = view[written:]
            self.size += written

    def read(self, offset: int, length: int) -> bytes:
        """
        Read up to ``length`` bytes written so far, from ``offset``.
        """
        assert self._read_fd is not None, "spool already closed"
        return os.pread(self._read_fd, length, offset)

    def publish(self, mtime: Optional[float]) -> "Deferred[None]":
        """
        Make the spool the cache's copy of its file: ``fsync`` the data, set
        its mtime, ``rename`` it over the cache path, ``fsync`` the
        directory.  Runs in a worker thread: these calls block on the disk.

        Fails (and discards the spool) if the cache path cannot be made, for
        instance because a parent name is a file.
        """
        fd, self._write_fd = self._write_fd, None
        assert fd is not None, "spool already closed for writing"
        name, target = self.name, self.target.path

        def publish_in_thread() -> None:
            try:
                os.fsync(fd)
                if mtime is not None:
                    os.utime(fd, (time.time(), mtime))
                parent = os.path.dirname(target)
                os.makedirs(parent, exist_ok=True)
                os.replace(name, target)
                _fsync_directory(parent)
            except BaseException:
                _unlink_quietly(name)
                raise
            finally:
                # Closing the last write descriptor releases the flock.
                os.close(fd)

        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), publish_in_thread
        )

    def discard(self) -> None:
        """
        Remove the spool's name and stop writing.  Data already written stays
        readable through :meth:`read` until :meth:`close`.
        """
        if self._write_fd is not None:
            _unlink_quietly(self.name)
            os.close(self._write_fd)
            self._write_fd = None

    def close(self) -> None:
        """
        Release the read descriptor, once no reader needs it.
        """
        self.discard()
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None


def _current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as error:
        if error.errno != errno.ENOENT:
            log.warn("could not remove {path}: {error}", path=path, error=error)

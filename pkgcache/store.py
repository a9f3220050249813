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
from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.filepath import FilePath, InsecurePath
from twisted.python.threadpool import ThreadPool

from pkgcache.paths import RESERVED_TOP_LEVEL_NAMES, CacheKey

SPOOL_DIR_NAME = ".pkgcache-spool"
assert SPOOL_DIR_NAME in RESERVED_TOP_LEVEL_NAMES

#: Threads for blocking disk work (spool writes, fsync).  Our own pool, so
#: that a slow disk cannot starve the reactor's, which resolves host names.
DISK_THREADS = 4

#: A hit refreshes a file's atime only when it is older than this, so a busy
#: file costs one ``utime`` an hour rather than one per request.
ATIME_RESOLUTION_SECONDS = 3600

log = Logger()


class CacheStore:
    """
    A cache directory: look up published files, create and sweep spools,
    and run the disk work that would block the reactor in threads.

    :param reactor: runs the disk threads' results back in its thread.
    """

    def __init__(self, cache_dir: FilePath, reactor) -> None:
        self.cache_dir = cache_dir
        self.spool_dir = cache_dir.child(SPOOL_DIR_NAME)
        self._reactor = reactor
        self._disk_threads: Optional[ThreadPool] = None
        #: Called with the size of each file published (for the cache limit).
        self.on_published: list[Callable[[int], None]] = []
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

    def in_disk_thread(self, function, *args) -> Deferred:
        """
        Run ``function(*args)`` in a disk thread; the result comes back in
        the reactor thread.
        """
        if self._disk_threads is None:
            self._disk_threads = ThreadPool(0, DISK_THREADS, name="pkgcache-disk")
            self._disk_threads.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.close)
        return deferToThreadPool(self._reactor, self._disk_threads, function, *args)

    def close(self) -> None:
        """Stop the disk threads (once the work given them is done)."""
        pool, self._disk_threads = self._disk_threads, None
        if pool is not None:
            pool.stop()

    def published(self, size: int) -> None:
        """A file of ``size`` bytes was just published."""
        for observer in list(self.on_published):
            observer(size)

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
        make the kernel's own atime useless for that, so we keep it.  Uses
        the times :meth:`lookup` already read: a hit costs no extra ``stat``.
        """
        try:
            now = time.time()
            if now - path.getAccessTime() >= ATIME_RESOLUTION_SECONDS:
                os.utime(path.path, (now, path.getModificationTime()))
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
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, self._file_mode)
            return Spool(name, fd, self.path_for(key), self.in_disk_thread)
        except BaseException:
            os.close(fd)
            _unlink_quietly(name)
            raise

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

    def __init__(self, name: str, fd: int, target: FilePath, in_disk_thread) -> None:
        self.name = name
        self.target = target
        self._write_fd: Optional[int] = fd
        self._read_fd: Optional[int] = os.open(name, os.O_RDONLY)
        self._in_disk_thread = in_disk_thread

    def write_all(self, chunks: list[bytes]) -> int:
        """
        Append ``chunks``.  Blocks: call it in a disk thread, one call at a
        time.

        :return: how many bytes were written (all of them).
        :raises OSError: on a write error (``ENOSPC``, ``EIO``...); the
            spool is then unusable and should be discarded.
        """
        assert self._write_fd is not None, "spool already closed for writing"
        total = 0
        for start in range(0, len(chunks), _IOV_MAX):
            views = [memoryview(chunk) for chunk in chunks[start : start + _IOV_MAX]]
            while views:
                written = os.writev(self._write_fd, views)
                total += written
                while views and written >= len(views[0]):
                    written -= len(views.pop(0))
                if views and written:
                    views[0] = views[0][written:]
        return total

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
                for attempt in range(2):
                    os.makedirs(parent, exist_ok=True)
                    try:
                        os.replace(name, target)
                        break
                    except FileNotFoundError:
                        # A cull may have removed the directory, just
                        # emptied, in between: make it again, once.
                        if attempt:
                            raise
                _fsync_directory(parent)
            except BaseException:
                _unlink_quietly(name)
                raise
            finally:
                # Closing the last write descriptor releases the flock.
                os.close(fd)

        return self._in_disk_thread(publish_in_thread)

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


#: How many buffers one ``writev`` may take (``IOV_MAX`` is 1024 on Linux).
_IOV_MAX = 512


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

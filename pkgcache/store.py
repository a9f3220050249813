"""
The on-disk cache: where published files live, how a spool is made, and
the threads that do the disk's blocking work.

Layout::

    CACHE_DIR/distfiles/ab/foo-1.2.tar.gz   published, complete
    CACHE_DIR/simple/foo/.pkgcache-index   the document of the URL /simple/foo/
    CACHE_DIR/.pkgcache-spool/<random>.foo-1.2.tar.gz   being downloaded

Spools live in a directory of the cache itself, so that publication is a
``rename`` within one filesystem (atomic, never a silent copy), and under a
name that :mod:`pkgcache.paths` refuses to serve; :mod:`pkgcache.spool`
writes and publishes them.

Every live spool holds an exclusive ``flock``: the start-up sweep removes
only spools nobody holds, so a second pkgcache process on the same cache
directory never removes the first one's downloads, while a crashed process's
spools (its locks died with it) are cleaned up.

A :class:`CacheStore` does nothing on its own when made: :meth:`open` (the
service calls it at start-up) makes the directories, sweeps and starts the
disk threads, and :meth:`close` stops them for good.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from pkgcache.metadata import EntryMetadata
from pkgcache.open_files import KeptFile, OpenFiles, kept_files_limit
from pkgcache.paths import RESERVED_TOP_LEVEL_NAMES, CacheKey, relative_path
from pkgcache.spool import DiskRunner, new_spool, sweep_stale_spools

SPOOL_DIR_NAME = ".pkgcache-spool"
assert SPOOL_DIR_NAME in RESERVED_TOP_LEVEL_NAMES

#: Threads for blocking disk work (spool writes, fsync, culling walks).  Our
#: own pool, so that a slow disk cannot starve the reactor's, which resolves
#: host names.
DISK_THREADS = 4

#: A hit refreshes a file's atime only when it is older than this, so a busy
#: file costs one ``utime`` an hour rather than one per request.
ATIME_RESOLUTION_SECONDS = 3600

#: The most bytes of the file's own name a spool's name keeps (for people
#: looking at the spool directory); the random prefix makes it unique.
SPOOL_NAME_BYTES = 64

log = Logger()


class StoreClosed(Exception):
    """The store was closed: nothing more is written or published."""


@dataclass
class CachedFile:
    """
    A published file, opened: whatever happens to its name afterwards (a
    cull, a newer copy renamed over it), this descriptor reads this file.
    """

    fd: int
    size: int
    mtime: float
    metadata: EntryMetadata
    #: The kept descriptor this reads (see :mod:`pkgcache.open_files`), if so.
    kept: Optional[KeptFile] = None

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        if self.kept is not None:
            self.kept.release()
        else:
            os.close(self.fd)


class CacheStore:
    """
    A cache directory: open published files, make and sweep spools, and
    run the disk work that would block the reactor in threads.

    :param reactor: runs the disk threads' results back in its thread.
    :param run_blocking: runs the disk work instead of a pool of threads
        (``run_blocking(function, *args)`` returns a Deferred of its
        result): tests that run in memory on a ``Clock`` do it at once.
    """

    def __init__(
        self, cache_dir: FilePath, reactor, run_blocking: Optional[DiskRunner] = None
    ) -> None:
        self.cache_dir = cache_dir
        self._root = cache_dir.path + os.sep
        self.spool_dir = cache_dir.child(SPOOL_DIR_NAME)
        self._reactor = reactor
        self._run_blocking = run_blocking
        self._disk_threads: Optional[ThreadPool] = None
        self._running = False
        self.closed = False
        #: Called with the size of each file published (for the cache limit).
        self.on_published: list[Callable[[int], None]] = []
        # mkstemp makes 0600 files; published files get the usual mode.
        self._file_mode = 0o666 & ~_current_umask()
        self._open_files = OpenFiles(kept_files_limit(), _record_access, self._close_unlinked)

    def create(self) -> None:
        """
        Make the cache and spool directories and check that we can write.

        :raises OSError: if the directory cannot be made or written to.
        """
        os.makedirs(self.spool_dir.path, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=self.spool_dir.path)
        probe.close()

    def open(self) -> None:
        """
        Get ready to serve: make the directories, remove the spools a
        crashed process left, start the disk threads.

        :raises OSError: if the cache directory cannot be used.
        """
        assert not self.closed, "a closed store cannot be opened again"
        self.create()
        self.sweep_stale_spools()
        if self._run_blocking is None:
            self._disk_threads = ThreadPool(0, DISK_THREADS, name="pkgcache-disk")
            self._disk_threads.start()
        self._running = True

    def close(self) -> "Deferred[None]":
        """
        Refuse any more disk work, and fire once the work already given to
        the disk threads is done and they have stopped (joined in a thread
        of their own: the reactor never waits for the disk).
        """
        self.closed = True
        self._running = False
        self._open_files.close()
        pool, self._disk_threads = self._disk_threads, None
        stopped: Deferred[None] = Deferred()
        if pool is None:
            stopped.callback(None)
            return stopped

        def stop_pool() -> None:
            pool.stop()
            self._reactor.callFromThread(stopped.callback, None)

        threading.Thread(target=stop_pool, name="pkgcache-disk-stop").start()
        return stopped

    @property
    def running(self) -> bool:
        """Opened, and not closed yet."""
        return self._running

    def _close_unlinked(self, fd: int) -> None:
        """Close a kept file that is unlinked (culled or replaced) in a
        disk thread: the close frees its blocks."""
        if not self._running:
            os.close(fd)
            return
        self.in_disk_thread(os.close, fd).addErrback(
            lambda failure: log.failure("could not close a culled file", failure)
        )

    def in_disk_thread(self, function, *args) -> Deferred:
        """
        Run ``function(*args)`` in a disk thread; the result comes back in
        the reactor thread.  Fails with :class:`StoreClosed` once closed,
        and before :meth:`open`.
        """
        if not self._running:
            return fail(StoreClosed("the cache is closed" if self.closed else "the cache is not open"))
        if self._run_blocking is not None:
            return self._run_blocking(function, *args)
        return deferToThreadPool(self._reactor, self._disk_threads, function, *args)

    def published(self, size: int) -> None:
        """A file of ``size`` bytes was just published."""
        for observer in list(self.on_published):
            observer(size)

    def area(self, *names: str) -> "StoreArea":
        """The tree ``CACHE_DIR/NAME/...`` of this store, as a store of its own."""
        return StoreArea(self, *names)

    def path_for(self, key: CacheKey) -> FilePath:
        """
        Where ``key`` is (or would be) published (see
        :func:`~pkgcache.paths.relative_path`: never outside the cache).
        """
        return FilePath(self._root + relative_path(key))

    def open_file(self, key: CacheKey, *, keep: bool = False) -> Optional[CachedFile]:
        """
        The published file for ``key``, opened, or ``None`` on a miss (also
        when a cull removes it just now: one ``open``, then ``fstat`` of the
        same descriptor, so there is no moment where it can vanish between
        a check and a read).

        :param keep: the file is immutable: a small one is kept open for
            the next hit (:mod:`pkgcache.open_files`), which then costs
            one ``fstat``.
        :raises IsADirectoryError: if ``key`` names a directory (never
            served: pkgcache serves regular files only).
        """
        return self._open_below("", key, keep)

    def _open_below(self, area: str, key: CacheKey, keep: bool) -> Optional[CachedFile]:
        """:meth:`open_file` of ``key`` in the tree ``area`` (``NAME/``, or "")."""
        # A path string, not a FilePath: a hit makes no abspath.
        path = self._root + area + relative_path(key)
        if keep:
            kept = self._open_files.get(path)
            if kept is not None:
                return CachedFile(kept.fd, kept.size, kept.mtime, kept.metadata, kept)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(str(key))
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                return None
            _record_access(fd, info)
            metadata = EntryMetadata.read(fd)
        except BaseException:
            os.close(fd)
            raise
        kept = self._open_files.keep(path, fd, info.st_size, info.st_mtime, metadata) if keep else None
        return CachedFile(fd, info.st_size, info.st_mtime, metadata, kept)

    def new_spool(self, key: CacheKey, *, shared: bool = False):
        """
        Create a locked spool file for a download of ``key``; with
        ``shared``, claim the one named by ``key``, or get a follower of
        the process that holds it (see :func:`pkgcache.spool.new_spool`).

        :raises OSError: if the spool directory is not writable.
        """
        return new_spool(
            self.spool_dir.path, self.cache_dir.path, self.path_for(key).path,
            self.in_disk_thread, self._file_mode, shared=shared,
        )

    def sweep_stale_spools(self) -> int:
        """
        Remove spools left behind by a crashed process (never one a live
        process holds: see :func:`pkgcache.spool.sweep_stale_spools`).

        :return: how many spools were removed.
        """
        return sweep_stale_spools(self.spool_dir.path)


def _record_access(fd: int, info: os.stat_result) -> None:
    """
    Set the file's atime to now, at most once an hour.

    Culling orders files by atime; ``noatime`` and ``relatime`` mounts make
    the kernel's own atime useless for that, so we keep it.  Uses the
    ``fstat`` the hit made already: a hit costs no extra system call.
    """
    now = time.time()
    if now - info.st_atime >= ATIME_RESOLUTION_SECONDS:
        try:
            os.utime(fd, ns=(time.time_ns(), info.st_mtime_ns))
        except OSError:
            pass  # a read-only cache still serves


def _current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


class StoreArea:
    """
    One mirror's tree in a shared store: ``CACHE_DIR/NAME/`` (or deeper:
    ``CACHE_DIR/NAME/files/``).  Keys are the mirror's own (``/dists/x``);
    the store sees them under ``NAME``.
    Opening, closing, the disk threads and the spool directory are the
    store's, shared by every area.
    """

    def __init__(self, store: CacheStore, *names: str) -> None:
        assert names and all(name and not name.startswith(".") and "/" not in name
                             for name in names)
        self.store = store
        self.names = names
        self._below = "".join(name + os.sep for name in names)

    def _key(self, key: CacheKey) -> CacheKey:
        return replace(key, segments=self.names + key.segments)

    def area(self, *names: str) -> "StoreArea":
        return StoreArea(self.store, *self.names, *names)

    @property
    def running(self) -> bool:
        return self.store.running

    @property
    def cache_dir(self) -> FilePath:
        return self.store.cache_dir.preauthChild("/".join(self.names))

    def path_for(self, key: CacheKey) -> FilePath:
        return self.store.path_for(self._key(key))

    def open_file(self, key: CacheKey, *, keep: bool = False) -> Optional[CachedFile]:
        return self.store._open_below(self._below, key, keep)

    def new_spool(self, key: CacheKey, *, shared: bool = False):
        return self.store.new_spool(self._key(key), shared=shared)

    def in_disk_thread(self, function, *args) -> Deferred:
        return self.store.in_disk_thread(function, *args)

    def published(self, size: int) -> None:
        self.store.published(size)

    def close(self) -> "Deferred[None]":
        return self.store.close()

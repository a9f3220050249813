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

:func:`new_spool` makes spools.  A private one has a random name: a
revalidation's, which no other process follows.  A shared one is named by
its key, and is claimed: the process that gets its ``flock`` downloads the
file, and any other process asking for it meanwhile gets a
:class:`~pkgcache.shared_spool.SpoolFollower` of it instead, so that one
cache directory makes one download per file, however many processes serve
it.  A writer of a shared spool keeps a record on it for its followers
(:meth:`SpoolWriter.mark`), written in turn with the bytes.

Every live spool holds an exclusive ``flock`` on itself until it is
committed or discarded, so :func:`sweep_stale_spools` removes only those
nobody holds: a crashed process's (its locks died with it), never another
live process's.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
import time
from typing import Callable, Optional, Union

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from pkgcache.metadata import EntryMetadata
from pkgcache.shared_spool import SpoolFollower, remove_record, set_record

#: How many buffers one ``writev`` may take (``IOV_MAX`` is 1024 on Linux).
_IOV_MAX = 512
#: The most bytes of the file's own name a spool's name keeps (for people
#: looking at the spool directory); the prefix makes it unique.
SPOOL_NAME_BYTES = 64
#: How many times a claim starts again when the spool's name changes under
#: it (another process published, removed or took over the spool meanwhile).
CLAIM_ATTEMPTS = 10

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
    :ivar shared: named by its key, for other processes to follow.
    """

    def __init__(
        self,
        name: str,
        fd: int,
        target: str,
        run_in_disk_thread: DiskRunner,
        *,
        shared: bool = False,
    ) -> None:
        self.name = name
        self.target = target
        self.shared = shared
        self._write_fd: Optional[int] = fd
        read_fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        if not os.path.sameopenfile(read_fd, fd):
            os.close(read_fd)
            raise FileNotFoundError(errno.ENOENT, "the spool was replaced", name)
        self._read_fd: Optional[int] = read_fd
        self._run = run_in_disk_thread
        self._pending: list[bytes] = []
        self._record: Optional[bytes] = None
        self._marked = False
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

    def mark(self, record: bytes) -> None:
        """
        Put ``record`` (a :class:`~pkgcache.shared_spool.SpoolRecord`,
        encoded) on the spool for its followers, after the bytes queued so
        far; returns at once.  A newer record replaces one still waiting.
        """
        if self._write_fd is None:
            return
        self._record = record
        self._marked = True
        self._write_pending()

    @property
    def locked(self) -> bool:
        """It still holds its lock (neither committed nor discarded yet)."""
        return self._write_fd is not None

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
        await self._run(_commit, fd, self.name, self.target, mtime, metadata, self._marked)
        self.committed = True

    async def discard(self, record: Optional[bytes] = None) -> None:
        """
        Stop writing and remove the spool's name, unless it was committed;
        waits for a write under way (its descriptor is closed after it).

        :param record: the last word for followers (why it failed), put on
            the spool before its name goes and its lock is released.
        """
        self._pending.clear()
        if record is not None:
            self.mark(record)
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
        """Start the next disk job, if none is under way: bytes first, then the record."""
        if self._writing is not None or self._write_fd is None:
            return
        if self._pending:
            chunks, self._pending = self._pending, []
            self._writing = self._run(_write_all, self._write_fd, chunks)
            self._writing.addCallbacks(self._written, self._write_failed)
        elif self._record is not None:
            record, self._record = self._record, None
            self._writing = self._run(set_record, self._write_fd, record)
            self._writing.addCallbacks(self._record_set, self._record_failed)

    def _record_set(self, _) -> None:
        self._writing = None
        self._write_pending()

    def _record_failed(self, failure) -> None:
        # Followers then wait for what comes next, or fetch on their own:
        # nothing here depends on it (and at shutdown the store refuses).
        self._writing = None
        log.info(
            "could not record the download of {target} for other processes: {error}",
            target=self.target, error=failure.getErrorMessage(),
        )
        self._write_pending()

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
        self._write_pending()  # a record may still be waiting

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


def _commit(
    fd: int, name: str, target: str, mtime: float, metadata: EntryMetadata, recorded: bool
) -> None:
    """The blocking half of :meth:`SpoolWriter.commit` (disk thread only)."""
    renamed = False
    try:
        os.fsync(fd)
        os.utime(fd, (time.time(), mtime))
        metadata.write(fd)
        parent = os.path.dirname(target)
        for attempt in range(2):
            os.makedirs(parent, exist_ok=True)
            try:
                os.replace(name, target)
                renamed = True
                break
            except FileNotFoundError:
                # A cull may have removed the directory, just emptied, in
                # between: make it again, once.
                if attempt:
                    raise
        if recorded:
            # Followers know it was published by its new name; the record
            # (which said complete, should the rename have failed) goes.
            remove_record(fd)
        _fsync_directory(parent)
    except BaseException:
        if not renamed:
            # (Once renamed, the name may be another download's already.)
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


def new_spool(
    spool_dir: str,
    cache_dir: str,
    target: str,
    run_in_disk_thread: DiskRunner,
    mode: int,
    *,
    shared: bool = False,
) -> Union[SpoolWriter, SpoolFollower]:
    """
    A locked spool in ``spool_dir`` for a download of the file to be
    published at ``target`` (below ``cache_dir``).

    :param mode: the published file's mode.
    :param shared: name it by ``target``, and claim it: if another
        process holds that spool (it is downloading the same file), return
        a :class:`~pkgcache.shared_spool.SpoolFollower` of its download
        instead.  A spool nobody holds was left by a process that died: it
        is taken over (replaced by a new one under the same name, in one
        ``rename``, so that no two processes ever download into it).
    :raises OSError: if the spool directory is not writable.
    """
    try:
        return _new_spool(spool_dir, cache_dir, target, run_in_disk_thread, mode, shared)
    except FileNotFoundError:
        # The spool directory went (removed by hand), or the spool was
        # replaced as it was opened: make the directory again if need be,
        # and try once more.
        os.makedirs(spool_dir, exist_ok=True)
        return _new_spool(spool_dir, cache_dir, target, run_in_disk_thread, mode, shared)


def _new_spool(
    spool_dir: str, cache_dir: str, target: str, run_in_disk_thread: DiskRunner, mode: int,
    shared: bool,
) -> Union[SpoolWriter, SpoolFollower]:
    name_part = _name_part(target)
    if not shared:
        fd, name = tempfile.mkstemp(prefix="", suffix="." + name_part, dir=spool_dir)
        return _locked_writer(fd, name, target, run_in_disk_thread, mode, shared=False)
    path = shared_spool_path(spool_dir, cache_dir, target)
    for _ in range(CLAIM_ATTEMPTS):
        claimed = _claim(path, target, run_in_disk_thread, mode)
        if claimed is not None:
            return claimed
    raise OSError(errno.EAGAIN, "the spool kept changing while it was claimed", path)


def shared_spool_path(spool_dir: str, cache_dir: str, target: str) -> str:
    """
    The name of the shared spool of ``target``: the SHA-256 of its path
    below ``cache_dir`` (so that every mirror's tree, and every spelling
    of the cache directory, names one file by one spool), then some of its
    name for people.
    """
    digest = hashlib.sha256(
        os.path.relpath(target, cache_dir).encode("utf-8", "surrogateescape")
    ).hexdigest()
    return os.path.join(spool_dir, f"{digest}.{_name_part(target)}")


def _name_part(target: str) -> str:
    # Cut by bytes, at a character boundary: a legal 255-byte name of
    # 4-byte characters would otherwise make an illegal spool name.
    name = os.path.basename(target).lstrip(".")
    return name.encode("utf-8", "surrogateescape")[:SPOOL_NAME_BYTES].decode("utf-8", "ignore")


def _claim(
    path: str, target: str, run_in_disk_thread: DiskRunner, mode: int
) -> Union[SpoolWriter, SpoolFollower, None]:
    """
    One try at :func:`new_spool`'s claim of the shared spool ``path``.

    :return: ``None`` if the name changed under it: try again.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        pass
    else:
        if not _try_lock(fd):
            # Another process opened it as it appeared, and locked it first.
            return SpoolFollower(fd, path)
        if not _still_named(path, fd):
            # Swept (unlocked, it looked stale) before we locked it.
            os.close(fd)
            return None
        return _locked_writer(fd, path, target, run_in_disk_thread, mode, shared=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # published or removed just now
    if not _try_lock(fd):
        return SpoolFollower(fd, path)
    try:
        if not _still_named(path, fd):
            return None
        log.info("taking over the spool of {target}: the process downloading it is gone",
                 target=target)
        return _take_over(path, target, run_in_disk_thread, mode)
    finally:
        # Only now: until its name is another spool's, holding this lock
        # keeps every other process from taking it over too.
        os.close(fd)


def _take_over(
    path: str, target: str, run_in_disk_thread: DiskRunner, mode: int
) -> Optional[SpoolWriter]:
    """A new spool, locked, renamed over the stale one at ``path``."""
    directory, name = os.path.split(path)
    fd, temporary = tempfile.mkstemp(prefix=name + ".", suffix=".new", dir=directory)
    try:
        if not _try_lock(fd):
            raise BlockingIOError(errno.EWOULDBLOCK, "locked by a sweep", temporary)
        os.fchmod(fd, mode)
        os.rename(temporary, path)
    except OSError:
        # A sweep took the new name for a stale one before we locked it.
        os.close(fd)
        _unlink_quietly(temporary)
        return None
    return _locked_writer(fd, path, target, run_in_disk_thread, mode, shared=True)


def _locked_writer(
    fd: int, name: str, target: str, run_in_disk_thread: DiskRunner, mode: int, *, shared: bool
) -> SpoolWriter:
    try:
        if not shared:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # mkstemp makes 0600 files, O_CREAT applies the umask: published
        # files get the usual mode.
        os.fchmod(fd, mode)
        return SpoolWriter(name, fd, target, run_in_disk_thread, shared=shared)
    except BaseException:
        if _still_named(name, fd):
            _unlink_quietly(name)
        os.close(fd)
        raise


def sweep_stale_spools(spool_dir: str) -> int:
    """
    Remove the spools nobody holds: left by processes that died.

    A spool whose lock is held belongs to a live process (maybe another
    pkgcache on the same directory) and is left alone; one is removed only
    while the sweep holds its lock, and only if its name is still that
    file's (not a new spool made under the name meanwhile).

    :return: how many spools were removed.
    """
    removed = 0
    try:
        names = os.listdir(spool_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        path = os.path.join(spool_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if _try_lock(fd) and _still_named(path, fd):
                os.unlink(path)
                removed += 1
        except OSError as error:
            log.warn("could not remove the stale spool {path}: {error}", path=path, error=error)
        finally:
            os.close(fd)
    if removed:
        log.info(
            "removed {count} stale spool files from {spool_dir}",
            count=removed,
            spool_dir=spool_dir,
        )
    return removed


def _try_lock(fd: int) -> bool:
    """Take the exclusive ``flock`` of ``fd`` if nobody holds it (never waits)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _still_named(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    info = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (info.st_dev, info.st_ino)

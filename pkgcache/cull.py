"""
Culling the cache: remove the least recently used files.

The last access of a cached file is its atime, which
:meth:`pkgcache.store.CacheStore.record_access` keeps up to date itself
(``noatime`` and ``relatime`` mounts would not), so everything here orders
files by atime and agrees with ``find CACHE_DIR -atime +30``.

What a cull removes: first every file not accessed for more than the
maximum age; then, if what is left is larger than the maximum size, more
files, least recently used first (equal atimes in path order), until what
is left is at most :data:`TARGET_PERCENT` of it.

Culling is safe while pkgcache serves the same directory:

- the spool directory (and every other name the store reserves at the top
  of the cache) is never entered, so downloads in progress are untouched;
- files are only ever unlinked, never truncated or rewritten: a client
  still reading a culled file holds it open and gets all of it;
- a file or directory that disappears meanwhile (another cull, a
  concurrent sweep) is not an error; a file used since the cull began (its
  atime is later than that moment, or later than when the cull looked at
  it) is kept; and directories are removed with ``rmdir``, which refuses a
  directory that a concurrent publication has just put a file into.

Memory stays bounded whatever the number of files, since no list of them is
ever made; the walks hold one open directory per level of depth:

1. A first walk sums the sizes and fills a histogram of atimes with
   :data:`HISTOGRAM_BUCKETS` buckets, each about 0.7% of its age wide (a
   bucket of files last used 10 days ago spans 1.6 hours).  Counting the
   bytes bucket by bucket from the oldest gives the *boundary bucket*:
   everything older goes, everything newer stays, and only part of it is
   needed.  If it holds more than :data:`BOUNDARY_FILES` files, another walk
   splits just that bucket into as many linear buckets, and so on: each
   walk narrows the boundary :data:`HISTOGRAM_BUCKETS` times, so even a
   million files all used within the same second need one or two more.  A
   cull with nothing to remove ends after the first walk.
2. A last walk removes, as it meets them, the files older than the
   boundary bucket (and those over the maximum age), and keeps the
   boundary bucket's files (at most :data:`BOUNDARY_FILES`) aside; after
   it, those are removed oldest first until the bytes still needed are
   freed.

The choice is then exactly the one a sort of every file would make, with
one approximation: when more than :data:`BOUNDARY_FILES` files share the
boundary's atime to the nanosecond (a restore that set them all alike),
they go in the order of the walk, not of their paths.  The *order* of
removal is not least recently used first, except within the boundary
bucket: the last walk removes files in the directories' own order (sorting a
directory would hold all of its names in memory).  The plan is made from
what the walks saw, as any plan is: bytes published meanwhile are for the
next cull.

The library functions block on the disk for as long as the walks take: the
server calls :func:`cull` in a worker thread, and tells it to stop with an
event.  ``pkgcache-cull`` (:mod:`pkgcache.cull_cli`) is the same thing for
cron jobs and systemd timers.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Literal, Optional, Sequence, Union

from pkgcache.paths import RESERVED_TOP_LEVEL_NAMES

#: A cull over the size limit goes down to this percentage of it, so that it
#: does not have to run again as soon as the next file is published.
TARGET_PERCENT = 90

SECONDS_PER_DAY = 86400
NANOSECONDS_PER_SECOND = 10**9

#: Buckets of each histogram of atimes: about half a MiB of counters and
#: edges, whatever the number of files.
HISTOGRAM_BUCKETS = 4096
#: The most files of the boundary bucket the last walk keeps in memory (a
#: few hundred bytes each); a fuller bucket is split by one more walk.
BOUNDARY_FILES = 10_000
#: The first histogram's buckets cover ages from 1 s to 2**40 s (35,000
#: years) at a constant ratio; older atimes share the oldest bucket.
_OLDEST_AGE_OCTAVES = 40

Stage = Literal["scanning", "removing"]
#: ``progress(stage, done, total)``, called as each walk begins (``done``
#: 0) and after each file: ``total`` is ``None`` during the first walk,
#: which cannot know how many files it will find.
ProgressCallback = Callable[[Stage, int, Optional[int]], None]
#: ``on_remove(entry, error)``: ``error`` is ``None`` when the file was
#: removed (or, in a dry run, would be), the ``OSError`` when it could not be.
RemoveCallback = Callable[["CacheEntry", Optional[OSError]], None]


class CullStopped(Exception):
    """
    :func:`cull` was told to stop (its ``stop`` event was set) before it
    was done; what it removed until then is removed.
    """


@dataclass(frozen=True)
class CacheEntry:
    """
    A published file found in the cache.

    :ivar path: the file's path: the cache directory joined with its name.
    :ivar size: its size in bytes (``st_size``).
    :ivar atime_ns: its last access, in nanoseconds since the epoch
        (``st_atime_ns``: exact, so that equal atimes compare equal).
    """

    path: str
    size: int
    atime_ns: int


@dataclass(frozen=True)
class CullReport:
    """
    What a cull did (or, in a dry run, would do).

    Files that vanished while the cull ran (removed by someone else) count
    neither as removed nor as left.

    :ivar removed_files: files removed.
    :ivar removed_bytes: bytes freed by removing them.
    :ivar left_files: files still in the cache: those not chosen for
        removal, those used since the cull looked at them (kept) and
        ``failed_files``.
    :ivar left_bytes: their total size.
    :ivar failed_files: files that should have been removed but could not
        be (``on_remove`` was told why).
    :ivar dry_run: whether nothing was actually removed.
    """

    removed_files: int
    removed_bytes: int
    left_files: int
    left_bytes: int
    failed_files: int
    dry_run: bool


def scan_cache(cache_dir: Union[str, "os.PathLike[str]"]) -> Iterator[CacheEntry]:
    """
    Find every published file under ``cache_dir``.

    Names the store reserves at the top of the cache (its spool directory)
    are not entered; symbolic links are neither followed nor reported,
    since pkgcache never makes any and removing a link would free nothing;
    a file or directory that vanishes during the walk is skipped.  Entries
    come depth first, in each directory's own order, which stays the same
    while the directory does not change: not sorted, since sorting would
    hold a whole directory in memory.

    :raises OSError: if ``cache_dir`` itself cannot be read, or a
        directory in it cannot (a permission problem is the
        administrator's to see, not to be hidden).
    """
    root = os.path.normpath(os.fspath(cache_dir))
    # One open directory per level: the walk's whole memory.
    open_directories = [os.scandir(root)]
    try:
        while open_directories:
            child = next(open_directories[-1], None)
            if child is None:
                open_directories.pop().close()
                continue
            if len(open_directories) == 1 and child.name in RESERVED_TOP_LEVEL_NAMES:
                continue
            try:
                if child.is_dir(follow_symlinks=False):
                    open_directories.append(os.scandir(child.path))
                elif child.is_file(follow_symlinks=False):
                    status = child.stat(follow_symlinks=False)
                    yield CacheEntry(child.path, status.st_size, status.st_atime_ns)
            except FileNotFoundError:
                continue
    finally:
        for directory in open_directories:
            directory.close()


#: ``walk(stage, total)``: a new walk of the same files.
_Walk = Callable[[Stage, Optional[int]], Iterable[CacheEntry]]


@dataclass(frozen=True)
class _Buckets:
    """
    Consecutive ranges of atimes: ``[start, inner[0])``, ``[inner[0],
    inner[1])`` ... ``[inner[-1], end)``; ``start`` ``None`` leaves the
    first one open below.
    """

    start: Optional[int]
    inner: Sequence[int]
    end: int

    @classmethod
    def by_age(cls, now_ns: int) -> _Buckets:
        """Buckets as wide as a constant fraction of their age, up to ``now_ns``."""
        octaves_per_bucket = _OLDEST_AGE_OCTAVES / HISTOGRAM_BUCKETS
        ages = (
            round(NANOSECONDS_PER_SECOND * 2 ** (index * octaves_per_bucket))
            for index in range(HISTOGRAM_BUCKETS - 1, 0, -1)
        )
        return cls(None, [now_ns - age for age in ages], now_ns)

    @classmethod
    def linear(cls, start: int, end: int) -> _Buckets:
        """Buckets of equal widths, one nanosecond at least."""
        width = -(-(end - start) // HISTOGRAM_BUCKETS)
        # A range, not a list: bisect reads it just as well.
        return cls(start, range(start + width, end, width), end)

    def __len__(self) -> int:
        return len(self.inner) + 1

    def index(self, atime_ns: int) -> Optional[int]:
        """The bucket ``atime_ns`` falls in, ``None`` if outside them all."""
        if atime_ns >= self.end or (self.start is not None and atime_ns < self.start):
            return None
        return bisect_right(self.inner, atime_ns)

    def bounds(self, index: int, oldest_ns: int) -> tuple[int, int]:
        """
        Bucket ``index``'s range; ``oldest_ns``, the oldest atime in it,
        closes an open first bucket.
        """
        if index == 0:
            start = oldest_ns if self.start is None else self.start
        else:
            start = self.inner[index - 1]
        end = self.inner[index] if index < len(self.inner) else self.end
        return start, end


@dataclass
class _Survey:
    """What one walk found: totals, and a histogram of the files in ``buckets``."""

    buckets: _Buckets
    files: int = 0
    bytes: int = 0
    aged_files: int = 0
    aged_bytes: int = 0
    #: Files and bytes in each bucket.
    counts: list[int] = field(init=False)
    sizes: list[int] = field(init=False)
    #: The oldest atime in the buckets (their end while they are empty).
    oldest_ns: int = field(init=False)

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)
        self.sizes = [0] * len(self.buckets)
        self.oldest_ns = self.buckets.end

    def boundary(self, needed: int) -> Optional[tuple[int, int]]:
        """
        The first bucket that brings the bytes counted from the oldest to
        ``needed``, and how many of its bytes are needed; ``None`` if all
        of them are not enough.
        """
        below = 0
        for index, size in enumerate(self.sizes):
            if below + size >= needed:
                return index, needed - below
            below += size
        return None


def _survey(
    entries: Iterable[CacheEntry], buckets: _Buckets, aged_before: Optional[int]
) -> _Survey:
    """Count ``entries``: all of them, those aged, and the others by bucket."""
    survey = _Survey(buckets)
    for entry in entries:
        survey.files += 1
        survey.bytes += entry.size
        atime = entry.atime_ns
        if aged_before is not None and atime < aged_before:
            survey.aged_files += 1
            survey.aged_bytes += entry.size
            continue
        index = buckets.index(atime)
        if index is None:
            continue
        survey.counts[index] += 1
        survey.sizes[index] += entry.size
        survey.oldest_ns = min(survey.oldest_ns, atime)
    return survey


@dataclass(frozen=True)
class _Plan:
    """
    Which files a cull removes, decided by atime alone.

    :ivar survey: what the first walk found.
    :ivar remove_before: files accessed before this go, ``None`` if none.
    :ivar boundary_end: files accessed from ``remove_before`` to before this
        are the boundary bucket, ``None`` if there is none.
    :ivar boundary_bytes: how many of the boundary's bytes go, oldest first.
    :ivar stream_boundary: whether the boundary is one atime, shared by too
        many files to keep aside: they go in the order of the walk.
    """

    survey: _Survey
    remove_before: Optional[int] = None
    boundary_end: Optional[int] = None
    boundary_bytes: int = 0
    stream_boundary: bool = False


def _plan(
    walk: _Walk, max_size: Optional[int], max_age_ns: Optional[int], now_ns: int
) -> _Plan:
    """
    Walk the files once, and again as long as the boundary bucket is too
    full to keep aside (see the module's docstring).

    Files accessed at ``now_ns`` or later are never chosen: they were used
    since the cull began, or their atime is in the future (a clock set
    back), which is as recent as it gets.
    """
    if (max_size is not None and max_size < 0) or (max_age_ns is not None and max_age_ns < 0):
        raise ValueError("max_size and max_age cannot be negative")
    aged_before = None if max_age_ns is None else now_ns - max_age_ns
    buckets = _Buckets.by_age(now_ns)
    first = survey = _survey(walk("scanning", None), buckets, aged_before)
    plan = _Plan(first, remove_before=aged_before if first.aged_files else None)
    left = first.bytes - first.aged_bytes
    if max_size is None or left <= max_size:
        return plan
    needed = left - max_size * TARGET_PERCENT // 100
    while True:
        found = survey.boundary(needed)
        if found is None:
            # Even all of them are not enough: the files used since the
            # cull began are over the target on their own (or the boundary
            # bucket lost files since it was counted).  Every older one goes.
            return replace(plan, remove_before=_latest(aged_before, buckets.end))
        index, needed = found
        start, end = buckets.bounds(index, survey.oldest_ns)
        too_many = survey.counts[index] > BOUNDARY_FILES
        if not too_many or end - start == 1:
            return replace(
                plan,
                remove_before=_latest(aged_before, start),
                boundary_end=end,
                boundary_bytes=needed,
                stream_boundary=too_many,
            )
        buckets = _Buckets.linear(start, end)
        survey = _survey(walk("scanning", first.files), buckets, aged_before)


def _latest(aged_before: Optional[int], atime_ns: int) -> int:
    return atime_ns if aged_before is None else max(aged_before, atime_ns)


def _lru_order(entry: CacheEntry) -> tuple[int, str]:
    return entry.atime_ns, entry.path


def _choose(plan: _Plan, entries: Iterable[CacheEntry]) -> Iterator[CacheEntry]:
    """
    The entries ``plan`` removes, in the order to remove them: each one
    older than the boundary as the walk meets it, then the boundary's.
    """
    if plan.remove_before is None:
        return
    budget = plan.boundary_bytes
    boundary: list[CacheEntry] = []
    for entry in entries:
        if entry.atime_ns < plan.remove_before:
            yield entry
        elif plan.boundary_end is not None and entry.atime_ns < plan.boundary_end:
            if not plan.stream_boundary:
                boundary.append(entry)
                # Only if the cache changed since the survey counted the
                # bucket: the newest of the surplus are kept.
                if len(boundary) >= 2 * BOUNDARY_FILES:
                    boundary.sort(key=_lru_order)
                    del boundary[BOUNDARY_FILES:]
            elif budget > 0:
                budget -= entry.size
                yield entry
    boundary.sort(key=_lru_order)
    for entry in boundary:
        if budget <= 0:
            return
        budget -= entry.size
        yield entry


def plan_cull(
    entries: Sequence[CacheEntry],
    max_size: Optional[int] = None,
    max_age_ns: Optional[int] = None,
    *,
    now_ns: int,
) -> list[CacheEntry]:
    """
    Choose the files to remove, as :func:`cull` would: first every file not
    accessed for more than ``max_age_ns``; then, if what is left is larger
    than ``max_size``, more files, least recently used first, until what is
    left is at most :data:`TARGET_PERCENT` of ``max_size``.  Files accessed
    at the same time go in path order (as far as memory allows: see the
    module's docstring), so the same cache always gives the same plan.

    :param now_ns: the time ages are counted from (a parameter, so that the
        plan depends on its arguments alone).
    :return: the files to remove, least recently used first.
    :raises ValueError: if ``max_size`` or ``max_age_ns`` is negative.
    """
    plan = _plan(lambda stage, total: entries, max_size, max_age_ns, now_ns)
    return sorted(_choose(plan, entries), key=_lru_order)


def cull(
    cache_dir: Union[str, "os.PathLike[str]"],
    max_size: Optional[int] = None,
    max_age_days: Optional[float] = None,
    *,
    dry_run: bool = False,
    progress: Optional[ProgressCallback] = None,
    on_remove: Optional[RemoveCallback] = None,
    stop: Optional[threading.Event] = None,
) -> CullReport:
    """
    Remove the least recently used files of ``cache_dir`` (see
    :func:`plan_cull`), and the directories that leaves empty.

    Blocks for as long as the walks of the whole cache take: call it in a
    worker thread.  The callbacks are called in the calling thread.

    A file that cannot be removed (permissions, say) is reported through
    ``on_remove`` and counted in :attr:`CullReport.failed_files`, and the
    cull goes on: one stubborn old file must not stop every later cull
    from keeping the cache within its limit.

    :param max_size: the size limit in bytes, ``None`` for no limit.
    :param max_age_days: remove files not accessed for longer than this,
        ``None`` to keep files of any age.
    :param dry_run: remove nothing; report (and call ``on_remove`` for)
        what would be removed.
    :param progress: called as each walk begins and after each file.
    :param on_remove: called for each file removed, would be removed or
        that could not be removed.
    :param stop: once set (from any thread), the cull stops before the next
        file.
    :raises CullStopped: if ``stop`` was set.
    :raises OSError: if the cache directory, or a directory in it, cannot
        be read.
    :raises ValueError: if ``max_size`` or ``max_age_days`` is negative.
    """
    root = os.path.normpath(os.fspath(cache_dir))
    max_age_ns = (
        None
        if max_age_days is None
        else round(max_age_days * SECONDS_PER_DAY * NANOSECONDS_PER_SECOND)
    )
    walk = _Walks(root, progress, stop)
    plan = _plan(walk, max_size, max_age_ns, time.time_ns())
    if plan.remove_before is None:
        # Nothing to remove: the first walk counted what is left.
        return CullReport(0, 0, plan.survey.files, plan.survey.bytes, 0, dry_run)

    removed_files = removed_bytes = failed_files = vanished_files = vanished_bytes = 0
    for entry in _choose(plan, walk("removing", plan.survey.files)):
        walk.check_stop()
        try:
            removed = dry_run or _remove(entry, root)
        except FileNotFoundError:
            vanished_files += 1
            vanished_bytes += entry.size
        except OSError as error:
            failed_files += 1
            if on_remove is not None:
                on_remove(entry, error)
        else:
            if removed:
                removed_files += 1
                removed_bytes += entry.size
                if on_remove is not None:
                    on_remove(entry, None)
    return CullReport(
        removed_files=removed_files,
        removed_bytes=removed_bytes,
        left_files=walk.files - removed_files - vanished_files,
        left_bytes=walk.bytes - removed_bytes - vanished_bytes,
        failed_files=failed_files,
        dry_run=dry_run,
    )


class _Walks:
    """
    New walks of one cache directory (a :data:`_Walk`), each reporting its
    progress and stopping when told to; the files and bytes of the latest
    one are counted.
    """

    def __init__(
        self,
        root: str,
        progress: Optional[ProgressCallback],
        stop: Optional[threading.Event],
    ) -> None:
        self._root = root
        self._progress = progress
        self._stop = stop
        self.files = self.bytes = 0

    def __call__(self, stage: Stage, total: Optional[int]) -> Iterator[CacheEntry]:
        self.files = self.bytes = 0
        if self._progress is not None:
            self._progress(stage, 0, total)
        for entry in scan_cache(self._root):
            self.check_stop()
            self.files += 1
            self.bytes += entry.size
            yield entry
            if self._progress is not None:
                self._progress(stage, self.files, total)

    def check_stop(self) -> None:
        """:raises CullStopped: if the cull was told to stop."""
        if self._stop is not None and self._stop.is_set():
            raise CullStopped()


def _remove(entry: CacheEntry, root: str) -> bool:
    """
    Unlink ``entry``'s file, then the directories that leaves empty.

    :return: ``False`` if the file was kept because it was used since the
        walk found it: a walk of a large cache takes minutes, and a file a
        client has just asked for is no longer the least recently used.
    :raises FileNotFoundError: if it is gone already.
    :raises OSError: if it cannot be removed.
    """
    if os.lstat(entry.path).st_atime_ns > entry.atime_ns:
        return False
    os.unlink(entry.path)
    parent = os.path.dirname(entry.path)
    # Every path the walk found is the root joined with more names, so this
    # stops at the root and never removes it.  The walk may still be
    # reading a directory removed here: it then just finds nothing more.
    while len(parent) > len(root):
        try:
            os.rmdir(parent)
        except OSError:
            # Not empty (maybe a file was just published into it, or the
            # walk has yet to reach the rest) or gone already: either way,
            # its parents stay too.
            return True
        parent = os.path.dirname(parent)
    return True

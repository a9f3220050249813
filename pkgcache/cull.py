"""
Culling the cache: remove the least recently used files.

The last access of a cached file is its atime, which
:meth:`pkgcache.store.CacheStore.record_access` keeps up to date itself
(``noatime`` and ``relatime`` mounts would not), so everything here orders
files by atime and agrees with ``find CACHE_DIR -atime +30``.

Culling is safe while pkgcache serves the same directory:

- the spool directory (and every other name the store reserves at the top
  of the cache) is never entered, so downloads in progress are untouched;
- files are only ever unlinked, never truncated or rewritten: a client
  still reading a culled file holds it open and gets all of it;
- a file or directory that disappears meanwhile (another cull, a
  concurrent sweep) is not an error, a file used since the scan is kept,
  and directories are removed with ``rmdir``, which refuses a directory
  that a concurrent publication has just put a file into.

The library functions block on the disk for as long as the walk takes: the
server calls :func:`cull` in a worker thread.  ``pkgcache-cull`` (:func:`main`)
is the same thing for cron jobs and systemd timers.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import (
    Callable,
    Iterable,
    Iterator,
    Literal,
    NoReturn,
    Optional,
    Sequence,
    TextIO,
    Union,
)

from pkgcache.paths import RESERVED_TOP_LEVEL_NAMES
from pkgcache.sizes import format_size, parse_size
from pkgcache.store import SPOOL_DIR_NAME

#: A cull over the size limit goes down to this percentage of it, so that it
#: does not have to run again as soon as the next file is published.
TARGET_PERCENT = 90

SECONDS_PER_DAY = 86400

Stage = Literal["scanning", "removing"]
#: ``progress(stage, done, total)``: ``total`` is ``None`` while scanning,
#: since the walk cannot know how many files it will find.
ProgressCallback = Callable[[Stage, int, Optional[int]], None]
#: ``on_remove(entry, error)``: ``error`` is ``None`` when the file was
#: removed (or, in a dry run, would be), the ``OSError`` when it could not be.
RemoveCallback = Callable[["CacheEntry", Optional[OSError]], None]


@dataclass(frozen=True)
class CacheEntry:
    """
    A published file found in the cache.

    :ivar path: the file's path: the cache directory joined with its name.
    :ivar size: its size in bytes (``st_size``).
    :ivar atime: its last access, in seconds since the epoch.
    """

    path: str
    size: int
    atime: float


@dataclass(frozen=True)
class CullReport:
    """
    What a cull did (or, in a dry run, would do).

    Files that vanished while the cull ran (removed by someone else) count
    neither as removed nor as left.

    :ivar removed_files: files removed.
    :ivar removed_bytes: bytes freed by removing them.
    :ivar left_files: files still in the cache: those not planned for
        removal, those used since the scan (kept) and ``failed_files``.
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
    come in a stable order (sorted by name, directory by directory).

    :raises OSError: if ``cache_dir`` itself cannot be read, or a
        directory in it cannot (a permission problem is the
        administrator's to see, not to be hidden).
    """
    root = os.path.normpath(os.fspath(cache_dir))
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as iterator:
                children = sorted(iterator, key=lambda child: child.name)
        except FileNotFoundError:
            if directory == root:
                raise
            continue
        subdirectories = []
        for child in children:
            if directory == root and child.name in RESERVED_TOP_LEVEL_NAMES:
                continue
            try:
                if child.is_dir(follow_symlinks=False):
                    subdirectories.append(child.path)
                elif child.is_file(follow_symlinks=False):
                    status = child.stat(follow_symlinks=False)
                    yield CacheEntry(child.path, status.st_size, status.st_atime)
            except FileNotFoundError:
                continue
        # Reversed, so that the stack pops them in name order.
        pending.extend(reversed(subdirectories))


def plan_cull(
    entries: Iterable[CacheEntry],
    max_size: Optional[int] = None,
    max_age_seconds: Optional[float] = None,
    *,
    now: float,
) -> list[CacheEntry]:
    """
    Choose the files to remove, least recently used first.

    First every file not accessed for more than ``max_age_seconds``; then,
    if what is left is larger than ``max_size``, more files in the same
    order until what is left is at most :data:`TARGET_PERCENT` of
    ``max_size``.  Files accessed at the same time go in path order, so the
    same cache always gives the same plan.

    :param now: the time ages are counted from (a parameter, so that the
        plan depends on its arguments alone).
    :return: the files to remove, in the order to remove them.
    :raises ValueError: if ``max_size`` or ``max_age_seconds`` is negative.
    """
    if (max_size is not None and max_size < 0) or (
        max_age_seconds is not None and max_age_seconds < 0
    ):
        raise ValueError("max_size and max_age_seconds cannot be negative")
    ordered = sorted(entries, key=lambda entry: (entry.atime, entry.path))
    count = 0
    if max_age_seconds is not None:
        while count < len(ordered) and now - ordered[count].atime > max_age_seconds:
            count += 1
    if max_size is not None:
        left = sum(entry.size for entry in ordered[count:])
        if left > max_size:
            target = max_size * TARGET_PERCENT // 100
            while left > target:
                left -= ordered[count].size
                count += 1
    return ordered[:count]


def cull(
    cache_dir: Union[str, "os.PathLike[str]"],
    max_size: Optional[int] = None,
    max_age_days: Optional[float] = None,
    *,
    dry_run: bool = False,
    progress: Optional[ProgressCallback] = None,
    on_remove: Optional[RemoveCallback] = None,
) -> CullReport:
    """
    Remove the least recently used files of ``cache_dir`` (see
    :func:`plan_cull`), and the directories that leaves empty.

    Blocks for as long as the walk of the whole cache takes: call it in a
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
    :param progress: called as the walk finds each file and after each
        file planned for removal.
    :param on_remove: called for each file removed, would be removed or
        that could not be removed.
    :raises OSError: if the cache directory, or a directory in it, cannot
        be read.
    """
    root = os.path.normpath(os.fspath(cache_dir))
    entries = []
    for entry in scan_cache(root):
        entries.append(entry)
        if progress is not None:
            progress("scanning", len(entries), None)
    max_age_seconds = None if max_age_days is None else max_age_days * SECONDS_PER_DAY
    plan = plan_cull(entries, max_size, max_age_seconds, now=time.time())

    removed_files = removed_bytes = failed_files = vanished_files = vanished_bytes = 0
    for done, entry in enumerate(plan, 1):
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
        if progress is not None:
            progress("removing", done, len(plan))
    return CullReport(
        removed_files=removed_files,
        removed_bytes=removed_bytes,
        left_files=len(entries) - removed_files - vanished_files,
        left_bytes=sum(entry.size for entry in entries) - removed_bytes - vanished_bytes,
        failed_files=failed_files,
        dry_run=dry_run,
    )


def _remove(entry: CacheEntry, root: str) -> bool:
    """
    Unlink ``entry``'s file, then the directories that leaves empty.

    :return: ``False`` if the file was kept because it was used after the
        scan: a walk of a large cache takes minutes, and a file a client
        has just asked for is no longer the least recently used.
    :raises FileNotFoundError: if it is gone already.
    :raises OSError: if it cannot be removed.
    """
    if os.lstat(entry.path).st_atime > entry.atime:
        return False
    os.unlink(entry.path)
    parent = os.path.dirname(entry.path)
    # Every path the scan found is the root joined with more names, so this
    # stops at the root and never removes it.
    while len(parent) > len(root):
        try:
            os.rmdir(parent)
        except OSError:
            # Not empty (maybe a file was just published into it) or gone
            # already: either way, its parents stay too.
            return True
        parent = os.path.dirname(parent)
    return True


class _ProgressLine:
    """
    A progress line on a terminal, redrawn in place with ``\\r``.

    It draws nothing on anything but a terminal (a pipe, a log, the
    journal), and nothing before ``delay`` seconds have passed: a small
    cache needs no progress line, and time, not a count of files, is what
    tells a large one (a cold disk walks slowly).

    :param clock: the time, in seconds (a parameter for tests).
    """

    width = 30

    def __init__(
        self,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
        delay: float = 0.5,
        interval: float = 0.1,
    ) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._clock = clock
        self._next_draw = clock() + delay
        self._interval = interval
        self._shown = 0

    def __call__(self, stage: Stage, done: int, total: Optional[int]) -> None:
        if not self._enabled:
            return
        now = self._clock()
        if now < self._next_draw:
            return
        self._next_draw = now + self._interval
        if total is None:
            text = f"{stage}: {done} files"
        else:
            filled = self.width * done // total
            bar = "#" * filled + "-" * (self.width - filled)
            text = f"{stage}: [{bar}] {done}/{total} files"
        # Padded to cover a longer line drawn before.
        self._stream.write("\r" + text.ljust(self._shown))
        self._stream.flush()
        self._shown = len(text)

    def clear(self) -> None:
        """
        Erase the line, before anything else is printed on the terminal.
        """
        if self._shown:
            self._stream.write("\r" + " " * self._shown + "\r")
            self._stream.flush()
            self._shown = 0


class _OneLineParser(argparse.ArgumentParser):
    """
    An argument parser that reports a mistake in one line: cron mail and
    the journal read better without the usage text, which ``--help`` gives.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        # argparse shows the message of this exception type only.
        raise argparse.ArgumentTypeError(str(error)) from None


def _days_argument(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not (math.isfinite(days) and days >= 0):
        raise argparse.ArgumentTypeError(
            f"invalid number of days {text!r}: expected a number, 0 or more"
        )
    return days


def _amount(size: int) -> str:
    if size < 1024:
        return format_size(size)
    return f"{format_size(size)} ({size} bytes)"


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _summary(report: CullReport) -> str:
    if report.dry_run:
        removed, freed, left = "would remove", "would free", "would leave"
    else:
        removed, freed, left = "removed", "freed", "left"
    line = (
        f"{removed} {_files(report.removed_files)}, {freed} {_amount(report.removed_bytes)}; "
        f"{left} {_files(report.left_files)}, {_amount(report.left_bytes)}"
    )
    if report.failed_files:
        line += f"; could not remove {_files(report.failed_files)}"
    return line


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    ``pkgcache-cull``: cull a cache directory from cron or a systemd timer,
    while pkgcache serves it or not.

    :return: the exit status: 0 on success, 1 if the cache could not be
        culled or some files could not be removed, 2 for a usage mistake.
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            # A file name that is not valid in the locale's encoding must
            # not end the listing with a traceback halfway through a cull.
            stream.reconfigure(errors="backslashreplace")
    parser = _OneLineParser(
        prog="pkgcache-cull",
        description="Remove the least recently used files of a pkgcache cache "
        "directory. Safe to run while pkgcache serves it.",
    )
    parser.add_argument(
        "--cache-dir", required=True, metavar="PATH", help="the cache directory"
    )
    parser.add_argument(
        "--max-size",
        type=_size_argument,
        metavar="SIZE",
        help="when the cache is larger than SIZE (such as 50G, 500M or 1.5T; "
        "units are powers of 1024), remove the least recently used files "
        f"until it is at {TARGET_PERCENT}%% of SIZE",
    )
    parser.add_argument(
        "--max-age",
        type=_days_argument,
        metavar="DAYS",
        help="remove the files not accessed for more than DAYS days",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="remove nothing; list what would be removed",
    )
    args = parser.parse_args(argv)
    if args.max_size is None and args.max_age is None:
        parser.error("give --max-size, --max-age or both")

    def fail(message: str) -> int:
        print(f"{parser.prog}: {message}", file=sys.stderr)
        return 1

    cache_dir = args.cache_dir
    if not os.path.isdir(cache_dir):
        return fail(f"no such directory: {cache_dir}")
    # A mistyped --cache-dir (/, a home directory) would otherwise lose
    # every file older than --max-age: insist on the mark pkgcache leaves.
    if not os.path.isdir(os.path.join(cache_dir, SPOOL_DIR_NAME)):
        return fail(
            f"{cache_dir} is not a pkgcache cache directory "
            f"(it has no {SPOOL_DIR_NAME}); not culling it"
        )

    progress_line = _ProgressLine(sys.stderr)
    # The progress line is on stderr: only removal lines printed on the
    # same terminal need it erased first.
    listing_on_terminal = sys.stdout.isatty()
    verb = "would remove" if args.dry_run else "removed"

    def show_removal(entry: CacheEntry, error: Optional[OSError]) -> None:
        if listing_on_terminal or error is not None:
            progress_line.clear()
        if error is None:
            print(f"{verb} {entry.path} ({format_size(entry.size)})")
        else:
            print(
                f"{parser.prog}: could not remove {entry.path}: {error.strerror}",
                file=sys.stderr,
            )

    try:
        report = cull(
            cache_dir,
            args.max_size,
            args.max_age,
            dry_run=args.dry_run,
            progress=progress_line,
            on_remove=show_removal,
        )
    except OSError as error:
        progress_line.clear()
        return fail(f"cannot cull {cache_dir}: {error}")
    progress_line.clear()
    print(_summary(report))
    return 1 if report.failed_files else 0


if __name__ == "__main__":
    sys.exit(main())

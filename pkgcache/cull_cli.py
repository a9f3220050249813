"""
``pkgcache-cull``: cull a cache directory from cron or a systemd timer,
while pkgcache serves it or not.  The culling itself is
:func:`pkgcache.cull.cull`; this is its command line: arguments, a progress
line on a terminal, a line per file removed and a summary.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from typing import Callable, NoReturn, Optional, Sequence, TextIO

from pkgcache.cull import TARGET_PERCENT, CacheEntry, CullReport, Stage, cull
from pkgcache.sizes import format_size, parse_size
from pkgcache.store import SPOOL_DIR_NAME


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
            # A walk finds more files than the first if some were
            # published meanwhile.
            filled = min(self.width, self.width * done // total)
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
    Run ``pkgcache-cull`` with ``argv`` (by default, the command line).

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

"""
Culling: the pure plan, the cull of a real directory (atimes set with
``os.utime``), the bounded planner against a plain sort of every file, and
``pkgcache-cull`` run as a real subprocess.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from pkgcache import cull as cull_module
from pkgcache.cull import (
    CacheEntry,
    CullReport,
    CullStopped,
    Stage,
    cull,
    plan_cull,
    scan_cache,
)
from pkgcache.cull_cli import _ProgressLine, main
from pkgcache.sizes import format_size, parse_size
from pkgcache.store import SPOOL_DIR_NAME

DAY = 86400
#: Nanoseconds in a second.
S = 10**9
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache directory as :meth:`CacheStore.create` leaves it."""
    root = tmp_path / "cache"
    (root / SPOOL_DIR_NAME).mkdir(parents=True)
    return root


def make_file(root: Path, relative: str, size: int = 100, age_days: float = 0) -> Path:
    """A file of ``size`` bytes last accessed ``age_days`` ago."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    accessed = time.time() - age_days * DAY
    os.utime(path, (accessed, accessed))
    return path


class Removals:
    """An ``on_remove`` callback that remembers what it was told."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.errors: dict[str, OSError] = {}

    def __call__(self, entry: CacheEntry, error: Optional[OSError]) -> None:
        if error is None:
            self.paths.append(entry.path)
        else:
            self.errors[entry.path] = error


# parse_size and format_size


@pytest.mark.parametrize(
    "text, size",
    [
        ("1024", 1024),
        ("10k", 10 * 1024),
        ("500M", 500 * 1024**2),
        ("50G", 50 * 1024**3),
        ("1.5T", 3 * 1024**4 // 2),
        ("2GiB", 2 * 1024**3),
        ("2GB", 2 * 1024**3),
        ("2gb", 2 * 1024**3),
        (" 2 G ", 2 * 1024**3),
        ("512B", 512),
        ("0", 0),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "-5G", "5X", "", "G", "1.2.3", "5e3", "1024iB"])
def test_parse_size_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match=f"invalid size {text!r}: expected a number"):
        parse_size(text)


@pytest.mark.parametrize(
    "size, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (50 * 1024**3, "50.0 GiB"),
        (1024**7, "1024.0 EiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


# plan_cull


def test_plan_orders_by_atime_then_path() -> None:
    entries = [
        CacheEntry("c", 10, 300 * S),
        CacheEntry("b", 10, 100 * S),
        CacheEntry("d", 10, 200 * S),
        CacheEntry("a", 10, 100 * S),
    ]
    plan = plan_cull(entries, max_size=0, now_ns=1000 * S)
    assert [entry.path for entry in plan] == ["a", "b", "d", "c"]


def test_plan_goes_down_to_90_percent_only_when_over_the_limit() -> None:
    entries = [CacheEntry(f"f{index}", 10, index * S) for index in range(4)]
    assert plan_cull(entries, max_size=40, now_ns=1000 * S) == []
    # 30 bytes would fit under 39, but the target is 90% of it: 35.
    assert [entry.path for entry in plan_cull(entries, max_size=39, now_ns=1000 * S)] == ["f0"]
    assert [entry.path for entry in plan_cull(entries, max_size=33, now_ns=1000 * S)] == [
        "f0",
        "f1",
    ]


def test_plan_max_age_then_max_size() -> None:
    now = 100 * DAY * S
    entries = [CacheEntry(f"aged-{days}", 10, now - days * DAY * S) for days in (50, 40, 10, 5, 1)]
    by_age = plan_cull(entries, max_age_ns=30 * DAY * S, now_ns=now)
    assert [entry.path for entry in by_age] == ["aged-50", "aged-40"]
    # What age leaves (30 bytes) is not over 30: nothing more.
    both = plan_cull(entries, max_size=30, max_age_ns=30 * DAY * S, now_ns=now)
    assert both == by_age
    both = plan_cull(entries, max_size=25, max_age_ns=30 * DAY * S, now_ns=now)
    assert [entry.path for entry in both] == ["aged-50", "aged-40", "aged-10"]


def test_plan_rejects_negative_limits() -> None:
    with pytest.raises(ValueError):
        plan_cull([], max_size=-1, now_ns=0)
    with pytest.raises(ValueError):
        plan_cull([], max_age_ns=-1, now_ns=0)


def test_plan_never_chooses_a_file_used_since_it_began() -> None:
    # Or whose atime is in the future: as recent as it gets.
    entries = [CacheEntry("past", 10, 999 * S), CacheEntry("since", 10, 1000 * S + 1)]
    assert [entry.path for entry in plan_cull(entries, max_size=0, now_ns=1000 * S)] == ["past"]


# cull of a real directory


def test_cull_removes_least_recently_used_down_to_90_percent(cache: Path) -> None:
    # Name order is the opposite of atime order: f9 is the oldest.
    files = [make_file(cache, f"distfiles/f{index}", age_days=index) for index in range(10)]
    removals = Removals()
    report = cull(cache, max_size=999, on_remove=removals)
    assert removals.paths == [str(files[9]), str(files[8])]
    assert [path.exists() for path in files] == [True] * 8 + [False] * 2
    assert report == CullReport(
        removed_files=2,
        removed_bytes=200,
        left_files=8,
        left_bytes=800,
        failed_files=0,
        dry_run=False,
    )


def test_cull_under_the_limit_removes_nothing(cache: Path) -> None:
    files = [make_file(cache, f"f{index}", age_days=index) for index in range(10)]
    report = cull(cache, max_size=1000)
    assert all(path.exists() for path in files)
    assert (report.removed_files, report.left_files, report.left_bytes) == (0, 10, 1000)


def test_cull_max_age(cache: Path) -> None:
    files = {days: make_file(cache, f"a/aged-{days}", age_days=days) for days in (40, 31, 29, 1)}
    report = cull(cache, max_age_days=30)
    assert {days: path.exists() for days, path in files.items()} == {
        40: False,
        31: False,
        29: True,
        1: True,
    }
    assert (report.removed_files, report.removed_bytes, report.left_files) == (2, 200, 2)


def test_cull_max_age_and_max_size(cache: Path) -> None:
    files = {days: make_file(cache, f"aged-{days}", age_days=days) for days in (40, 20, 10, 1)}
    # Age removes aged-40; the 300 bytes left are over 250, so the oldest go
    # until 225 (90%) is reached: aged-20.
    report = cull(cache, max_size=250, max_age_days=30)
    assert {days: path.exists() for days, path in files.items()} == {
        40: False,
        20: False,
        10: True,
        1: True,
    }
    assert (report.removed_files, report.left_bytes) == (2, 200)


def test_cull_never_touches_the_spool_directory(cache: Path) -> None:
    spool = make_file(cache, f"{SPOOL_DIR_NAME}/123.big.tar.gz", size=100_000, age_days=400)
    # Only the top-level name is the store's: deeper, it is an ordinary name.
    nested = make_file(cache, f"distfiles/{SPOOL_DIR_NAME}/file", age_days=400)
    published = make_file(cache, "distfiles/small.tar.gz", age_days=1)
    report = cull(cache, max_size=0, max_age_days=0)
    assert spool.read_bytes() == b"x" * 100_000
    assert not nested.exists() and not published.exists()
    assert (report.removed_files, report.left_files, report.left_bytes) == (2, 0, 0)


def test_cull_removes_directories_it_empties_but_keeps_the_root(cache: Path) -> None:
    make_file(cache, "a/b/old", age_days=40)
    make_file(cache, "c/d/e/old", age_days=40)
    kept = make_file(cache, "a/new", age_days=1)
    (cache / "empty-before").mkdir()
    cull(cache, max_age_days=30)
    assert not (cache / "a" / "b").exists()
    assert not (cache / "c").exists()
    assert kept.exists()
    # Left alone: it was not emptied by this cull.
    assert (cache / "empty-before").is_dir()
    cull(cache, max_size=0)
    assert sorted(os.listdir(cache)) == [SPOOL_DIR_NAME, "empty-before"]


def test_cull_keeps_the_root_even_when_it_empties_it(tmp_path: Path) -> None:
    # No spool directory in it: the root is empty once its files are gone.
    root = tmp_path / "bare"
    make_file(root, "a/old", age_days=40)
    make_file(root, "old", age_days=40)
    cull(f"{root}/", max_size=0)
    assert root.is_dir() and os.listdir(root) == []


def test_dry_run_removes_nothing_and_reports_the_same_plan(cache: Path) -> None:
    files = [make_file(cache, f"d{index % 3}/f{index}", age_days=index * 5) for index in range(9)]
    dry_removals, removals = Removals(), Removals()
    dry_report = cull(cache, max_size=500, max_age_days=32, dry_run=True, on_remove=dry_removals)
    assert all(path.exists() for path in files)
    report = cull(cache, max_size=500, max_age_days=32, on_remove=removals)
    assert len(removals.paths) == 5
    assert dry_removals.paths == removals.paths
    assert dry_report == dataclasses.replace(report, dry_run=True)
    assert not any(Path(path).exists() for path in removals.paths)


def test_a_file_open_for_reading_is_read_whole_after_it_is_culled(cache: Path) -> None:
    content = os.urandom(256 * 1024)
    path = cache / "distfiles" / "big.tar.gz"
    path.parent.mkdir()
    path.write_bytes(content)
    with open(path, "rb") as reader:
        start = reader.read(1000)
        report = cull(cache, max_size=0)
        assert report.removed_files == 1 and not path.exists()
        assert start + reader.read() == content


def test_scan_skips_what_vanishes_during_the_walk(cache: Path) -> None:
    # The walk goes in the directories' own order: whichever file comes
    # first, another file of its directory and another whole directory
    # vanish after it.
    files = {str(make_file(cache, f"{directory}/{name}")) for directory in "abc" for name in "xyz"}
    walk = scan_cache(cache)
    first = Path(next(walk).path)
    vanished_file = next(first.parent / name for name in "xyz" if name != first.name)
    os.unlink(vanished_file)
    vanished_directory = next(cache / name for name in "abc" if name != first.parent.name)
    shutil.rmtree(vanished_directory)
    expected = {
        path
        for path in files - {str(first), str(vanished_file)}
        if Path(path).parent != vanished_directory
    }
    assert sorted(entry.path for entry in walk) == sorted(expected)


def test_cull_skips_files_removed_or_used_since_the_scan(cache: Path) -> None:
    oldest = make_file(cache, "oldest", age_days=3)
    vanishing = make_file(cache, "vanishing", age_days=2)
    used = make_file(cache, "used", age_days=1)
    removals = Removals()

    def progress(stage: Stage, done: int, total: Optional[int]) -> None:
        # What a concurrent cull and a cache hit do, between the walk that
        # chose the files and the one that removes them.
        if stage == "removing" and done == 0:
            os.unlink(vanishing)
            os.utime(used)

    report = cull(cache, max_size=0, on_remove=removals, progress=progress)
    assert removals.paths == [str(oldest)] and removals.errors == {}
    assert used.exists()
    assert (report.removed_files, report.left_files, report.left_bytes) == (1, 1, 100)


def test_cull_keeps_a_file_used_after_the_walk_looked_at_it(cache: Path) -> None:
    # Both in the boundary bucket, which is removed after the last walk:
    # "second" is used between that walk and its removal.
    first = make_file(cache, "first", age_days=2)
    second = make_file(cache, "second", age_days=2)
    accessed = os.stat(first).st_atime_ns
    os.utime(second, ns=(accessed + 1000, accessed + 1000))
    removals = Removals()

    def on_remove(entry: CacheEntry, error: Optional[OSError]) -> None:
        removals(entry, error)
        os.utime(second)

    report = cull(cache, max_size=0, on_remove=on_remove)
    assert removals.paths == [str(first)]
    assert second.exists()
    assert (report.removed_files, report.left_files) == (1, 1)


def test_cull_keeps_files_accessed_in_the_future(cache: Path) -> None:
    # A clock set back: they count as the most recently used of all.
    future = make_file(cache, "future", age_days=-1)
    past = make_file(cache, "past", age_days=1)
    report = cull(cache, max_size=0, max_age_days=0)
    assert future.exists() and not past.exists()
    assert (report.removed_files, report.left_files, report.left_bytes) == (1, 1, 100)


def test_cull_removes_only_what_it_needs_of_the_boundary_bucket(cache: Path) -> None:
    # Used within a few milliseconds of each other: the same bucket of the
    # first walk's histogram, yet removed in atime order, and only as many
    # as needed.
    base = time.time_ns() - 10 * DAY * S
    sizes = [300, 100, 200, 400, 250, 150]
    files = []
    for index, size in enumerate(sizes):
        path = make_file(cache, f"bucket/{'fedcba'[index]}", size=size)
        os.utime(path, ns=(base + index * 1_000_000, base + index * 1_000_000))
        files.append(path)
    newer = make_file(cache, "newer", size=100, age_days=1)
    # 1500 bytes; down to 90% of 1200 = 1080: 420 to free, so 300 + 100 +
    # 200 (the 100 alone would be 20 short).
    removals = Removals()
    report = cull(cache, max_size=1200, on_remove=removals)
    assert removals.paths == [str(path) for path in files[:3]]
    assert all(path.exists() for path in files[3:]) and newer.exists()
    assert (report.removed_bytes, report.left_bytes) == (600, 900)


def test_cull_stops_between_two_files_when_told(cache: Path) -> None:
    files = [make_file(cache, f"d{index}/old", age_days=40) for index in range(10)]
    stop = threading.Event()
    removals = Removals()

    def progress(stage: Stage, done: int, total: Optional[int]) -> None:
        if stage == "removing" and done == 1:
            stop.set()

    with pytest.raises(CullStopped):
        cull(cache, max_age_days=30, progress=progress, on_remove=removals, stop=stop)
    assert len(removals.paths) == 1
    assert sum(path.exists() for path in files) == 9


def test_cull_goes_on_past_a_file_it_cannot_remove(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stubborn = make_file(cache, "stubborn", age_days=2)
    other = make_file(cache, "other", age_days=1)
    unlink = os.unlink

    def refuse_stubborn(path: str) -> None:
        if path == str(stubborn):
            raise PermissionError(13, "Permission denied", path)
        unlink(path)

    monkeypatch.setattr(os, "unlink", refuse_stubborn)
    removals = Removals()
    report = cull(cache, max_size=0, on_remove=removals)
    assert removals.paths == [str(other)]
    assert isinstance(removals.errors[str(stubborn)], PermissionError)
    assert stubborn.exists() and not other.exists()
    assert (report.removed_files, report.failed_files, report.left_files) == (1, 1, 1)


def test_cull_does_not_follow_symbolic_links(cache: Path, tmp_path: Path) -> None:
    precious = make_file(tmp_path, "outside/precious", age_days=400)
    (cache / "linked-dir").symlink_to(precious.parent)
    (cache / "linked-file").symlink_to(precious)
    report = cull(cache, max_size=0, max_age_days=0)
    assert precious.exists()
    assert (cache / "linked-dir").is_symlink() and (cache / "linked-file").is_symlink()
    assert report.left_files == report.removed_files == 0


# The bounded planner against a sort of every file


def sorted_choice(
    entries: list[CacheEntry], max_size: int, max_age_ns: Optional[int] = None, *, now_ns: int
) -> list[CacheEntry]:
    """What a cull removes, found the obvious way: every file in memory, sorted."""
    ordered = sorted(entries, key=lambda entry: (entry.atime_ns, entry.path))
    count = 0
    if max_age_ns is not None:
        while count < len(ordered) and ordered[count].atime_ns < now_ns - max_age_ns:
            count += 1
    left = sum(entry.size for entry in ordered[count:])
    if left > max_size:
        target = max_size * 90 // 100
        while left > target:
            left -= ordered[count].size
            count += 1
    return ordered[:count]


def make_cache(root: Path, atimes: list[int], seed: int) -> list[CacheEntry]:
    """Files of random sizes (sparse) with these atimes, in 64 directories."""
    rng = random.Random(seed)
    entries = []
    for index, atime in enumerate(atimes):
        path = root / f"d{rng.randrange(64):02}" / f"f{index}"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, rng.randrange(1, 100), rng.randrange(100, 100_000)])
        with open(path, "wb") as file:
            file.truncate(size)
        os.utime(path, ns=(atime, atime))
        entries.append(CacheEntry(str(path), size, atime))
    return entries


def count_walks(walks: list[Stage]):
    def progress(stage: Stage, done: int, total: Optional[int]) -> None:
        if done == 0:
            walks.append(stage)

    return progress


def check_against_sorted_choice(
    cache: Path, entries: list[CacheEntry], max_size: int, max_age_days: Optional[float] = None
) -> list[Stage]:
    """Cull ``cache`` and check it removed what a sort chose; return its walks."""
    walks: list[Stage] = []
    removals = Removals()
    report = cull(
        cache, max_size, max_age_days, on_remove=removals, progress=count_walks(walks)
    )
    max_age_ns = None if max_age_days is None else round(max_age_days * DAY * S)
    expected = sorted_choice(entries, max_size, max_age_ns, now_ns=time.time_ns())
    assert sorted(removals.paths) == sorted(entry.path for entry in expected)
    removed_bytes = sum(entry.size for entry in expected)
    assert report == CullReport(
        removed_files=len(expected),
        removed_bytes=removed_bytes,
        left_files=len(entries) - len(expected),
        left_bytes=sum(entry.size for entry in entries) - removed_bytes,
        failed_files=0,
        dry_run=False,
    )
    expected_paths = {entry.path for entry in expected}
    assert all(Path(entry.path).exists() == (entry.path not in expected_paths) for entry in entries)
    return walks


def spread_atimes(count: int, seed: int, days: float = 60) -> list[int]:
    rng = random.Random(seed)
    now = time.time_ns()
    return [now - rng.randrange(S, round(days * DAY * S)) for _ in range(count)]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 0.95, 1.2])
def test_bounded_cull_chooses_what_a_sort_would(cache: Path, fraction: float) -> None:
    entries = make_cache(cache, spread_atimes(3000, seed=1), seed=2)
    total = sum(entry.size for entry in entries)
    walks = check_against_sorted_choice(cache, entries, int(total * fraction))
    # One walk to choose, one to remove; none to remove when under the limit.
    assert walks == (["scanning"] if fraction > 1 else ["scanning", "removing"])


def test_bounded_cull_with_max_age_chooses_what_a_sort_would(cache: Path) -> None:
    entries = make_cache(cache, spread_atimes(3000, seed=3), seed=4)
    total = sum(entry.size for entry in entries)
    check_against_sorted_choice(cache, entries, total // 4, max_age_days=45.5)


def test_bounded_cull_splits_a_full_boundary_bucket_exactly(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny histograms, and room for few files of the boundary bucket: the
    # boundary is split again and again, down to single nanoseconds, with
    # equal atimes among the files (in path order).
    monkeypatch.setattr(cull_module, "HISTOGRAM_BUCKETS", 8)
    monkeypatch.setattr(cull_module, "BOUNDARY_FILES", 16)
    rng = random.Random(5)
    atimes = spread_atimes(2000, seed=6, days=1 / 24)
    atimes += [rng.choice(atimes) for _ in range(500)]
    entries = make_cache(cache, atimes, seed=7)
    total = sum(entry.size for entry in entries)
    walks = check_against_sorted_choice(cache, entries, total // 2)
    assert walks.count("scanning") > 3 and walks[-1] == "removing"


def test_many_files_of_one_atime_at_the_boundary_go_in_walk_order(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More files share the boundary's atime to the nanosecond than the last
    # walk may keep aside: the first of them in the walk's order go.
    monkeypatch.setattr(cull_module, "BOUNDARY_FILES", 16)
    now = time.time_ns()
    older = make_cache(cache / "older", [now - 3 * DAY * S - index for index in range(100)], 8)
    tied = make_cache(cache / "tied", [now - 2 * DAY * S] * 300, 9)
    newer = make_cache(cache / "newer", [now - DAY * S + index for index in range(100)], 10)
    walk_order = [entry.path for entry in scan_cache(cache / "tied")]
    sizes = {entry.path: entry.size for entry in tied}
    older_bytes = sum(entry.size for entry in older)
    total = older_bytes + sum(sizes.values()) + sum(entry.size for entry in newer)
    # Down to a target that leaves about half the tied bytes.
    max_size = (total - older_bytes - sum(sizes.values()) // 2) * 100 // 90
    needed = total - max_size * 90 // 100 - older_bytes
    expected_tied = []
    for path in walk_order:
        if needed <= 0:
            break
        expected_tied.append(path)
        needed -= sizes[path]
    removals = Removals()
    cull(cache, max_size, on_remove=removals)
    assert sorted(removals.paths) == sorted([entry.path for entry in older] + expected_tied)
    assert 0 < len(expected_tied) < len(tied)


# The progress line


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_draws_on_a_terminal_after_the_delay() -> None:
    now = [0.0]
    stream = FakeTerminal()
    line = _ProgressLine(stream, clock=lambda: now[0], delay=0.5, interval=0.1)
    now[0] = 0.1
    line("scanning", 10, None)  # a small cache is done by now
    now[0] = 0.6
    line("scanning", 20, None)
    now[0] = 0.65
    line("scanning", 30, None)  # within the interval: not redrawn
    now[0] = 0.8
    line("removing", 5, 10)
    bar = "#" * 15 + "-" * 15
    drawn = f"\rscanning: 20 files\rremoving: [{bar}] 5/10 files"
    assert stream.getvalue() == drawn
    line.clear()
    assert stream.getvalue() == drawn + "\r" + " " * len(f"removing: [{bar}] 5/10 files") + "\r"


def test_progress_line_draws_nothing_elsewhere() -> None:
    now = [0.0]
    stream = io.StringIO()
    line = _ProgressLine(stream, clock=lambda: now[0])
    now[0] = 100.0
    line("scanning", 10, None)
    line.clear()
    assert stream.getvalue() == ""


# pkgcache-cull


def run_cull(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pkgcache.cull_cli", *arguments],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_command_culls(cache: Path) -> None:
    old = make_file(cache, "distfiles/old.tar.gz", age_days=40)
    new = make_file(cache, "distfiles/new.tar.gz", size=2048, age_days=1)
    result = run_cull("--cache-dir", str(cache), "--max-age", "30")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"removed {old} (100 B)",
        "removed 1 file, freed 100 B; left 1 file, 2.0 KiB (2048 bytes)",
    ]
    # Not a terminal: no progress line.
    assert result.stderr == ""
    assert not old.exists() and new.exists()


def test_command_dry_run(cache: Path) -> None:
    old = make_file(cache, "old.tar.gz", age_days=2)
    new = make_file(cache, "new.tar.gz", age_days=1)
    result = run_cull("--cache-dir", str(cache), "--max-size", "150", "--dry-run")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"would remove {old} (100 B)",
        "would remove 1 file, would free 100 B; would leave 1 file, 100 B",
    ]
    assert old.exists() and new.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--max-size", "5X"], "pkgcache-cull: argument --max-size: invalid size '5X'"),
        (["--cache-dir", "/nonexistent/pkgcache", "--max-size", "1G"], "no such directory"),
    ],
)
def test_command_reports_bad_input_in_one_line(
    cache: Path, arguments: list[str], message: str
) -> None:
    if "--cache-dir" not in arguments:
        arguments = ["--cache-dir", str(cache), *arguments]
    result = run_cull(*arguments)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert message in result.stderr
    assert result.stdout == ""


def run_main(arguments: list[str]) -> int:
    try:
        return main(arguments)
    except SystemExit as exit:
        assert isinstance(exit.code, int)
        return exit.code


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([], "give --max-size, --max-age or both"),
        (["--max-size=-5G"], "invalid size '-5G'"),
        (["--max-age", "soon"], "invalid number of days 'soon'"),
        (["--max-age", "-1"], "invalid number of days '-1'"),
    ],
)
def test_command_rejects_bad_arguments(
    cache: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    assert run_main(["--cache-dir", str(cache), *arguments]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("pkgcache-cull: ") and message in stderr
    assert len(stderr.splitlines()) == 1


def test_command_refuses_a_directory_that_is_not_a_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = make_file(tmp_path, "home/precious", age_days=400)
    assert run_main(["--cache-dir", str(precious.parent), "--max-age", "30"]) == 1
    assert "is not a pkgcache cache directory" in capsys.readouterr().err
    assert precious.exists()

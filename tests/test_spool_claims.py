"""
Claiming a shared spool (:func:`pkgcache.spool.new_spool` with
``shared``): one process holds it and downloads, any other gets a
:class:`~pkgcache.shared_spool.SpoolFollower` that sees what the holder
records and writes, and how it ended; a spool nobody holds is taken over;
the sweep removes only spools nobody holds.  Real files and real locks
(``flock`` locks of two open files conflict within one process as between
two processes).
"""

from __future__ import annotations

import fcntl
import os

import pytest
from twisted.internet.defer import Deferred, maybeDeferred

from pkgcache.metadata import EntryMetadata
from pkgcache.shared_spool import FollowedHeaders, SpoolFollower, SpoolRecord, failure_record
from pkgcache.sources import AllSourcesFailed, Attempt, FailureKind, Source
from pkgcache.spool import SpoolWriter, new_spool, shared_spool_path, sweep_stale_spools

HEADERS = FollowedHeaders(
    200, "http://a.example/", {"content-type": "application/x-xz", "etag": '"1"'},
    11, 1_700_000_000.0, 1_700_000_001.0,
)


def run_at_once(function, *args) -> Deferred:
    return maybeDeferred(function, *args)


@pytest.fixture
def dirs(tmp_path):
    cache = tmp_path / "cache"
    spools = cache / ".pkgcache-spool"
    spools.mkdir(parents=True)
    return str(cache), str(spools), str(cache / "distfiles" / "x-1.0.tar.xz")


def claim(dirs):
    cache, spools, target = dirs
    return new_spool(spools, cache, target, run_at_once, 0o644, shared=True)


def done(coroutine) -> None:
    finished = Deferred.fromCoroutine(coroutine)
    assert finished.called, "the disk work was not done at once"
    finished.result  # raises what it failed with


def test_one_holder_and_followers_that_see_its_record_and_bytes(dirs):
    cache, spools, target = dirs
    writer = claim(dirs)
    assert isinstance(writer, SpoolWriter)
    assert writer.name == shared_spool_path(spools, cache, target)
    follower = claim(dirs)
    assert isinstance(follower, SpoolFollower)
    record = SpoolRecord()
    writer.mark(record.encode())
    follower.poll()
    assert follower.headers is None and not follower.ended
    record.headers = HEADERS
    writer.mark(record.encode())
    writer.append(b"hello ")
    assert follower.poll()
    assert follower.headers == HEADERS and follower.size == 6
    assert follower.read(0, 100) == b"hello "
    assert not follower.poll(), "nothing changed"
    record.beat += 1
    writer.mark(record.encode())
    assert follower.poll(), "a beat is a sign of life"
    writer.append(b"world")
    record.end, record.received = "complete", 11
    writer.mark(record.encode())
    follower.poll()
    assert follower.complete and not follower.ended
    done(writer.commit(1_700_000_000.0, EntryMetadata(content_type=b"application/x-xz")))
    follower.poll()
    assert (follower.ended, follower.published, follower.complete) == (True, True, True)
    assert os.listdir(spools) == []
    with open(target, "rb") as published:
        assert published.read() == b"hello world"
        # The record went with the spool; the metadata stayed.
        assert "user.pkgcache.spool" not in os.listxattr(published.fileno())
    follower.close()
    writer.close()


def test_a_failure_before_the_headers_is_told_to_followers(dirs):
    writer = claim(dirs)
    follower = claim(dirs)
    failed = AllSourcesFailed([
        Attempt(Source("http://a.example/"), FailureKind.NOT_FOUND, "404"),
        Attempt(Source("http://b.example/"), FailureKind.NOT_FOUND, "410"),
    ])
    done(writer.discard(SpoolRecord(end="failed", failure=failure_record(failed)).encode()))
    follower.poll()
    assert follower.ended and not follower.complete
    assert follower.sources_failure is not None
    assert (follower.sources_failure.status, follower.sources_failure.not_found) == (404, True)
    assert str(follower.sources_failure) == str(failed)
    # The next claim holds it afresh.
    again = claim(dirs)
    assert isinstance(again, SpoolWriter)
    for spool in (follower, writer, again):
        spool.close()


def test_a_failed_download_headers_are_never_believed(dirs):
    writer = claim(dirs)
    writer.mark(SpoolRecord(HEADERS, end="failed", failure={"reason": "cut"}).encode())
    follower = claim(dirs)
    follower.poll()
    assert follower.headers is None and not follower.ended
    done(writer.discard())
    follower.poll()
    assert follower.ended and follower.headers is None and follower.sources_failure is None
    follower.close()
    writer.close()


def test_a_spool_nobody_holds_is_taken_over_in_one_rename(dirs):
    cache, spools, target = dirs
    path = shared_spool_path(spools, cache, target)
    with open(path, "wb") as dead:
        dead.write(b"stale")
        os.setxattr(dead.fileno(), "user.pkgcache.spool", SpoolRecord(HEADERS).encode())
    stale = os.stat(path)
    # A process that opened it before it died (while it looked alive).
    late = SpoolFollower(os.open(path, os.O_RDONLY), path)
    writer = claim(dirs)
    assert isinstance(writer, SpoolWriter) and writer.name == path
    fresh = os.stat(path)
    assert (fresh.st_ino, fresh.st_size) != (stale.st_ino, stale.st_size)
    assert os.listdir(spools) == [os.path.basename(path)]
    late.poll()
    # Its process died: its record is not believed, and nothing came whole.
    assert late.ended and late.headers is None and not late.complete
    other = claim(dirs)
    assert isinstance(other, SpoolFollower)
    for spool in (late, other, writer):
        spool.close()


def test_a_process_that_dies_leaves_its_followers_short(dirs):
    cache, spools, target = dirs
    path = shared_spool_path(spools, cache, target)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.setxattr(fd, "user.pkgcache.spool", SpoolRecord(HEADERS).encode())
    os.write(fd, b"hello")
    follower = claim(dirs)
    follower.poll()
    assert follower.headers == HEADERS and follower.size == 5
    os.close(fd)  # dies
    follower.poll()
    assert follower.ended and not follower.complete and follower.reason == "died"
    follower.close()


def test_private_spools_are_named_at_random_and_never_followed(dirs):
    cache, spools, target = dirs
    first = new_spool(spools, cache, target, run_at_once, 0o644)
    second = new_spool(spools, cache, target, run_at_once, 0o644)
    assert isinstance(first, SpoolWriter) and isinstance(second, SpoolWriter)
    assert first.name != second.name
    assert all(name.endswith(".x-1.0.tar.xz") for name in os.listdir(spools))
    claimed = claim(dirs)
    assert isinstance(claimed, SpoolWriter), "a private spool holds no claim"
    for spool in (first, second, claimed):
        done(spool.discard())
        spool.close()
    assert os.listdir(spools) == []


@pytest.mark.parametrize("shared", [True, False])
def test_a_spool_directory_removed_by_hand_is_made_again(dirs, shared):
    cache, spools, target = dirs
    os.rmdir(spools)
    spool = new_spool(spools, cache, target, run_at_once, 0o644, shared=shared)
    assert isinstance(spool, SpoolWriter) and os.path.dirname(spool.name) == spools
    done(spool.discard())
    spool.close()


def test_the_sweep_removes_only_the_spools_nobody_holds(tmp_path):
    spools = tmp_path / "spools"
    spools.mkdir()
    (spools / ("a" * 64 + ".dead.tar.gz")).write_bytes(b"left by a crash")
    (spools / "x1y2z3.old-style").write_bytes(b"left by a crash")
    live_path = spools / ("b" * 64 + ".live.tar.gz")
    live = open(live_path, "wb")
    try:
        fcntl.flock(live, fcntl.LOCK_EX)
        assert sweep_stale_spools(str(spools)) == 2
        assert os.listdir(spools) == [live_path.name]
    finally:
        live.close()
    assert sweep_stale_spools(str(spools)) == 1
    assert os.listdir(spools) == []

"""
``--max-cache-size``: the server culls least recently used files in the
background, keeps its size in the metrics, never breaks a download, and
never waits for a walk of the cache to stop.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from pkgcache.cache_limit import CacheLimit
from pkgcache.cull import CullReport, cull
from tests.clients import start_reading
from tests.conftest import fetch, wait_for


def put(root, path: str, size: int, atime: float) -> None:
    full = root / path
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_bytes(b"x" * size)
    os.utime(full, (atime, atime))


@pytest_twisted.ensureDeferred
async def test_publishing_past_the_limit_culls_least_recently_used(
    origin, make_proxy, http, tmp_path
):
    cache = tmp_path / "cache"
    proxy = make_proxy([origin.url], cache_dir=None)
    put(cache, "old/a.tar", 300_000, atime=1_000)
    put(cache, "old/b.tar", 300_000, atime=2_000)
    put(cache, "newer/c.tar", 300_000, atime=3_000_000_000)
    (cache / ".pkgcache-spool" / "someone-elses.spool").write_bytes(b"y" * 500_000)
    metrics = proxy.resource.metrics
    clock = Clock()
    limit = CacheLimit(proxy.resource.store, 1_000_000, metrics, clock)
    limit.startService()
    try:
        await wait_for(lambda: limit.files == 3)
        assert limit.size_bytes == 900_000
        assert metrics.cache_bytes._value.get() == 900_000

        origin.add("/new.tar", b"n" * 200_000)
        await fetch(http, proxy.url + "/new.tar")
        # 1,100,000 bytes > 1,000,000: cull the oldest until <= 900,000.
        await wait_for(lambda: not (cache / "old" / "a.tar").exists())
        await wait_for(lambda: limit.size_bytes == 800_000)
        put(cache, "old/d.tar", 300_000, atime=1_500)  # put there behind our back
        origin.add("/newest.tar", b"n" * 100_000)
        await fetch(http, proxy.url + "/newest.tar")
        await wait_for(lambda: limit.files == 4)
        # 800,000 + 100,000 is within the limit: nothing culled yet...
        assert limit.size_bytes == 900_000
        assert (cache / "old" / "d.tar").exists()
        # ...until the hourly walk finds the real size, 1,200,000, and
        # culls the least recently used file of all, d.
        clock.advance(3600)
        await wait_for(lambda: not (cache / "old" / "d.tar").exists())
        # The size was 900,000 already: wait for the walk's own figures,
        # which a stop would make it ignore.
        await wait_for(lambda: metrics.evictions._value.get() == 2)
        await wait_for(lambda: limit.size_bytes == 900_000)
    finally:
        limit.stopService()
    assert (cache / "old" / "b.tar").exists() and (cache / "newer" / "c.tar").exists()
    assert (cache / "new.tar").exists() and (cache / "newest.tar").exists()
    assert (cache / ".pkgcache-spool" / "someone-elses.spool").exists()
    assert metrics.evictions._value.get() == 2
    assert metrics.evicted_bytes._value.get() == 600_000
    assert (limit.files, metrics.cache_files._value.get()) == (4, 4)


@pytest_twisted.ensureDeferred
async def test_size_is_tracked_under_the_limit(origin, make_proxy, http, tmp_path):
    cache = tmp_path / "cache"
    proxy = make_proxy([origin.url])
    put(cache, "a", 1000, atime=1_000)
    limit = CacheLimit(proxy.resource.store, 10**9, proxy.resource.metrics, Clock())
    limit.startService()
    try:
        await wait_for(lambda: limit.files == 1)
        origin.add("/b", b"b" * 500)
        await fetch(http, proxy.url + "/b")
        await wait_for(lambda: limit.files == 2)
        assert limit.size_bytes == 1500
        assert (cache / "a").exists()
    finally:
        limit.stopService()


@pytest_twisted.ensureDeferred
async def test_a_file_culled_while_a_client_reads_it_is_delivered_whole(
    origin, make_proxy, http
):
    data = os.urandom(16 * 1024 * 1024)
    origin.add("/big.iso", data)
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + "/big.iso")
    await proxy.published("/big.iso")

    _, reader = await start_reading(http, proxy.url + "/big.iso", rate=2_000_000)
    await reader.first_byte
    report = cull(proxy.cache_dir.path, max_size=1)
    assert report.removed_files == 1 and not proxy.cached("/big.iso").exists()
    reader.full_speed()
    assert await reader.done == data


class BlockedWalk:
    """
    A cull function that blocks in its disk thread until released, and
    says in the reactor thread when it has begun.
    """

    def __init__(self, then_cull: bool, left_files: int = 7) -> None:
        self.began: Deferred[threading.Event] = Deferred()
        self.release = threading.Event()
        self.calls = 0
        self._then_cull = then_cull
        self._left_files = left_files

    def __call__(self, path: str, max_size: int, *, stop: threading.Event) -> CullReport:
        self.calls += 1
        reactor.callFromThread(self.began.callback, stop)
        self.release.wait()
        if self._then_cull:
            # A real cull, told to stop by then: it raises CullStopped.
            return cull(path, max_size, stop=stop)
        # A walk that finished as it was told to stop: its figures are
        # stale, and must not reach the metrics.
        return CullReport(5, 5000, self._left_files, self._left_files * 1000, 0, False)


def record_walks(monkeypatch: pytest.MonkeyPatch, store) -> list[Deferred]:
    """The Deferreds of the store's disk work, as they are handed out."""
    handed_out: list[Deferred] = []
    in_disk_thread = store.in_disk_thread

    def recording(function, *args) -> Deferred:
        result = in_disk_thread(function, *args)
        handed_out.append(result)
        return result

    monkeypatch.setattr(store, "in_disk_thread", recording)
    return handed_out


async def settled(walk: Deferred) -> None:
    """Wait until whoever awaited ``walk`` (added first) has had its result."""
    done: Deferred[None] = Deferred()
    walk.addBoth(lambda _: done.callback(None))
    await done


@pytest.mark.parametrize("then_cull", [False, True], ids=["returns", "raises-stopped"])
@pytest_twisted.ensureDeferred
async def test_stopping_does_not_wait_for_a_walk_and_ignores_it(
    origin, make_proxy, tmp_path, monkeypatch, then_cull
):
    proxy = make_proxy([origin.url])
    put(tmp_path / "cache", "old", 1000, atime=1_000)
    store, metrics = proxy.resource.store, proxy.resource.metrics
    walks = record_walks(monkeypatch, store)
    walk = BlockedWalk(then_cull)
    clock = Clock()
    limit = CacheLimit(store, 1, metrics, clock, cull_function=walk)
    limit.startService()
    try:
        stop = await walk.began
        assert not stop.is_set()
        # Returns at once, with the walk still blocked in its thread.
        assert limit.stopService() is None
        assert stop.is_set() and not walk.release.is_set()
        # No walk starts after a stop: neither the hourly one nor one for a
        # publication past the limit.
        clock.advance(3600)
        store.published(10_000)
    finally:
        walk.release.set()
    await settled(walks[0])
    assert walk.calls == len(walks) == 1
    assert (limit.size_bytes, limit.files) == (0, 0)
    assert metrics.evictions._value.get() == 0
    assert (tmp_path / "cache" / "old").exists()


@pytest_twisted.ensureDeferred
async def test_a_service_started_again_walks_again(origin, make_proxy, monkeypatch):
    proxy = make_proxy([origin.url])
    store = proxy.resource.store
    walks = record_walks(monkeypatch, store)
    first = BlockedWalk(then_cull=False, left_files=9)
    second = BlockedWalk(then_cull=False)
    next_walk = iter([first, second])

    def cull_function(path: str, max_size: int, *, stop: threading.Event) -> CullReport:
        return next(next_walk)(path, max_size, stop=stop)

    limit = CacheLimit(store, 10**9, proxy.resource.metrics, Clock(), cull_function=cull_function)
    limit.startService()
    await first.began
    limit.stopService()
    limit.startService()
    try:
        await second.began
        second.release.set()
        await settled(walks[1])
        assert (limit.size_bytes, limit.files) == (7000, 7)
    finally:
        limit.stopService()
        first.release.set()
    # The first walk, done last, changes nothing.
    await settled(walks[0])
    assert (limit.size_bytes, limit.files) == (7000, 7)


@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_is_logged_and_the_next_walk_runs(
    origin, make_proxy, fail_on_logged_failures
):
    proxy = make_proxy([origin.url])
    calls: list[Optional[threading.Event]] = []

    def broken_once(path: str, max_size: int, *, stop: threading.Event) -> CullReport:
        calls.append(stop)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return CullReport(0, 0, 3, 300, 0, False)

    clock = Clock()
    limit = CacheLimit(
        proxy.resource.store, 1000, proxy.resource.metrics, clock, cull_function=broken_once
    )
    limit.startService()
    try:
        await wait_for(lambda: len(fail_on_logged_failures) == 1)
        # Logged by the cache limit's errback, not as an "Unhandled error
        # in Deferred" when the Deferred is collected.
        (logged,) = fail_on_logged_failures
        assert logged["log_namespace"] == "pkgcache.cache_limit"
        assert logged["log_failure"].check(RuntimeError)
        clock.advance(3600)
        await wait_for(lambda: limit.files == 3)
        assert limit.size_bytes == 300
    finally:
        limit.stopService()
    # Seen and checked: not a reason to fail the test.
    fail_on_logged_failures.clear()

"""
``--max-cache-size``: the server culls least recently used files in the
background, keeps its size in the metrics, and never breaks a download.
"""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet.task import Clock

from pkgcache.cache_limit import CacheLimit
from pkgcache.cull import cull
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
        await wait_for(lambda: limit.size_bytes == 900_000)
    finally:
        await limit.stopService()
    assert (cache / "old" / "b.tar").exists() and (cache / "newer" / "c.tar").exists()
    assert (cache / "new.tar").exists() and (cache / "newest.tar").exists()
    assert (cache / ".pkgcache-spool" / "someone-elses.spool").exists()
    assert metrics.evictions._value.get() == 2
    assert metrics.evicted_bytes._value.get() == 600_000
    assert (limit.files, metrics.cache_files._value.get()) == (4, 4)


@pytest_twisted.ensureDeferred
async def test_size_is_tracked_without_a_limit(origin, make_proxy, http, tmp_path):
    cache = tmp_path / "cache"
    proxy = make_proxy([origin.url])
    put(cache, "a", 1000, atime=1_000)
    limit = CacheLimit(proxy.resource.store, None, proxy.resource.metrics, Clock())
    limit.startService()
    try:
        await wait_for(lambda: limit.files == 1)
        origin.add("/b", b"b" * 500)
        await fetch(http, proxy.url + "/b")
        await wait_for(lambda: limit.files == 2)
        assert limit.size_bytes == 1500
        assert (cache / "a").exists()
    finally:
        await limit.stopService()


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

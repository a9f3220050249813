"""
``Cache-Control: only-if-cached`` (how a sibling pkgcache asks, issue 9):
answered from the cache, or 504 at once, and never a request to a source.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from pkgcache.sources import Source
from tests.conftest import fetch

ONLY_IF_CACHED = {b"cache-control": [b"only-if-cached"]}


@pytest_twisted.ensureDeferred
async def test_a_cached_file_is_served_and_an_uncached_one_is_504(origin, make_proxy, http):
    origin.add("/distfiles/a.tar.gz", b"cached")
    origin.add("/distfiles/b.tar.gz", b"not cached")
    proxy = make_proxy([Source(origin.url)])
    await fetch(http, proxy.url + "/distfiles/a.tar.gz")
    await proxy.published("/distfiles/a.tar.gz")
    response, body = await fetch(http, proxy.url + "/distfiles/a.tar.gz", headers=ONLY_IF_CACHED)
    assert (response.code, body) == (200, b"cached")
    for method in ("GET", "HEAD"):
        response, body = await fetch(
            http, proxy.url + "/distfiles/b.tar.gz", method=method, headers=ONLY_IF_CACHED
        )
        assert response.code == 504
        assert response.headers.getRawHeaders(b"cache-status") == [b"pkgcache; detail=only-if-cached"]
    assert origin.count("/distfiles/b.tar.gz") == 0 and origin.count("/distfiles/b.tar.gz", b"HEAD") == 0
    assert not proxy.cached("/distfiles/b.tar.gz").exists()


@pytest_twisted.ensureDeferred
async def test_a_stale_volatile_copy_is_504_not_revalidated(origin, make_proxy, http):
    origin.add("/dists/stable/InRelease", b"Suite: stable\n")
    clock = Clock()
    clock.advance(1_000_000)
    proxy = make_proxy([Source(origin.url)], clock=clock, volatile_max_age=30)
    await fetch(http, proxy.url + "/dists/stable/InRelease")
    await proxy.published("/dists/stable/InRelease")
    response, body = await fetch(http, proxy.url + "/dists/stable/InRelease", headers=ONLY_IF_CACHED)
    assert (response.code, body) == (200, b"Suite: stable\n"), "fresh: served"
    clock.advance(31)
    response, _ = await fetch(http, proxy.url + "/dists/stable/InRelease", headers=ONLY_IF_CACHED)
    assert response.code == 504
    assert origin.count("/dists/stable/InRelease") == 1
    response, _ = await fetch(http, proxy.url + "/dists/stable/InRelease")
    assert response.code == 200 and origin.count("/dists/stable/InRelease") == 2

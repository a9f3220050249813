"""
Volatile files over real sockets: an origin that changes a file or goes
away during the test, a proxy whose freshness runs on a ``Clock``.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from tests.conftest import fetch, wait_for

LAYOUT = "/distfiles/layout.conf"
V1 = b"[structure]\n0=filename-hash BLAKE2B 8\n1=flat\n"
V2 = b"[structure]\n0=filename-hash BLAKE2B 8\n"


def status(response) -> bytes:
    return response.headers.getRawHeaders(b"cache-status", [b""])[0]


@pytest_twisted.ensureDeferred
async def test_a_changed_layout_conf_is_seen_after_max_age(origin, make_proxy, http):
    origin.add(LAYOUT, V1, content_type=b"text/plain")
    clock = Clock()
    proxy = make_proxy([origin.url], clock=clock, volatile_max_age=30)
    _, body = await fetch(http, proxy.url + LAYOUT)
    assert body == V1 and await proxy.published(LAYOUT) == V1
    origin.add(LAYOUT, V2, content_type=b"text/plain")
    clock.advance(29)
    response, body = await fetch(http, proxy.url + LAYOUT)
    assert (body, status(response)) == (V1, b"pkgcache; hit; ttl=1")
    clock.advance(1)
    response, body = await fetch(http, proxy.url + LAYOUT)
    assert body == V2
    assert status(response) == b"pkgcache; fwd=stale; fwd-status=200; stored"
    await wait_for(lambda: proxy.cached(LAYOUT).getContent() == V2)
    assert origin.count(LAYOUT) == 2


@pytest_twisted.ensureDeferred
async def test_a_stale_copy_is_served_while_the_only_source_is_down(origins, make_proxy, http):
    origin = origins()
    origin.add(LAYOUT, V1)
    clock = Clock()
    proxy = make_proxy([origin.url], clock=clock, volatile_max_age=30, stale_if_error=60)
    await fetch(http, proxy.url + LAYOUT)
    await proxy.published(LAYOUT)
    await origin.stop()
    await proxy.resource.upstream.close()  # its kept-alive connection too
    clock.advance(31)
    response, body = await fetch(http, proxy.url + LAYOUT)
    assert (response.code, body) == (200, V1)
    assert status(response) == b"pkgcache; hit; detail=stale-if-error"
    clock.advance(60)
    response, _ = await fetch(http, proxy.url + LAYOUT)
    assert response.code == 502

"""
The health URL a load balancer polls, ``/.pkgcache-health``, on the site a
serving port has (:func:`pkgcache.service.serving_site`): 200 while the
node serves and its cache takes files, 503 with the reason otherwise;
never a request to a source, and every other path served as before.
"""

from __future__ import annotations

import shutil

import pytest_twisted
from twisted.internet import reactor
from twisted.python.filepath import FilePath

from pkgcache.health import HealthResource
from pkgcache.mirrors import Mirror
from pkgcache.resource import PackageCacheResource
from pkgcache.root import MirrorsResource
from pkgcache.service import CacheService, serving_site
from pkgcache.sources import Source
from tests.conftest import fetch
from tests.test_twist import twist  # noqa: F401 - a fixture

HEALTH = "/.pkgcache-health"


@pytest_twisted.async_yield_fixture
async def serve(tmp_path):
    """``serve(resource)``: its serving site on 127.0.0.1: ``(url, health)``."""
    running = []

    def start(resource):
        service = CacheService(resource)
        service.startService()
        site, health = serving_site(resource)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        running.append((port, service))
        return f"http://127.0.0.1:{port.getHost().port}", health

    yield start
    for port, service in running:
        await port.stopListening()
        await service.stopService()


def cache_dir(tmp_path) -> FilePath:
    return FilePath(str(tmp_path / "cache"))


@pytest_twisted.ensureDeferred
async def test_a_serving_node_is_healthy_and_no_source_is_asked(origin, serve, http, tmp_path):
    origin.add("/distfiles/a.tar.gz", b"a file")
    url, _ = serve(PackageCacheResource([Source(origin.url)], cache_dir(tmp_path)))
    for method in ("GET", "HEAD"):
        response, body = await fetch(http, url + HEALTH, method=method)
        assert response.code == 200
        assert body == (b"ok\n" if method == "GET" else b"")
        assert response.headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert origin.origin.requests == []
    # Everything else is the cache's, as without the health URL.
    response, body = await fetch(http, url + "/distfiles/a.tar.gz")
    assert (response.code, body) == (200, b"a file")
    response, _ = await fetch(http, url + "/.pkgcache-health/more")
    assert response.code == 404
    assert [path for _, path, _ in origin.origin.requests] == ["/distfiles/a.tar.gz"]


@pytest_twisted.ensureDeferred
async def test_the_health_url_is_never_a_mirror(origin, serve, http, tmp_path):
    origin.add("/x", b"x")
    mirrors = [Mirror("gentoo", (Source(origin.url),), "gentoo")]
    url, _ = serve(MirrorsResource(mirrors, cache_dir(tmp_path)))
    response, body = await fetch(http, url + HEALTH)
    assert (response.code, body) == (200, b"ok\n")
    response, body = await fetch(http, url + "/")
    assert response.code == 200 and b"/gentoo/" in body
    response, body = await fetch(http, url + "/gentoo/x")
    assert (response.code, body) == (200, b"x")


@pytest_twisted.ensureDeferred
async def test_a_cache_that_cannot_take_a_file_is_unhealthy(origin, serve, http, tmp_path):
    url, _ = serve(PackageCacheResource([Source(origin.url)], cache_dir(tmp_path)))
    spool_dir = tmp_path / "cache" / ".pkgcache-spool"
    # (The tests run as root, which no permission stops: a file where the
    # spool directory was is what a vanished or broken cache looks like.)
    shutil.rmtree(spool_dir)
    spool_dir.write_bytes(b"")
    response, body = await fetch(http, url + HEALTH)
    assert response.code == 503
    assert b"the cache directory cannot take files" in body and b"Not a directory" in body
    assert origin.origin.requests == []


@pytest_twisted.ensureDeferred
async def test_a_cache_without_room_is_unhealthy(origin, http, tmp_path):
    resource = PackageCacheResource([Source(origin.url)], cache_dir(tmp_path))
    service = CacheService(resource)
    service.startService()
    from twisted.web.server import Site

    # More free space than any disk has.
    site = Site(HealthResource(resource.store, min_free_bytes=2**62))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        response, body = await fetch(http, f"http://127.0.0.1:{port.getHost().port}/")
        assert response.code == 503 and b"bytes free in" in body
    finally:
        await port.stopListening()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_node_that_is_stopping_is_unhealthy(origin, serve, http, tmp_path):
    url, health = serve(PackageCacheResource([Source(origin.url)], cache_dir(tmp_path)))
    health.stopping = True
    response, body = await fetch(http, url + HEALTH)
    assert (response.code, body) == (503, b"shutting down\n")


@pytest_twisted.ensureDeferred
async def test_twist_pkgcache_answers_health_with_and_without_workers(origin, twist, http, tmp_path):
    for number, workers in enumerate((["--workers", "2"], [])):
        process = twist("--source", origin.url, "--cache-dir", str(tmp_path / f"cache{number}"),
                        *workers)
        await process.ready(http)
        response, body = await fetch(http, process.url + HEALTH)
        assert (response.code, body) == (200, b"ok\n"), process.log.read_text()
        process.kill()
    assert origin.origin.requests == []


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_makes_the_node_unhealthy(origin, http, tmp_path):
    """From the first moment of a stop, before its listeners close."""
    from pkgcache.service import PackageCacheService

    resource = PackageCacheResource([Source(origin.url)], cache_dir(tmp_path))
    service = PackageCacheService(resource, ["tcp:0:interface=127.0.0.1"], reactor)
    service.startService()
    health = service.site.resource.health
    assert not health.stopping
    await service.stopService()
    assert health.stopping

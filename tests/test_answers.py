"""
Answers that stay true, over real sockets: the same headers on a hit and a
miss, no false 404, a status for a failure before the first byte, names of
any legal length, hits that race a cull, clients that stop reading a hit,
and a close that is final.
"""

from __future__ import annotations

import os
import threading

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.web.http import datetimeToString

from pkgcache.paths import CacheKey
from pkgcache.store import StoreClosed
from tests.clients import SmallBufferClient, start_reading
from tests.conftest import fetch, wait_for

PATH = "/pool/main/h/hello/hello_2.10-3_amd64.deb"
DATA = os.urandom(300_000)
ENTITY_HEADERS = (
    b"content-type", b"last-modified", b"accept-ranges", b"x-content-type-options",
    b"content-encoding",
)


def entity_headers(response) -> dict:
    """The headers that describe the file (Twisted's client keeps a GET's
    Content-Length as ``length``, a HEAD's as a header)."""
    headers = {name: response.headers.getRawHeaders(name) for name in ENTITY_HEADERS}
    headers[b"content-length"] = response.headers.getRawHeaders(b"content-length") or response.length
    return headers


async def miss_then_hit(http, proxy, path, method="GET"):
    """The response to ``path`` as a miss, then as a hit."""
    miss = await fetch(http, proxy.url + path, method)
    if method == "HEAD":
        await fetch(http, proxy.url + path)
    await proxy.published(path)
    hit = await fetch(http, proxy.url + path, method)
    return miss, hit


@pytest.mark.parametrize("last_modified", [True, False], ids=["source-dated", "undated"])
@pytest_twisted.ensureDeferred
async def test_a_hit_has_the_headers_of_its_miss(origin, make_proxy, http, last_modified):
    headers = {b"last-modified": datetimeToString(1_600_000_000)} if last_modified else {}
    origin.add(PATH, DATA, content_type=b"application/vnd.debian.binary-package",
               headers=headers)
    proxy = make_proxy([origin.url])
    (miss, miss_body), (hit, hit_body) = await miss_then_hit(http, proxy, PATH)
    assert miss_body == hit_body == DATA
    assert entity_headers(miss) == entity_headers(hit) == {
        b"content-type": [b"application/vnd.debian.binary-package"],
        b"content-length": len(DATA),
        b"last-modified": miss.headers.getRawHeaders(b"last-modified"),
        b"accept-ranges": [b"bytes"],
        b"x-content-type-options": [b"nosniff"],
        b"content-encoding": None,
    }
    if last_modified:
        assert hit.headers.getRawHeaders(b"last-modified") == [datetimeToString(1_600_000_000)]


@pytest_twisted.ensureDeferred
async def test_a_head_miss_has_the_headers_of_a_hit(origin, make_proxy, http):
    origin.add(PATH, DATA, content_type=b"application/x-xz",
               headers={b"last-modified": datetimeToString(1_600_000_000)})
    proxy = make_proxy([origin.url])
    (miss, _), (hit, _) = await miss_then_hit(http, proxy, PATH, method="HEAD")
    assert entity_headers(miss) == entity_headers(hit)
    assert hit.headers.getRawHeaders(b"content-length") == [b"%d" % len(DATA)]


@pytest.mark.parametrize("name", ["logo.svg", "page.html", "release-1.0.tar.gz"])
@pytest_twisted.ensureDeferred
async def test_no_type_is_guessed_from_a_name(origin, make_proxy, http, name):
    # A browser would render an SVG or HTML page, or unpack a .tar.gz.
    path = "/files/" + name
    origin.add(path, DATA, content_type=None)
    proxy = make_proxy([origin.url])
    (miss, _), (hit, _) = await miss_then_hit(http, proxy, path)
    for response in (miss, hit):
        assert response.headers.getRawHeaders(b"content-type") == [b"application/octet-stream"]
        assert response.headers.getRawHeaders(b"content-encoding") is None
        assert response.headers.getRawHeaders(b"x-content-type-options") == [b"nosniff"]


@pytest_twisted.ensureDeferred
async def test_a_file_only_a_source_in_backoff_has_is_served(origins, make_proxy, http):
    first, flaky = origins(), origins()
    flaky.add("/other", status=503)
    flaky.add(PATH, DATA)
    proxy = make_proxy([flaky.url, first.url])
    response, _ = await fetch(http, proxy.url + "/other")
    assert response.code == 502
    assert proxy.resource.upstream.health.is_down(proxy.resource.upstream.sources[0])

    # first says 404; flaky, in back-off, is asked last and has it.
    response, body = await fetch(http, proxy.url + PATH)
    assert (response.code, body) == (200, DATA)
    assert first.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_a_last_resort_that_fails_gives_502_with_every_reason(origins, make_proxy, http):
    first, dead = origins(), origins()
    dead.add("/other", status=500)
    dead.add(PATH, status=500)
    proxy = make_proxy([dead.url, first.url])
    await fetch(http, proxy.url + "/other")
    response, body = await fetch(http, proxy.url + PATH)
    assert response.code == 502
    assert f"{first.url}: not found (HTTP 404)".encode() in body
    assert f"{dead.url}: server error (HTTP 500)".encode() in body


@pytest_twisted.ensureDeferred
async def test_a_range_past_where_the_download_broke_gets_502(origin, make_proxy, http):
    origin.add(PATH, DATA, close_at=100_000, ranges=False)
    proxy = make_proxy([origin.url])
    response, body = await fetch(http, proxy.url + PATH, headers={b"range": [b"bytes=200000-"]})
    assert response.code == 502
    assert b"the download failed before these bytes arrived" in body
    assert not proxy.cached(PATH).exists()


@pytest_twisted.ensureDeferred
async def test_a_name_of_252_bytes_in_four_byte_characters_is_cached(origin, make_proxy, http):
    name = "\U0001d11e" * 63  # 252 bytes of UTF-8, 63 characters
    path = "/distfiles/" + name
    quoted = "/distfiles/" + "%F0%9D%84%9E" * 63
    origin.add(quoted, DATA)  # the origin sees it percent-encoded
    proxy = make_proxy([origin.url])
    response, body = await fetch(http, proxy.url + quoted)
    assert (response.code, body) == (200, DATA)
    assert await proxy.published(path) == DATA


@pytest_twisted.ensureDeferred
async def test_a_hit_is_read_from_the_file_it_opened(origin, make_proxy, http):
    origin.add(PATH, DATA)
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + PATH)
    await proxy.published(PATH)
    store = proxy.resource.store
    key = CacheKey(tuple(PATH.strip("/").split("/")))
    cached = store.open_file(key)
    os.unlink(proxy.cached(PATH).path)  # a cull, right after the open
    try:
        assert cached.read(0, len(DATA) + 1) == DATA
    finally:
        cached.close()
    # Now it is a miss, not an error page.
    assert store.open_file(key) is None
    with pytest.raises(IsADirectoryError):
        store.open_file(CacheKey(("pool",)))
    response, body = await fetch(http, proxy.url + PATH)
    assert (response.code, body) == (200, DATA)
    assert origin.count(PATH) == 2


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_a_hit_is_dropped(origin, make_proxy, http):
    big = os.urandom(16 * 1024 * 1024)
    origin.add(PATH, big)
    proxy = make_proxy([origin.url], client_stall_timeout=0.5)
    await fetch(http, proxy.url + PATH)
    await proxy.published(PATH)
    dropped: list = []

    def observe(event):
        if event.get("log_format", "").startswith("dropping a client of"):
            dropped.append(event)

    globalLogPublisher.addObserver(observe)
    stuck = SmallBufferClient(proxy.url + PATH, receive_buffer=16 * 1024)
    try:
        # It reads a little, then nothing until it is dropped: then it finds
        # its connection cut, far short of the file.
        await wait_for(lambda: stuck.read(1024) > 0)
        await wait_for(lambda: dropped, timeout=20)
        body = await stuck.read_to_end(timeout=20)
        assert stuck.closed and len(body) < len(big) // 2
    finally:
        stuck.close()
        globalLogPublisher.removeObserver(observe)
    # One that keeps reading gets it all.
    response, body = await fetch(http, proxy.url + PATH)
    assert body == big


@pytest_twisted.ensureDeferred
async def test_after_close_nothing_is_published_and_no_thread_is_joined_here(
    origin, make_proxy, http, monkeypatch
):
    stopped_in: list = []
    stop = ThreadPool.stop

    def recording_stop(pool):
        stopped_in.append(threading.current_thread())
        stop(pool)

    monkeypatch.setattr(ThreadPool, "stop", recording_stop)
    origin.add(PATH, DATA, rate=200_000)
    proxy = make_proxy([origin.url])
    _, reader = await start_reading(http, proxy.url + PATH)
    await wait_for(lambda: reader.received > 0)
    await proxy.resource.close()
    assert stopped_in and threading.main_thread() not in stopped_in
    reader.done.addErrback(lambda _: None)
    await reader.done
    assert not proxy.cached(PATH).exists()
    assert proxy.spools() == []
    with pytest.raises(StoreClosed):
        await proxy.resource.store.in_disk_thread(lambda: None)
    response, _ = await fetch(http, proxy.url + PATH)
    assert response.code == 503

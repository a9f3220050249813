"""
The core proxy over real sockets: misses, hits, failover, errors, headers.
"""

from __future__ import annotations

import gzip
import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.web.client import ResponseFailed, readBody
from twisted.web.http import datetimeToString

from pkgcache.download import DownloadState
from pkgcache.paths import CacheKey
from pkgcache.sources import Source
from pkgcache.upstream import UpstreamClient
from tests.clients import within
from tests.conftest import fetch, raw_request, wait_for
from tests.origin import Gate, refused_url

FILE = os.urandom(300_000)
PATH = "/distfiles/ab/foo-1.2.tar.gz"
KEY = CacheKey(("distfiles", "ab", "foo-1.2.tar.gz"))


def _upstream(urls, clock: Clock, **options) -> UpstreamClient:
    """A client for the sources at ``urls`` whose timers and back-off run on ``clock``."""
    return UpstreamClient([Source(url) for url in urls], reactor, clock=clock, **options)


@pytest_twisted.ensureDeferred
async def test_miss_then_hit_without_contacting_source(origin, make_proxy, http):
    origin.add(PATH, FILE)
    proxy = make_proxy([origin.url])

    response, body = await fetch(http, proxy.url + PATH)
    assert response.code == 200
    assert body == FILE
    assert await proxy.published(PATH) == FILE
    assert proxy.spools() == []

    await origin.stop()
    response, body = await fetch(http, proxy.url + PATH)
    assert response.code == 200
    assert body == FILE
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_source_base_path_is_kept(origin, make_proxy, http):
    origin.add("/mirror/gentoo" + PATH, FILE)
    proxy = make_proxy([origin.url + "mirror/gentoo"])
    response, body = await fetch(http, proxy.url + PATH)
    assert (response.code, body) == (200, FILE)


@pytest_twisted.ensureDeferred
async def test_failover_past_refused_500_404_and_silent_sources(origins, make_proxy, http):
    broken, missing, silent, good = origins(), origins(), origins(), origins()
    broken.add(PATH, status=500)
    silent.add(PATH, hang=True)
    good.add(PATH, FILE)
    clock = Clock()
    proxy = make_proxy([], upstream=_upstream(
        [refused_url(), broken.url, missing.url, silent.url, good.url], clock, idle_timeout=0.5
    ))
    answer = Deferred.fromCoroutine(fetch(http, proxy.url + PATH))
    # The silent source has the request: the idle timeout passes.
    await wait_for(lambda: silent.count(PATH) == 1)
    clock.advance(0.5)
    response, body = await answer
    assert (response.code, body) == (200, FILE)
    assert [s.count(PATH) for s in (broken, missing, silent, good)] == [1, 1, 1, 1]
    assert await proxy.published(PATH) == FILE


@pytest_twisted.ensureDeferred
async def test_redirects_within_the_sources_are_followed(origins, make_proxy, http):
    redirector, mirror = origins(), origins()
    mirror.add("/real/foo.tar.gz", FILE)
    redirector.add(
        PATH, status=302, headers={b"location": (mirror.url + "real/foo.tar.gz").encode()}
    )
    proxy = make_proxy([redirector.url, mirror.url])
    response, body = await fetch(http, proxy.url + PATH)
    assert (response.code, body) == (200, FILE)
    assert await proxy.published(PATH) == FILE
    assert mirror.count(PATH) == 0, "the redirect was followed, not failed over"


@pytest.mark.parametrize("target", ["http://127.0.0.2:{port}/x", "http://localhost:{port}/x",
                                    "http://127.0.0.1:1/x", "file:///etc/passwd"])
@pytest_twisted.ensureDeferred
async def test_redirects_out_of_the_sources_fail_over(origins, make_proxy, http, target):
    redirector, next_source, elsewhere = origins(), origins(), origins()
    elsewhere.add("/x", b"not from a source")
    port = elsewhere.port.getHost().port
    redirector.add(PATH, status=302, headers={b"location": target.format(port=port).encode()})
    next_source.add(PATH, FILE)
    proxy = make_proxy([redirector.url, next_source.url])
    response, body = await fetch(http, proxy.url + PATH)
    assert (response.code, body) == (200, FILE)
    assert elsewhere.origin.requests == []
    assert not proxy.resource.upstream.health.is_down(proxy.resource.upstream.sources[0])

    proxy_alone = make_proxy([redirector.url], cache_dir=proxy.cache_dir.sibling("alone"))
    response, body = await fetch(http, proxy_alone.url + PATH)
    assert response.code == 502
    assert b"redirect refused" in body


@pytest_twisted.ensureDeferred
async def test_every_source_404_gives_404_and_caches_nothing(origins, make_proxy, http):
    first, second = origins(), origins()
    second.add(PATH, status=410)
    proxy = make_proxy([first.url, second.url])
    response, body = await fetch(http, proxy.url + PATH)
    assert response.code == 404
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]
    assert b"not found" in body
    assert not proxy.cached(PATH).exists()


@pytest_twisted.ensureDeferred
async def test_mixed_failures_give_502(origins, make_proxy, http):
    missing, broken = origins(), origins()
    broken.add(PATH, status=503)
    proxy = make_proxy([missing.url, broken.url])
    response, body = await fetch(http, proxy.url + PATH)
    assert response.code == 502
    assert b"HTTP 503" in body and b"HTTP 404" in body


@pytest_twisted.ensureDeferred
async def test_every_source_timing_out_gives_504(origins, make_proxy, http):
    silent = origins()
    silent.add(PATH, hang=True)
    clock = Clock()
    proxy = make_proxy([], upstream=_upstream([silent.url], clock, idle_timeout=0.3))
    answer = Deferred.fromCoroutine(fetch(http, proxy.url + PATH))
    await wait_for(lambda: silent.count(PATH) == 1)
    clock.advance(0.3)
    response, body = await answer
    assert response.code == 504
    assert b"timed out" in body
    assert not proxy.cached(PATH).exists()


@pytest_twisted.ensureDeferred
async def test_miss_passes_headers_and_sets_mtime(origin, make_proxy, http):
    last_modified = datetimeToString(1_600_000_000)
    origin.add(
        PATH,
        FILE,
        headers={b"content-type": b"application/x-gentoo", b"last-modified": last_modified},
    )
    proxy = make_proxy([origin.url])
    response, body = await fetch(http, proxy.url + PATH)
    assert response.length == len(FILE)
    assert response.headers.getRawHeaders(b"content-type") == [b"application/x-gentoo"]
    assert response.headers.getRawHeaders(b"last-modified") == [last_modified]
    await proxy.published(PATH)
    assert os.stat(proxy.cached(PATH).path).st_mtime == 1_600_000_000


class _FirstChunk(Protocol):
    def __init__(self):
        self.first = Deferred()

    def dataReceived(self, data):
        if not self.first.called:
            self.first.callback(data)

    def connectionLost(self, reason):
        if not self.first.called:
            self.first.errback(reason)


@pytest_twisted.ensureDeferred
async def test_client_gets_first_bytes_while_download_runs(origin, make_proxy, http):
    # The rest of the file comes only once the client has its first bytes.
    gate = Gate()
    origin.add(PATH, FILE, gate=gate, pause_at=100_000)
    proxy = make_proxy([origin.url])
    response = await within(10, http.request("GET", proxy.url + PATH),
                            "the headers only came after the download")
    receiver = _FirstChunk()
    response.deliverBody(receiver)
    waited = "first bytes only came after the download"
    first = await within(10, receiver.first, waited)
    assert FILE.startswith(first)
    assert not proxy.cached(PATH).exists(), waited
    gate.open()
    await wait_for(lambda: proxy.cached(PATH).exists())


@pytest.mark.parametrize(
    "failure",
    [
        {"close_at": 100_000},
        {"close_at": 100_000, "content_length": False},
        {"stall_at": 50_000},
    ],
    ids=["closed-early", "chunked-closed-early", "stalled"],
)
@pytest_twisted.ensureDeferred
async def test_cut_body_drops_the_client_and_caches_nothing(origin, make_proxy, http, failure):
    origin.add(PATH, FILE, ranges=False, **failure)
    clock = Clock()
    proxy = make_proxy([], upstream=_upstream([origin.url], clock, idle_timeout=0.5))
    response = await http.request("GET", proxy.url + PATH)
    assert response.code == 200
    reading = readBody(response)
    if "stall_at" in failure:
        # All the source will send has come: then its silence outlasts the
        # idle timeout.
        download = proxy.resource.downloads.in_flight(KEY)
        await wait_for(lambda: download.received == failure["stall_at"])
        clock.advance(0.5)
    try:
        await reading
    except ResponseFailed:
        pass
    else:
        raise AssertionError("a cut body was delivered as complete")
    assert not proxy.cached(PATH).exists()
    await wait_for(lambda: proxy.spools() == [])


@pytest_twisted.ensureDeferred
async def test_chunked_body_without_length_is_cached(origin, make_proxy, http):
    origin.add(PATH, FILE, content_length=False)
    proxy = make_proxy([origin.url])
    response, body = await fetch(http, proxy.url + PATH)
    assert body == FILE
    assert await proxy.published(PATH) == FILE


@pytest_twisted.ensureDeferred
async def test_vanished_client_does_not_abort_download(origin, make_proxy, http):
    # The rest of the file comes only once pkgcache has seen the client go.
    gate = Gate()
    origin.add(PATH, FILE, gate=gate, pause_at=100_000)
    proxy = make_proxy([origin.url])
    response = await http.request("GET", proxy.url + PATH)
    receiver = _FirstChunk()
    response.deliverBody(receiver)
    await receiver.first
    download = proxy.resource.downloads.in_flight(KEY)
    receiver.transport.stopProducing()  # the client hangs up
    await wait_for(lambda: not download.followers)
    assert download.state is DownloadState.RECEIVING
    gate.open()
    assert await proxy.published(PATH) == FILE
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_stored_bytes_are_never_decoded(origin, make_proxy, http):
    compressed = gzip.compress(FILE)
    origin.add(PATH, compressed, headers={b"content-encoding": b"gzip"})
    proxy = make_proxy([origin.url])
    response, body = await fetch(http, proxy.url + PATH)
    assert body == compressed
    assert await proxy.published(PATH) == compressed
    assert response.headers.getRawHeaders(b"content-encoding") is None
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_source_is_asked_for_identity_encoding(origin, make_proxy, http):
    seen = []
    origin.add(PATH, FILE)
    original_render = origin.origin.render

    def recording_render(request):
        seen.append(request.getHeader(b"accept-encoding"))
        return original_render(request)

    origin.origin.render = recording_render
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + PATH)
    assert seen == [b"identity"]


@pytest_twisted.ensureDeferred
async def test_hit_headers_ranges_and_conditional_get(origin, make_proxy, http):
    origin.add(PATH, FILE, headers={b"last-modified": datetimeToString(1_600_000_000)})
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + PATH)
    await proxy.published(PATH)
    url = proxy.url + PATH

    response, body = await fetch(http, url)
    assert response.length == len(FILE)
    assert response.headers.getRawHeaders(b"content-encoding") is None
    assert response.headers.getRawHeaders(b"last-modified") == [datetimeToString(1_600_000_000)]

    response, body = await fetch(http, url, headers={b"range": [b"bytes=100-199"]})
    assert (response.code, body) == (206, FILE[100:200])

    response, body = await fetch(http, url, headers={b"range": [b"bytes=0-9,20-29"]})
    assert response.code == 206
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"multipart/byteranges")
    assert FILE[0:10] in body and FILE[20:30] in body

    response, body = await fetch(http, url, headers={b"range": [b"bytes=999999-"]})
    assert response.code == 416

    response, body = await fetch(
        http, url, headers={b"if-modified-since": [datetimeToString(1_700_000_000)]}
    )
    assert (response.code, body) == (304, b"")

    head = await raw_request(proxy.url, b"HEAD %s HTTP/1.0\r\n\r\n" % PATH.encode())
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"\r\nContent-Length: %d\r\n" % len(FILE) in head
    assert head.endswith(b"\r\n\r\n")
    assert origin.count(PATH) == 1
    assert origin.count(PATH, b"HEAD") == 0


@pytest_twisted.ensureDeferred
async def test_hit_content_type_falls_back_to_octet_stream(origin, make_proxy, http):
    origin.add("/pool/blob.unknownext", FILE, content_type=None)
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + "/pool/blob.unknownext")
    await proxy.published("/pool/blob.unknownext")
    response, _ = await fetch(http, proxy.url + "/pool/blob.unknownext")
    assert response.headers.getRawHeaders(b"content-type") == [b"application/octet-stream"]


@pytest_twisted.ensureDeferred
async def test_other_methods_get_405(origin, make_proxy, http):
    origin.add(PATH, FILE)
    proxy = make_proxy([origin.url])
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        response, _ = await fetch(http, proxy.url + PATH, method=method)
        assert response.code == 405
        assert response.headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
    assert origin.origin.requests == []


@pytest_twisted.ensureDeferred
async def test_query_string_is_neither_forwarded_nor_part_of_the_key(origin, make_proxy, http):
    origin.add(PATH, FILE)
    proxy = make_proxy([origin.url])
    _, first = await fetch(http, proxy.url + PATH + "?x=1")
    _, second = await fetch(http, proxy.url + PATH + "?y=2")
    assert first == second == FILE
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_directory_requests_are_404_never_a_listing(origin, make_proxy, http):
    origin.add(PATH, FILE)
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + PATH)
    # Only once it is published are its directories there to be refused.
    await proxy.published(PATH)
    for path in ("/", "/distfiles/", "/distfiles/ab/", "/distfiles", "/distfiles/ab"):
        response, body = await fetch(http, proxy.url + path)
        assert response.code == 404, path
        assert b"foo-1.2" not in body
    assert origin.count("/distfiles") == 0


@pytest_twisted.ensureDeferred
async def test_name_below_a_cached_file_is_not_cached(origin, make_proxy, http):
    origin.add("/a", FILE)
    origin.add("/a/b", b"child")
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + "/a")
    assert await proxy.published("/a") == FILE
    response, body = await fetch(http, proxy.url + "/a/b")
    assert (response.code, body) == (200, b"child")
    await wait_for(lambda: proxy.resource.downloads.in_flight(CacheKey(("a", "b"))) is None)
    assert proxy.cached("/a").getContent() == FILE


@pytest_twisted.ensureDeferred
async def test_spools_are_never_served(origin, make_proxy, http):
    # The download stays mid-way (its spool there) until the test is done.
    gate = Gate()
    origin.add(PATH, FILE, gate=gate, pause_at=100_000)
    proxy = make_proxy([origin.url])
    downloading = Deferred.fromCoroutine(fetch(http, proxy.url + PATH))
    await wait_for(lambda: proxy.spools() != [])
    name = proxy.spools()[0]
    response, body = await fetch(http, proxy.url + "/.pkgcache-spool/" + name)
    assert response.code == 404
    assert origin.count("/.pkgcache-spool/" + name) == 0
    gate.open()
    _, body = await downloading
    assert body == FILE


@pytest_twisted.ensureDeferred
async def test_stale_spools_are_swept_at_start_but_live_ones_kept(tmp_path, origin, make_proxy):
    import fcntl

    spool_dir = tmp_path / "cache" / ".pkgcache-spool"
    spool_dir.mkdir(parents=True)
    (spool_dir / "crashed.foo.tar.gz").write_bytes(b"partial")
    live = spool_dir / "live.bar.tar.gz"
    with open(live, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        make_proxy([origin.url])
        assert sorted(os.listdir(spool_dir)) == ["live.bar.tar.gz"]


@pytest_twisted.ensureDeferred
async def test_large_file_sha256(origin, make_proxy, http):
    data = os.urandom(8 * 1024 * 1024)
    origin.add("/big.bin", data, chunk_size=65536)
    proxy = make_proxy([origin.url])
    _, body = await fetch(http, proxy.url + "/big.bin")
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    published = await proxy.published("/big.bin")
    assert hashlib.sha256(published).digest() == hashlib.sha256(data).digest()


@pytest_twisted.ensureDeferred
async def test_hostile_paths_never_reach_a_source_or_escape_the_cache(origin, make_proxy, tmp_path):
    (tmp_path / "secret").write_bytes(b"secret")
    origin.add(PATH, FILE)
    proxy = make_proxy([origin.url])
    hostile = {
        b"/distfiles/../../secret": (400,),
        b"/distfiles/%2e%2e/%2e%2e/secret": (400,),
        b"/distfiles/..%2F..%2Fsecret": (400,),
        b"/distfiles/a%00b": (400,),
        b"/distfiles/a%5C..%5Csecret": (400,),
        b"//secret": (400,),
        b"/" + b"x" * 300: (400,),
        b"/.pkgcache-spool/x": (404,),
        b"/distfiles/.pkgcache-index": (404,),
    }
    for path, statuses in hostile.items():
        answer = await raw_request(proxy.url, b"GET %s HTTP/1.0\r\n\r\n" % path)
        status = int(answer.split(b" ", 2)[1])
        assert status in statuses, (path, answer[:200])
        assert b"secret" not in answer.split(b"\r\n\r\n", 1)[1]
    assert origin.origin.requests == []
    assert sorted(os.listdir(tmp_path)) == ["cache", "secret"]


@pytest_twisted.ensureDeferred
async def test_not_an_open_proxy(origins, make_proxy):
    mine, other = origins(), origins()
    other.add(PATH, b"other host")
    mine.add(PATH, FILE)
    proxy = make_proxy([mine.url])
    absolute = other.url.rstrip("/").encode() + PATH.encode()
    answer = await raw_request(proxy.url, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % absolute)
    assert answer.startswith(b"HTTP/1.1 400 ")
    authority = other.url.split("//")[1].rstrip("/").encode()
    answer = await raw_request(proxy.url, b"CONNECT %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (authority, authority))
    assert answer.startswith(b"HTTP/1.1 405 ")
    assert other.origin.requests == [] and mine.origin.requests == []


@pytest_twisted.ensureDeferred
async def test_embedded_below_a_path_in_an_existing_site(origin, http, tmp_path):
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from pkgcache import CacheService, PackageCacheResource

    origin.add(PATH, FILE)
    root = Resource()
    cache = PackageCacheResource(sources=[origin.url], cache_dir=str(tmp_path / "cache"))
    root.putChild(b"gentoo", cache)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/gentoo{PATH}"
    service = CacheService(cache)
    try:
        response, body = await fetch(http, url)
        assert response.code == 503, "served before its service started"
        assert not (tmp_path / "cache").exists(), "making the resource did I/O"
        service.startService()
        response, body = await fetch(http, url)
        assert (response.code, body) == (200, FILE)
        assert origin.origin.requests == [(b"GET", PATH, None)]
        await wait_for(lambda: (tmp_path / "cache" / PATH.lstrip("/")).exists())
    finally:
        await port.stopListening()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_hits_record_their_access_time_at_most_hourly(origin, make_proxy, http):
    import time

    origin.add(PATH, FILE, headers={b"last-modified": datetimeToString(1_600_000_000)})
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + PATH)
    path = proxy.cached(PATH).path
    await proxy.published(PATH)

    # The kernel may update atime on reads too (relatime), but never ctime:
    # a changed ctime shows that pkgcache itself set the atime.
    os.utime(path, (1_000_000_000, 1_600_000_000))
    before = os.stat(path).st_ctime_ns
    await fetch(http, proxy.url + PATH)
    assert abs(os.stat(path).st_atime - time.time()) < 60
    assert os.stat(path).st_mtime == 1_600_000_000
    assert os.stat(path).st_ctime_ns > before

    os.utime(path, (time.time() - 600, 1_600_000_000))
    before = os.stat(path).st_ctime_ns
    await fetch(http, proxy.url + PATH)
    assert os.stat(path).st_ctime_ns == before, "atime was set again within the hour"


@pytest_twisted.ensureDeferred
async def test_empty_file_with_a_range_on_a_miss(origin, make_proxy, http):
    origin.add("/empty", b"")
    proxy = make_proxy([origin.url])
    response, body = await fetch(http, proxy.url + "/empty", headers={b"range": [b"bytes=-5"]})
    assert (response.code, body) == (200, b"")
    assert await proxy.published("/empty") == b""

"""
What pkgcache asks the sources, and what its clients are told: request
headers, HEAD on a miss, bytes as stored, empty files, and clients that
join while a download is being published.
"""

from __future__ import annotations

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from pkgcache.upstream import USER_AGENT
from tests.memory.conftest import A, B, PATH, HeldDisk, url

DATA = bytes(range(256)) * 40


def test_sources_are_asked_for_the_bytes_as_stored(cache, network):
    client = cache.get(PATH + "?query=dropped", headers={"accept-encoding": "gzip"})
    request = network.pending(url(A))  # the query string is not forwarded
    assert request.header("user-agent") == USER_AGENT.decode()
    assert request.header("accept-encoding") == "identity"
    assert request.range is None
    request.serve(DATA, headers={"content-encoding": "gzip", "content-type": "application/x-tar"})
    assert client.body == DATA
    assert client.header("content-encoding") is None, "the stored bytes are never labelled encoded"
    assert client.header("content-type") == "application/x-tar"
    assert client.header("x-content-type-options") == "nosniff"
    assert client.header("accept-ranges") == "bytes"
    assert client.length == len(DATA)
    assert cache.cached() == DATA


def test_head_on_a_miss_asks_the_sources_with_head_and_caches_nothing(cache, network):
    client = cache.head()
    request = network.pending(url(A))
    assert request.method == b"HEAD"
    request.serve(DATA, headers={"content-type": "application/x-tar"})
    assert client.code == 200 and client.complete and client.body == b""
    assert client.length == len(DATA)
    assert cache.cached() is None and cache.spools() == []


def test_head_on_a_miss_fails_over_like_a_get(cache, network):
    client = cache.head()
    network.pending(url(A)).refuse()
    network.pending(url(B)).serve(b"", 404)
    assert client.code == 502 and client.body == b""


def test_head_during_a_download_is_answered_from_it(cache, network):
    downloading = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:100])
    head = cache.head()
    assert head.code == 200 and head.complete and head.length == len(DATA)
    assert network.urls == [url(A)]
    body.send(DATA[100:])
    assert downloading.complete


def test_an_empty_file_is_served_and_cached(cache, network):
    client = cache.get()
    network.pending(url(A)).serve(b"")
    assert (client.code, client.body, client.complete) == (200, b"", True)
    assert cache.cached() == b""
    hit = cache.get()
    assert (hit.code, hit.length, hit.complete) == (200, 0, True)


def test_a_client_joining_while_the_file_is_published_gets_it_whole(make_cache, network):
    disk = HeldDisk()
    cache = make_cache(run_blocking=disk)
    first = cache.get()
    network.pending(url(A)).serve(DATA)
    assert first.complete
    disk.run_all()
    assert cache.cached() == DATA
    second = cache.get("/distfiles/other")
    body = network.pending(url(A, "/distfiles/other")).respond(length=len(DATA))
    body.send(DATA)  # all in memory: the disk has not written it yet
    assert disk.queued
    joined = cache.get("/distfiles/other")
    assert network.urls[-1] == url(A, "/distfiles/other") and len(network.requests) == 2
    disk.run_all()
    assert cache.cached("/distfiles/other") == DATA
    assert (second.body, second.complete) == (DATA, True)
    assert (joined.body, joined.complete) == (DATA, True)
    assert cache.spools() == []


def test_an_unsafe_path_never_reaches_a_source(cache, network):
    for path in ("/a/..%2F..%2Fetc/passwd", "/.pkgcache-spool/x", "/a/%00b"):
        client = cache.get(path)
        assert client.code in (400, 404), path
    assert network.requests == []


def request_lines(cache, path: str = PATH) -> list[dict]:
    """The ``twisted.logger`` events about requests logged while ``path`` is got."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert cache.get(path).complete
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [event for event in events if event.get("log_namespace") == "pkgcache.resource"]


def test_a_request_is_logged_only_if_asked_for(make_cache):
    quiet = make_cache()
    quiet.put(PATH, DATA)
    assert request_lines(quiet) == []
    chatty = make_cache(log_requests=True)
    (event,) = request_lines(chatty)
    assert event["log_level"] == LogLevel.info
    assert formatEvent(event) == f"GET {PATH} hit 200 {len(DATA)} bytes 0.000s source=-"

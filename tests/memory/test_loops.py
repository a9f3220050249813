"""
508 and only-if-cached, in memory: a pkgcache's loop refusal (marked
``detail=loop`` in its Cache-Status) is passed on as 508, another
server's own 508 is a server error like any 5xx, and neither puts a
source in back-off for it; a sibling's only-if-cached probe that finds
nothing is a miss, not an error.
"""

from __future__ import annotations

from tests.memory.conftest import A, B, url

DATA = b"a file\n" * 1000


def test_a_pkgcache_refusing_a_loop_is_passed_on_as_508(make_cache, network):
    cache = make_cache(sources=(A,))
    client = cache.get()
    network.pending(url(A)).serve(b"loop detected\n", code=508, headers={
        "cache-status": "upper; detail=loop"})
    assert (client.code, client.response.phrase) == (508, b"Loop Detected")
    assert client.header("cache-status") == "pkgcache; fwd=miss; detail=loop"
    # A client's Via can name any node: that says nothing of A's health.
    assert not cache.health.is_down(cache.upstream.sources[0])


def test_another_servers_508_is_a_server_error(make_cache, network):
    """("508 Resource Limit Is Reached", as some hosting panels answer.)"""
    cache = make_cache(sources=(A, B))
    client = cache.get()
    network.pending(url(A)).serve(b"resource limit is reached\n", code=508)
    network.pending(url(B)).serve(DATA)
    assert (client.code, client.body) == (200, DATA)
    assert cache.health.is_down(cache.upstream.sources[0])
    alone = make_cache(sources=(A,))
    client = alone.get("/distfiles/bar-2.0.tar.gz")
    network.pending(url(A, "/distfiles/bar-2.0.tar.gz")).serve(b"limit\n", code=508)
    assert client.code == 502


def test_an_only_if_cached_probe_that_finds_nothing_is_a_miss(cache, network):
    client = cache.get(headers={"cache-control": "only-if-cached"})
    assert client.code == 504
    requests = cache.resource.metrics.requests
    assert requests.labels("", "miss")._value.get() == 1
    assert requests.labels("", "error")._value.get() == 0
    assert network.urls == []

"""
Volatile files in memory, on the clock: served while fresh, revalidated
with the source that produced them (304 and 200), shared revalidation,
stale-if-error, negative caching, client cache control, directory URLs.
"""

from __future__ import annotations

import os

import pytest
from twisted.web import http

from tests.memory.conftest import A, B, key, url

INDEX = "/debian/dists/stable/main/binary-amd64/Packages.xz"
OLD = b"old index " * 50
NEW = b"new index " * 60
V1 = {"etag": '"v1"', "last-modified": "Mon, 01 Jun 2026 10:00:00 GMT"}
V2 = {"etag": '"v2"', "last-modified": "Tue, 02 Jun 2026 10:00:00 GMT"}


def sample(cache, name: str, **labels) -> float:
    labels = {"mirror": "", **labels}
    return cache.resource.metrics.registry.get_sample_value(name, labels) or 0.0


def cached_copy(cache, network, path=INDEX, data=OLD, headers=V1, source=A):
    """Fetch ``path`` once (a miss), from ``source``."""
    client = cache.get(path)
    if source is B:
        network.pending(url(A, path)).refuse()
    network.pending(url(source, path)).serve(data, headers=headers)
    assert (client.code, client.body) == (200, data)
    assert cache.cached(path) == data
    return client


@pytest.fixture
def cache(make_cache):
    return make_cache(volatile_max_age=30, stale_if_error=100, negative_max_age=60)


def test_a_volatile_file_is_a_hit_while_fresh(cache, network):
    miss = cached_copy(cache, network)
    assert miss.header("cache-status") == "pkgcache; fwd=miss; fwd-status=200; stored"
    cache.advance(29)
    hit = cache.get(INDEX)
    assert (hit.code, hit.body) == (200, OLD)
    assert hit.header("cache-status") == "pkgcache; hit; ttl=1"
    assert hit.header("etag") == '"v1"'
    assert len(network.requests) == 1


def test_a_stale_file_is_revalidated_with_its_validators_and_a_304_keeps_it(cache, network):
    cached_copy(cache, network)
    cache.advance(30)
    client = cache.get(INDEX)
    check = network.pending(url(A, INDEX))
    assert check.header("if-none-match") == '"v1"'
    assert check.header("if-modified-since") == V1["last-modified"]
    check.respond(http.NOT_MODIFIED, length=0)
    assert (client.code, client.body) == (200, OLD)
    assert client.header("cache-status") == "pkgcache; fwd=stale; fwd-status=304"
    # Fresh again, for max-age from the check.
    cache.advance(29)
    again = cache.get(INDEX)
    assert (again.body, again.header("cache-status")) == (OLD, "pkgcache; hit; ttl=1")
    assert len(network.requests) == 2
    assert sample(cache, "pkgcache_revalidations_total", result="not-modified") == 1
    assert sample(cache, "pkgcache_requests_total", outcome="revalidated") == 1


def test_a_changed_file_streams_and_replaces_the_copy(cache, network):
    cached_copy(cache, network)
    cache.advance(31)
    client = cache.get(INDEX)
    network.pending(url(A, INDEX)).serve(NEW, headers=V2)
    assert (client.code, client.body) == (200, NEW)
    assert client.header("cache-status") == "pkgcache; fwd=stale; fwd-status=200; stored"
    assert cache.cached(INDEX) == NEW
    hit = cache.get(INDEX)
    assert (hit.body, hit.header("etag")) == (NEW, '"v2"')
    assert sample(cache, "pkgcache_revalidations_total", result="modified") == 1


@pytest.mark.parametrize("answer", ["304", "200"])
def test_many_clients_of_a_stale_file_make_one_revalidation(cache, network, answer):
    cached_copy(cache, network)
    cache.advance(31)
    clients = [cache.get(INDEX) for _ in range(20)]
    check = network.pending(url(A, INDEX))
    if answer == "304":
        check.respond(http.NOT_MODIFIED, length=0)
    else:
        check.serve(NEW, headers=V2)
    expected = OLD if answer == "304" else NEW
    assert [(client.code, client.body) for client in clients] == [(200, expected)] * 20
    assert len(network.requests) == 2
    assert sum(sample(cache, "pkgcache_revalidations_total", result=result)
               for result in ("not-modified", "modified")) == 1


def test_validators_go_only_to_the_source_that_produced_the_copy(cache, network):
    cached_copy(cache, network, source=B)
    cache.advance(31)
    client = cache.get(INDEX)
    first = network.pending(url(B, INDEX))
    assert first.header("if-none-match") == '"v1"'
    first.respond(503, length=0)
    second = network.pending(url(A, INDEX))
    assert second.header("if-none-match") is None and second.header("if-modified-since") is None
    second.serve(NEW, headers=V2)
    assert client.body == NEW and cache.cached(INDEX) == NEW


def test_validators_and_the_check_time_survive_a_restart(make_cache, network):
    first = make_cache(volatile_max_age=30)
    cached_copy(first, network)
    first.stop()
    second = make_cache(volatile_max_age=30)
    second.advance(10)
    hit = second.get(INDEX)
    assert (hit.body, hit.header("cache-status")) == (OLD, "pkgcache; hit; ttl=20")
    second.advance(20)
    client = second.get(INDEX)
    check = network.pending(url(A, INDEX))
    assert check.header("if-none-match") == '"v1"'
    check.respond(http.NOT_MODIFIED, length=0)
    assert client.body == OLD


def test_immutable_files_are_never_revalidated(cache, network):
    path = "/debian/pool/main/f/foo/foo_1.0_amd64.deb"
    cached_copy(cache, network, path=path)
    cache.advance(10**6)
    for headers in (None, {"cache-control": "no-cache"}, {"cache-control": "max-age=0"}):
        hit = cache.get(path, headers)
        assert (hit.body, hit.header("cache-status")) == (OLD, "pkgcache; hit")
    assert len(network.requests) == 1


@pytest.mark.parametrize("directive", ["no-cache", "max-age=0", "max-age=5"])
def test_a_client_can_ask_for_a_revalidation_of_a_fresh_file(cache, network, directive):
    cached_copy(cache, network)
    cache.advance(10)
    plain = cache.get(INDEX)
    asking = [cache.get(INDEX, {"cache-control": directive}) for _ in range(3)]
    assert plain.header("cache-status").startswith("pkgcache; hit")
    check = network.pending(url(A, INDEX))
    assert check.header("if-none-match") == '"v1"'
    check.respond(http.NOT_MODIFIED, length=0)
    assert [client.body for client in asking] == [OLD] * 3
    assert asking[0].header("cache-status") == "pkgcache; fwd=request; fwd-status=304"
    assert len(network.requests) == 2


def test_a_client_max_age_the_copy_is_younger_than_is_a_hit(cache, network):
    cached_copy(cache, network)
    cache.advance(10)
    hit = cache.get(INDEX, {"cache-control": "max-age=20"})
    assert hit.header("cache-status").startswith("pkgcache; hit")
    assert len(network.requests) == 1


def test_forced_revalidations_wait_for_the_minimum_interval(make_cache, network):
    cache = make_cache(volatile_max_age=30, min_revalidation_interval=20)
    cached_copy(cache, network)
    cache.advance(19)
    spared = cache.get(INDEX, {"cache-control": "max-age=0"})
    assert spared.header("cache-status") == "pkgcache; hit; ttl=11"
    assert len(network.requests) == 1
    cache.advance(1)
    forcing = cache.get(INDEX, {"cache-control": "no-cache"})
    network.pending(url(A, INDEX)).respond(http.NOT_MODIFIED, length=0)
    assert forcing.header("cache-status") == "pkgcache; fwd=request; fwd-status=304"
    assert len(network.requests) == 2


def test_conditional_client_requests_are_answered_from_the_cache(cache, network):
    cached_copy(cache, network)
    by_tag = cache.get(INDEX, {"if-none-match": 'W/"x", "v1"'})
    by_date = cache.get(INDEX, {"if-modified-since": V1["last-modified"]})
    other_tag = cache.get(INDEX, {"if-none-match": '"v0"', "if-modified-since": V1["last-modified"]})
    assert (by_tag.code, by_tag.body) == (304, b"")
    assert (by_date.code, by_date.body) == (304, b"")
    assert (other_tag.code, other_tag.body) == (200, OLD)
    assert len(network.requests) == 1


def test_if_range_with_the_etag_gets_the_range(cache, network):
    cached_copy(cache, network)
    client = cache.get(INDEX, {"range": "bytes=0-2", "if-range": '"v1"'})
    assert (client.code, client.body) == (206, OLD[:3])
    stale_tag = cache.get(INDEX, {"range": "bytes=0-2", "if-range": '"v0"'})
    assert (stale_tag.code, stale_tag.body) == (200, OLD)


def test_a_stale_copy_is_served_when_no_source_can_revalidate_it(cache, network):
    cached_copy(cache, network)
    cache.advance(31)
    client = cache.get(INDEX)
    network.pending(url(A, INDEX)).refuse()
    network.pending(url(B, INDEX)).respond(502, length=0)
    assert (client.code, client.body) == (200, OLD)
    assert client.header("cache-status") == "pkgcache; hit; detail=stale-if-error"
    assert sample(cache, "pkgcache_stale_answers_total") == 1
    assert sample(cache, "pkgcache_revalidations_total", result="failed") == 1
    assert sample(cache, "pkgcache_requests_total", outcome="stale") == 1
    # Up to stale-if-error (100s) past freshness (30s), and no longer.
    cache.advance(100)
    too_old = cache.get(INDEX)
    cache.advance(30)  # A times out
    cache.advance(30)  # B times out
    assert too_old.code == 504
    assert too_old.header("cache-status") == "pkgcache; fwd=stale; detail=no-source"


def test_stale_if_error_zero_serves_no_stale_copy(make_cache, network):
    cache = make_cache(volatile_max_age=30, stale_if_error=0)
    cached_copy(cache, network)
    cache.advance(31)
    client = cache.get(INDEX)
    network.pending(url(A, INDEX)).refuse()
    network.pending(url(B, INDEX)).refuse()
    assert client.code == 502


def test_a_404_from_every_source_is_remembered(cache, network):
    path = "/distfiles/missing-1.0.tar.gz"
    first = cache.get(path)
    network.pending(url(A, path)).serve(b"no", 404)
    network.pending(url(B, path)).serve(b"gone", 410)
    assert first.code == 404
    assert first.header("cache-status") == "pkgcache; fwd=miss; fwd-status=404"
    cache.advance(59)
    again = cache.get(path)
    assert (again.code, again.header("cache-status")) == (404, "pkgcache; hit; detail=negative")
    assert len(network.requests) == 2
    assert sample(cache, "pkgcache_negative_hits_total") == 1
    assert sample(cache, "pkgcache_requests_total", outcome="negative") == 1
    head = cache.head(path)
    assert head.code == 404 and len(network.requests) == 2
    # Whatever the client says (apt and pip send max-age=0 every time).
    forcing = cache.get(path, {"cache-control": "no-cache"})
    assert forcing.code == 404 and len(network.requests) == 2
    cache.advance(1)
    cache.get(path)
    assert len(network.requests) == 3


@pytest.mark.parametrize("failure", ["server error", "refused", "timeout"])
def test_only_a_404_from_every_source_is_remembered(cache, network, failure):
    path = "/distfiles/missing-1.0.tar.gz"
    first = cache.get(path)
    network.pending(url(A, path)).serve(b"no", 404)
    other = network.pending(url(B, path))
    if failure == "server error":
        other.serve(b"down", 503)
    elif failure == "refused":
        other.refuse()
    else:
        cache.advance(30)
    assert first.code in (502, 504)
    cache.get(path)
    assert len(network.requests) == 3


def test_a_directory_url_is_fetched_and_cached_as_a_volatile_document(cache, network):
    page = b"<a href='../../files/foo-1.0.whl'>foo-1.0.whl</a>"
    client = cache.get("/simple/foo/")
    request = network.pending(url(A, "/simple/foo/"))
    request.serve(page, headers={"content-type": "text/html", **V1})
    assert (client.code, client.body) == (200, page)
    assert cache.cached("/simple/foo/") == page
    document = cache.store.path_for(key("/simple/foo/"))
    assert document.basename() == ".pkgcache-index"
    assert document.parent().basename() == "foo"
    hit = cache.get("/simple/foo/")
    assert (hit.body, hit.header("content-type")) == (page, "text/html")
    cache.advance(31)
    cache.get("/simple/foo/")
    assert network.pending(url(A, "/simple/foo/")).header("if-none-match") == '"v1"'


def test_no_request_reaches_a_directory_document_by_name(cache, network):
    client = cache.get("/simple/foo/.pkgcache-index")
    assert client.code == 404 and network.requests == []


def test_a_head_of_a_stale_file_revalidates_it(cache, network):
    cached_copy(cache, network)
    cache.advance(31)
    head = cache.head(INDEX)
    check = network.pending(url(A, INDEX))
    assert check.method == b"GET" and check.header("if-none-match") == '"v1"'
    check.respond(http.NOT_MODIFIED, length=0)
    assert (head.code, head.body, head.length) == (200, b"", len(OLD))
    assert head.header("cache-status") == "pkgcache; fwd=stale; fwd-status=304"


def test_pragma_no_cache_from_an_http_1_0_client_forces_a_revalidation(cache, network):
    cached_copy(cache, network)
    client = cache.get(INDEX, {"pragma": "no-cache"})
    network.pending(url(A, INDEX)).respond(http.NOT_MODIFIED, length=0)
    assert client.body == OLD


def test_after_a_failed_revalidation_the_stale_copy_is_served_at_once_for_max_age(
    cache, network
):
    cached_copy(cache, network)
    cache.advance(31)
    first = cache.get(INDEX)
    cache.advance(30)  # A times out
    cache.advance(30)  # B times out
    assert (first.code, first.body) == (200, OLD)
    asked = len(network.requests)
    cache.advance(29)
    again = cache.get(INDEX)
    assert (again.body, again.header("cache-status")) == (OLD, "pkgcache; hit; detail=stale-if-error")
    assert len(network.requests) == asked, "no client waits on the dead sources again"
    cache.advance(1)
    cache.get(INDEX)
    assert len(network.requests) == asked + 1


def test_a_huge_client_max_age_is_no_error_and_leaks_nothing(cache, network):
    cached_copy(cache, network)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        client = cache.get(INDEX, {"cache-control": "max-age=" + "9" * 400})
        assert (client.code, client.body) == (200, OLD)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_revalidation_skips_a_producer_in_back_off(cache, network):
    cached_copy(cache, network, source=B)
    cache.advance(31)
    cache.health.record_failure(cache.upstream.sources[1])  # B is down now
    client = cache.get(INDEX)
    first = network.pending(url(A, INDEX))
    assert first.header("if-none-match") is None
    first.serve(NEW, headers=V2)
    assert client.body == NEW


def test_a_volatile_body_cut_short_is_not_resumed_from_another_source(cache, network):
    client = cache.get(INDEX)
    body = network.pending(url(A, INDEX)).respond(length=len(NEW), headers=V2)
    body.send(NEW[:100])
    body.cut()
    assert client.cut_off and cache.cached(INDEX) is None
    assert network.urls == [url(A, INDEX)]


def test_volatile_patterns_keep_their_own_flags():
    from pkgcache.freshness import Freshness
    from twisted.internet.task import Clock

    freshness = Freshness([r"(?i)\.JSON$", r"(?P<x>latest)"], clock=Clock())
    assert freshness.is_volatile(key("/a/b.json")) and freshness.is_volatile(key("/latest"))

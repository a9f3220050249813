"""
Debian suites in memory: a cached index is served only while it matches its
suite's newest InRelease, a fetched index that does not match is not kept,
and an InRelease older than the cached one never replaces it.
"""

from __future__ import annotations

import hashlib

import pytest
from twisted.web import http

from tests.memory.conftest import A, key, url

SUITE = "/debian/dists/stable"
IN_RELEASE = SUITE + "/InRelease"
PACKAGES = SUITE + "/main/binary-amd64/Packages.xz"
OLD = b"Package: foo\nVersion: 1.0\n"
NEW = b"Package: foo\nVersion: 2.0\n"


def release(date: str, packages: bytes) -> bytes:
    digest = hashlib.sha256(packages).hexdigest()
    return (
        f"Origin: Test\nSuite: stable\nDate: {date}\n"
        f"SHA256:\n {digest} {len(packages)} main/binary-amd64/Packages.xz\n"
    ).encode()


R1 = release("Mon, 01 Jun 2026 10:00:00 UTC", OLD)
R2 = release("Tue, 02 Jun 2026 10:00:00 UTC", NEW)


@pytest.fixture
def cache(make_cache):
    return make_cache(volatile_max_age=30)


def fetch(cache, network, path, data, etag):
    client = cache.get(path)
    network.pending(url(A, path)).serve(data, headers={"etag": etag})
    assert (client.code, client.body) == (200, data)
    return client


def test_a_new_inrelease_revalidates_the_indexes_that_no_longer_match_at_once(cache, network):
    fetch(cache, network, IN_RELEASE, R1, '"r1"')
    fetch(cache, network, PACKAGES, OLD, '"p1"')
    cache.advance(10)
    # Packages.xz is fresh by time; the client forces a new InRelease.
    client = cache.get(IN_RELEASE, {"cache-control": "no-cache"})
    network.pending(url(A, IN_RELEASE)).serve(R2, headers={"etag": '"r2"'})
    assert client.body == R2 and cache.cached(IN_RELEASE) == R2
    # At once, with no client asking: its copy is not the one R2 lists.
    # Without validators, so that a lagging source cannot confirm it (304).
    check = network.pending(url(A, PACKAGES))
    assert check.header("if-none-match") is None and check.header("if-modified-since") is None
    waiting = cache.get(PACKAGES)
    check.serve(NEW, headers={"etag": '"p2"'})
    assert (waiting.code, waiting.body) == (200, NEW)
    assert cache.cached(PACKAGES) == NEW
    hit = cache.get(PACKAGES)
    assert (hit.body, hit.header("cache-status")) == (NEW, "pkgcache; hit; ttl=30")


def test_an_index_that_does_not_match_its_inrelease_is_stale_however_fresh(cache, network):
    fetch(cache, network, PACKAGES, OLD, '"p1"')
    fetch(cache, network, IN_RELEASE, R2, '"r2"')
    client = cache.get(PACKAGES)
    network.pending(url(A, PACKAGES)).serve(NEW, headers={"etag": '"p2"'})
    assert client.body == NEW and cache.cached(PACKAGES) == NEW


def test_a_fetched_index_that_does_not_match_its_inrelease_is_not_published(cache, network):
    fetch(cache, network, IN_RELEASE, R1, '"r1"')
    # The mirror is half-way through a sync: a new index, the old InRelease.
    client = fetch(cache, network, PACKAGES, NEW, '"p2"')
    assert client.body == NEW
    assert cache.cached(PACKAGES) is None and cache.spools() == []


def test_an_older_inrelease_does_not_replace_the_cached_one(cache, network):
    fetch(cache, network, IN_RELEASE, R2, '"r2"')
    cache.advance(31)
    client = cache.get(IN_RELEASE)
    # A failover mirror that lags behind answers with yesterday's.
    network.pending(url(A, IN_RELEASE)).serve(R1, headers={"etag": '"r1"'})
    assert (client.code, client.body) == (200, R2)
    assert cache.cached(IN_RELEASE) == R2
    assert client.header("cache-status") == (
        "pkgcache; fwd=stale; fwd-status=200; detail=not-stored"
    )


def test_an_inrelease_is_answered_once_it_is_checked_and_stored(cache, network):
    client = cache.get(IN_RELEASE)
    body = network.pending(url(A, IN_RELEASE)).respond(http.OK, length=len(R1))
    body.send(R1[:10])
    assert client.code is None, "no byte of an unchecked InRelease is sent"
    body.send(R1[10:])
    assert (client.code, client.body) == (200, R1)


def test_the_suite_is_read_from_the_cache_after_a_restart(make_cache, network):
    first = make_cache(volatile_max_age=30)
    fetch(first, network, PACKAGES, OLD, '"p1"')
    fetch(first, network, IN_RELEASE, R2, '"r2"')
    first.stop()  # before the revalidation of Packages.xz it started ends
    assert network.requests[-1].cancelled and first.cached(PACKAGES) == OLD
    second = make_cache(volatile_max_age=30)
    # Fresh by time, but not what the InRelease in the cache lists.
    client = second.get(PACKAGES)
    network.pending(url(A, PACKAGES)).serve(NEW)
    assert client.body == NEW and second.cached(PACKAGES) == NEW


def test_an_older_inrelease_is_taken_once_the_newer_one_was_culled(cache, network):
    fetch(cache, network, IN_RELEASE, R2, '"r2"')
    cache.store.path_for(key(IN_RELEASE)).remove()
    client = cache.get(IN_RELEASE)
    network.pending(url(A, IN_RELEASE)).serve(R1, headers={"etag": '"r1"'})
    assert (client.code, client.body) == (200, R1)
    assert cache.cached(IN_RELEASE) == R1

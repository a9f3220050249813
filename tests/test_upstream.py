"""
Sources: URL building, failure classification, and skipping dead mirrors.
"""

from __future__ import annotations

import os

import pytest
from hyperlink import DecodedURL
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from pkgcache.paths import CacheKey
from pkgcache.sources import AllSourcesFailed, Attempt, FailureKind, Source, SourceHealth
from pkgcache.upstream import UpstreamClient
from tests.conftest import fetch, wait_for
from tests.origin import refused_url

DATA = os.urandom(10_000)


@pytest.mark.parametrize(
    "base, expected",
    [
        ("https://m.example/", "https://m.example/distfiles/a%20b%3Fc%23d"),
        ("https://m.example", "https://m.example/distfiles/a%20b%3Fc%23d"),
        ("https://m.example/gentoo/", "https://m.example/gentoo/distfiles/a%20b%3Fc%23d"),
        ("http://m.example:8080/gentoo", "http://m.example:8080/gentoo/distfiles/a%20b%3Fc%23d"),
    ],
)
def test_source_url_appends_each_segment_encoded(base, expected):
    key = CacheKey(("distfiles", "a b?c#d"))
    assert Source(base).url_for(key) == expected


def test_a_segment_cannot_leave_the_source():
    source = Source("https://m.example/gentoo/")
    url = source.url_for(CacheKey(("..%2F..", "@evil.example", "x")))
    # "@" stays as it is: after the base's path it cannot start an authority.
    assert url == "https://m.example/gentoo/..%252F../@evil.example/x"
    assert Source("https://m.example").url_for(CacheKey(("@evil.example",))) == (
        "https://m.example/@evil.example"
    )
    assert DecodedURL.from_text(url).host == "m.example"


@pytest.mark.parametrize(
    "text", ["ftp://m.example/", "m.example/gentoo", "https://", "https://m/?q=1", "", "http://[::1"]
)
def test_bad_source_urls_are_refused(text):
    with pytest.raises(ValueError):
        Source(text)


@pytest.mark.parametrize(
    "kinds, status",
    [
        ([FailureKind.NOT_FOUND, FailureKind.NOT_FOUND], 404),
        ([FailureKind.TIMEOUT], 504),
        ([FailureKind.TIMEOUT, FailureKind.NOT_FOUND], 502),
        ([FailureKind.CONNECTION], 502),
        ([FailureKind.SERVER_ERROR, FailureKind.UNUSABLE], 502),
    ],
)
def test_status_for_client_when_all_sources_fail(kinds, status):
    source = Source("http://m.example/")
    failed = AllSourcesFailed([Attempt(source, kind, "detail") for kind in kinds])
    assert failed.status == status


def test_backoff_grows_is_capped_and_forgotten_on_success():
    clock = Clock()
    health = SourceHealth(clock, initial_backoff=10, max_backoff=60)
    source = Source("http://m.example/")
    backoffs = []
    for _ in range(5):
        backoffs.append(health.record_failure(source))
        clock.advance(backoffs[-1])  # tried again once its back-off is over
    assert backoffs == [10, 20, 40, 60, 60]
    health.record_failure(source)
    assert health.is_down(source)
    clock.advance(59)
    assert health.is_down(source)
    clock.advance(1)
    assert not health.is_down(source)
    health.record_failure(source)
    health.record_success(source)
    assert not health.is_down(source)
    assert health.record_failure(source) == 10


def test_order_puts_sources_in_backoff_last_never_leaves_them_out():
    clock = Clock()
    health = SourceHealth(clock)
    a, b, c = Source("http://a/"), Source("http://b/"), Source("http://c/")
    health.record_failure(b)
    assert health.order([a, b, c]) == [a, c, b]
    health.record_failure(a)
    assert health.order([a, b, c]) == [c, a, b]
    health.record_failure(c)
    assert health.order([a, b, c]) == [a, b, c]
    clock.advance(10)
    assert health.order([a, b, c]) == [a, b, c]


def _client(sources, clock, **kwargs) -> UpstreamClient:
    """A client whose timers and back-off run on ``clock``."""
    return UpstreamClient(
        [Source(s) for s in sources], reactor, clock=clock, health=SourceHealth(clock), **kwargs
    )


@pytest_twisted.ensureDeferred
async def test_a_dead_source_is_skipped_until_its_backoff_ends(origins, make_proxy, http):
    broken, good = origins(), origins()
    for name in ("a", "b", "c"):
        broken.add(f"/{name}", status=503)
        good.add(f"/{name}", DATA)
    clock = Clock()
    upstream = _client([broken.url, good.url], clock)
    proxy = make_proxy([], upstream=upstream)

    assert (await fetch(http, proxy.url + "/a"))[1] == DATA
    assert (await fetch(http, proxy.url + "/b"))[1] == DATA
    assert (broken.count("/a"), broken.count("/b")) == (1, 0)

    clock.advance(10)  # the back-off is over: the source is probed again
    assert (await fetch(http, proxy.url + "/c"))[1] == DATA
    assert broken.count("/c") == 1
    assert upstream.health.is_down(upstream.sources[0])


@pytest_twisted.ensureDeferred
async def test_refused_and_timed_out_sources_are_marked_down(origins, make_proxy, http):
    silent, good = origins(), origins()
    silent.add("/a", hang=True)
    good.add("/a", DATA)
    clock = Clock()
    upstream = _client([refused_url(), silent.url, good.url], clock, idle_timeout=0.3)
    proxy = make_proxy([], upstream=upstream)
    answer = Deferred.fromCoroutine(fetch(http, proxy.url + "/a"))
    # The silent source has the request: the idle timeout passes.
    await wait_for(lambda: silent.count("/a") == 1)
    clock.advance(0.3)
    assert (await answer)[1] == DATA
    refused, timed_out, working = upstream.sources
    assert upstream.health.is_down(refused)
    assert upstream.health.is_down(timed_out)
    assert not upstream.health.is_down(working)


@pytest_twisted.ensureDeferred
async def test_a_404_does_not_mark_a_source_down(origins, make_proxy, http):
    partial, full = origins(), origins()
    partial.add("/b", DATA)
    full.add("/a", DATA)
    upstream = _client([partial.url, full.url], Clock())
    proxy = make_proxy([], upstream=upstream)
    assert (await fetch(http, proxy.url + "/a"))[1] == DATA
    assert (await fetch(http, proxy.url + "/b"))[1] == DATA
    assert (partial.count("/a"), partial.count("/b")) == (1, 1)
    assert not upstream.health.is_down(upstream.sources[0])


@pytest_twisted.ensureDeferred
async def test_when_every_source_is_down_they_are_tried_anyway(origin, make_proxy, http):
    origin.add("/a", status=500)
    upstream = _client([origin.url], Clock())
    proxy = make_proxy([], upstream=upstream)
    response, _ = await fetch(http, proxy.url + "/a")
    assert response.code == 502
    origin.add("/a", DATA)  # the mirror recovers within its back-off
    response, body = await fetch(http, proxy.url + "/a")
    assert (response.code, body) == (200, DATA)


@pytest_twisted.ensureDeferred
async def test_a_source_that_always_cuts_its_bodies_backs_off_further(origins, make_proxy, http):
    cutting, good = origins(), origins()
    for name in ("a", "b"):
        cutting.add(f"/{name}", DATA, close_at=1000, ranges=False)
        good.add(f"/{name}", DATA)
    clock = Clock()
    upstream = _client([cutting.url, good.url], clock)
    proxy = make_proxy([], upstream=upstream)
    assert (await fetch(http, proxy.url + "/a"))[1] == DATA  # resumed from good
    clock.advance(10)
    assert (await fetch(http, proxy.url + "/b"))[1] == DATA
    assert cutting.count("/b") == 1  # probed again after 10 s, and cut again...
    clock.advance(15)
    # ...so it is now skipped for 20 s, not 10: its headers were fine, but
    # only a whole body counts as a success.
    assert upstream.health.is_down(upstream.sources[0])


def test_backoff_survives_very_many_failures():
    clock = Clock()
    health = SourceHealth(clock, initial_backoff=10, max_backoff=600)
    source = Source("http://m.example/")
    for _ in range(5000):
        backoff = health.record_failure(source)
        clock.advance(backoff)
    assert backoff == 600


def test_failures_while_in_backoff_do_not_lengthen_it():
    """Many requests under way when a source goes down: one outage, 10 s."""
    clock = Clock()
    health = SourceHealth(clock, initial_backoff=10, max_backoff=600)
    source = Source("http://m.example/")
    assert [health.record_failure(source) for _ in range(5)] == [10] * 5
    clock.advance(4)
    assert health.record_failure(source) == 6
    clock.advance(6)
    assert health.record_failure(source) == 20

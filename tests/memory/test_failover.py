"""
Failover between sources, in memory: which source is asked next, what a
client is told when none has the file, and the back-off on the clock.
"""

from __future__ import annotations

from tests.memory.conftest import A, B, C, url

DATA = b"0123456789" * 100
OTHER = "/distfiles/bar-2.0.tar.gz"


def test_a_refused_connection_fails_over_to_the_next_source(cache, network):
    client = cache.get()
    network.pending(url(A)).refuse()
    network.pending(url(B)).serve(DATA)
    assert (client.code, client.body, client.complete) == (200, DATA, True)
    assert cache.cached() == DATA
    assert network.urls == [url(A), url(B)]


def test_a_server_error_fails_over_and_its_body_is_not_read(cache, network):
    client = cache.get()
    error_body = network.pending(url(A)).respond(503, length=1000)
    assert error_body.stopped, "the 503's body should be dropped, not read"
    network.pending(url(B)).serve(DATA)
    assert (client.code, client.body, client.complete) == (200, DATA, True)
    assert cache.cached() == DATA


def test_a_source_that_does_not_answer_times_out_and_the_next_is_asked(make_cache, network):
    cache = make_cache(idle_timeout=30)
    client = cache.get()
    hanging = network.pending(url(A))
    cache.advance(29.9)
    assert network.urls == [url(A)] and not hanging.cancelled
    cache.advance(0.1)
    assert hanging.cancelled
    network.pending(url(B)).serve(DATA)
    assert (client.code, client.body) == (200, DATA)
    assert cache.timers() == []


def test_every_source_timing_out_is_504(make_cache, network):
    cache = make_cache(idle_timeout=30)
    client = cache.get()
    cache.advance(30)  # A times out; B is asked, and its own timer starts
    assert network.urls == [url(A), url(B)]
    cache.advance(30)
    assert client.code == 504 and client.complete
    assert "timed out" in client.text
    assert cache.cached() is None and cache.spools() == []


def test_404_from_every_source_is_404(cache, network):
    client = cache.get()
    network.pending(url(A)).serve(b"not here", 404)
    network.pending(url(B)).serve(b"gone", 410)
    assert client.code == 404 and client.complete
    assert cache.cached() is None
    # Nothing was put in back-off: A is asked first again.
    cache.get(OTHER)
    assert network.urls[-1] == url(A, OTHER)


def test_a_source_in_backoff_is_asked_last_and_serves_a_file_only_it_has(cache, network):
    cache.get()
    network.pending(url(A)).refuse()
    network.pending(url(B)).serve(DATA)

    client = cache.get(OTHER)
    assert network.urls[-1] == url(B, OTHER), "the source in back-off must not be asked first"
    network.pending(url(B, OTHER)).serve(b"", 404)
    network.pending(url(A, OTHER)).serve(DATA)
    assert (client.code, client.body, client.complete) == (200, DATA, True)
    assert cache.cached(OTHER) == DATA


def test_the_last_resort_failing_too_is_502_with_every_reason(cache, network):
    cache.get()
    network.pending(url(A)).refuse()
    network.pending(url(B)).serve(DATA)

    client = cache.get(OTHER)
    network.pending(url(B, OTHER)).serve(b"", 404)
    network.pending(url(A, OTHER)).refuse()
    assert client.code == 502, "a file a dead source may have is never denied with 404"
    assert f"{B}: not found (HTTP 404)" in client.text
    assert f"{A}: connection failed (Connection was refused" in client.text
    assert client.header("content-type") == "text/plain; charset=utf-8"


def test_backoff_doubles_and_expires_on_the_clock(cache, network):
    def first_asked(path: str) -> str:
        """Ask for ``path``; the source asked first."""
        cache.get(path)
        (first,) = network.waiting
        return first.url[: -len(path)] + "/"

    def refused_by_a(path: str) -> None:
        network.pending(url(A, path)).refuse()
        network.pending(url(B, path)).serve(DATA)

    assert first_asked("/1") == A
    refused_by_a("/1")  # first failure: 10 s at the back
    cache.advance(9.9)
    assert first_asked("/2") == B
    network.pending(url(B, "/2")).serve(DATA)
    cache.advance(0.1)
    assert first_asked("/3") == A
    refused_by_a("/3")  # second failure in a row: 20 s
    cache.advance(19.9)
    assert first_asked("/4") == B
    network.pending(url(B, "/4")).serve(DATA)
    cache.advance(0.1)
    assert first_asked("/5") == A
    # A whole body from it forgets its failures: the next one is 10 s again.
    network.pending(url(A, "/5")).serve(DATA)
    assert first_asked("/6") == A
    refused_by_a("/6")
    cache.advance(9.9)
    assert first_asked("/7") == B
    network.pending(url(B, "/7")).serve(DATA)
    cache.advance(0.1)
    assert first_asked("/8") == A


def test_when_every_source_is_in_backoff_all_are_tried_in_order(make_cache, network):
    cache = make_cache(sources=(A, B, C))
    cache.get("/one")
    for source in (A, B, C):
        network.pending(url(source, "/one")).refuse()
    client = cache.get("/two")
    assert network.urls[-1] == url(A, "/two")
    network.pending(url(A, "/two")).refuse()
    network.pending(url(B, "/two")).refuse()
    network.pending(url(C, "/two")).serve(DATA)
    assert (client.code, client.body) == (200, DATA)


def test_an_unusable_answer_fails_over_without_backoff(cache, network):
    client = cache.get()
    network.pending(url(A)).serve(b"", 204)
    network.pending(url(B)).serve(DATA)
    assert client.body == DATA
    cache.get(OTHER)
    assert network.urls[-1] == url(A, OTHER)

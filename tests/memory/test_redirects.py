"""
Redirects through the resource: followed to the configured sources only;
anywhere else is that source's failure, and the next source is asked.
"""

from __future__ import annotations

from tests.memory.conftest import A, B, C, PATH, url

DATA = bytes(range(256)) * 4


def test_a_redirect_to_another_source_is_followed_and_cached(cache, network):
    client = cache.get()
    redirect = network.pending(url(A)).redirect(url(B, "/mirror" + PATH))
    assert redirect.stopped or redirect.ended
    network.pending(url(B, "/mirror" + PATH)).serve(DATA)
    assert (client.code, client.body, client.complete) == (200, DATA, True)
    assert cache.cached() == DATA
    assert network.urls == [url(A), url(B, "/mirror" + PATH)]


def test_a_redirect_elsewhere_is_that_sources_failure(cache, network):
    client = cache.get()
    network.pending(url(A)).redirect("http://elsewhere.example/x")
    network.pending(url(B)).serve(DATA)
    assert (client.body, client.complete) == (DATA, True)
    assert not any("elsewhere" in asked for asked in network.urls)
    # A refused redirect says nothing about the source's health.
    cache.get("/other")
    assert network.urls[-1] == url(A, "/other")


def test_redirects_refused_everywhere_is_502_with_the_reasons(cache, network):
    client = cache.get()
    network.pending(url(A)).redirect("http://elsewhere.example/x", 301)
    network.pending(url(B)).redirect(url(C))  # C is not one of this cache's sources
    assert client.code == 502
    assert f"{A}: redirect refused (redirect to http://elsewhere.example/x leaves the sources)" in (
        client.text
    )
    assert f"{B}: redirect refused" in client.text


def test_a_resume_follows_a_redirect_with_its_range(make_cache, network):
    cache = make_cache(sources=(A, B, C))
    client = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:100])
    body.cut()
    network.pending(url(B)).redirect(url(C, "/elsewhere" + PATH), 307)
    hop = network.pending(url(C, "/elsewhere" + PATH))
    assert hop.range == "bytes=100-"
    hop.serve_rest(DATA)
    assert (client.body, client.complete) == (DATA, True)
    assert cache.cached() == DATA


def test_a_redirect_loop_ends_as_that_sources_failure(cache, network):
    client = cache.get()
    for hop in range(6):
        network.pending(url(A, f"/{hop}" if hop else PATH)).redirect(url(A, f"/{hop + 1}"))
    network.pending(url(B)).serve(DATA)
    assert client.body == DATA
    assert network.urls[-2] == url(A, "/5")

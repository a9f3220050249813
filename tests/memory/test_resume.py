"""
A body that breaks off mid-way: resumed from another source with
``Range: bytes=N-`` when that source proves it has the same file, or else
every client is cut off and nothing is published.
"""

from __future__ import annotations

import pytest

from pkgcache.download import MAX_RESUMES
from tests.memory.conftest import A, B, C, url

DATA = bytes(range(256)) * 40  # 10240 bytes
CUT = 4000


def test_a_cut_body_resumes_from_the_next_source(cache, network):
    client = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    assert client.body == DATA[:CUT]
    body.cut()
    resume = network.pending(url(B))
    assert resume.range == f"bytes={CUT}-"
    resume.serve_rest(DATA)
    assert (client.code, client.body, client.complete) == (200, DATA, True)
    assert cache.cached() == DATA
    assert cache.spools() == []


def test_a_stalled_body_is_treated_as_cut_and_resumed(make_cache, network):
    cache = make_cache(idle_timeout=30)
    client = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    cache.advance(29)
    body.send(DATA[CUT:CUT + 10])  # each chunk restarts the idle timer
    cache.advance(29)
    assert network.urls == [url(A)]
    cache.advance(1)
    assert body.stopped, "the stalled connection should be closed"
    resume = network.pending(url(B))
    assert resume.range == f"bytes={CUT + 10}-"
    resume.serve_rest(DATA)
    assert (client.body, client.complete) == (DATA, True)
    assert cache.cached() == DATA


@pytest.mark.parametrize(
    "code, headers, length",
    [
        (200, {}, len(DATA)),  # ignores the range
        (206, {"content-range": f"bytes {CUT}-{len(DATA) - 1}/{len(DATA) + 1}"}, len(DATA) - CUT),
        (206, {"content-range": f"bytes {CUT - 1}-{len(DATA) - 1}/{len(DATA)}"}, len(DATA) - CUT),
        (206, {"content-range": f"bytes {CUT}-{len(DATA) - 1}/{len(DATA)}"}, len(DATA) - CUT + 1),
        (206, {}, len(DATA) - CUT),  # no Content-Range
        (416, {"content-range": f"bytes */{len(DATA)}"}, 0),
    ],
    ids=["200", "other-length", "other-start", "body-length", "no-content-range", "416"],
)
def test_a_resume_that_does_not_prove_the_same_file_moves_on(
    make_cache, network, code, headers, length
):
    cache = make_cache(sources=(A, B, C))
    client = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    body.cut()
    wrong = network.pending(url(B)).respond(code, headers, length=length)
    assert wrong.stopped, "an unusable answer's body is never read"
    resume = network.pending(url(C))
    assert resume.range == f"bytes={CUT}-"
    resume.serve_rest(DATA)
    assert (client.body, client.complete) == (DATA, True)
    assert cache.cached() == DATA


def test_at_most_max_resumes(cache, network):
    data = bytes(range(100))
    client = cache.get()
    body = network.pending(url(A)).respond(length=len(data))
    # Every source breaks off after one byte, every time.
    for offset in range(1, MAX_RESUMES + 2):
        body.send(data[offset - 1 : offset])
        body.cut()
        if offset == MAX_RESUMES + 1:
            break
        (resume,) = network.waiting
        assert resume.range == f"bytes={offset}-"
        body = resume.respond_rest(len(data))
    assert network.waiting == [], "no resume after the last one allowed"
    assert len(network.requests) == 1 + MAX_RESUMES
    assert client.body == data[: 1 + MAX_RESUMES]
    assert client.cut_off
    assert cache.cached() is None and cache.spools() == []


def test_when_no_source_can_resume_every_client_is_cut_off(cache, network):
    clients = [cache.get(), cache.get()]
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    late = cache.get()
    assert late.body == DATA[:CUT], "a late joiner gets what arrived so far"
    body.cut()
    network.pending(url(B)).respond(200, length=len(DATA))  # cannot do ranges
    network.pending(url(A)).refuse()  # the one that broke off is asked last
    for client in clients + [late]:
        assert client.code == 200 and client.body == DATA[:CUT]
        assert client.cut_off, "a short body must never look complete"
        assert not client.aborted, "with a Content-Length, closing is enough"
    assert cache.cached() is None and cache.spools() == []
    assert network.waiting == []

    # The next request starts afresh, from the start.
    again = cache.get()
    network.pending(url(B)).serve(DATA)
    assert (again.body, again.complete) == (DATA, True)
    assert cache.cached() == DATA


def test_a_cut_body_of_unknown_length_is_not_resumed(cache, network):
    client = cache.get()
    body = network.pending(url(A)).respond(chunked=True)
    body.send(DATA[:CUT])
    body.cut()
    assert network.urls == [url(A)], "a resumed body of unknown length cannot be checked"
    assert client.body == DATA[:CUT] and client.cut_off
    assert cache.cached() is None and cache.spools() == []


def test_a_body_that_ends_with_its_connection_is_never_published(cache, network):
    client = cache.get()
    body = network.pending(url(A)).respond()  # no length, not chunked
    body.send(DATA)
    body.finish()
    assert client.body == DATA
    assert client.cut_off, "a close cannot be told from a cut"
    assert cache.cached() is None and cache.spools() == []


def test_a_chunked_body_that_ends_cleanly_is_published(cache, network):
    client = cache.get()
    body = network.pending(url(A)).respond(chunked=True)
    body.send(DATA[:CUT])
    body.send(DATA[CUT:])
    body.finish()
    assert client.length is None
    assert (client.body, client.complete) == (DATA, True)
    assert cache.cached() == DATA


def test_a_resumed_body_that_stops_short_is_not_published(make_cache, network):
    cache = make_cache(sources=(A, B, C))
    client = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    body.cut()
    # A 206 with the right Content-Range but chunked: it ends cleanly short.
    resume = network.pending(url(B))
    short = resume.respond(
        206, {"content-range": f"bytes {CUT}-{len(DATA) - 1}/{len(DATA)}"}, chunked=True
    )
    short.send(DATA[CUT:-10])
    short.finish()
    # That is a break like any other: the rest is asked of the next source.
    rest = network.pending(url(C))
    assert rest.range == f"bytes={len(DATA) - 10}-"
    rest.serve_rest(DATA)
    assert (client.body, client.complete) == (DATA, True)
    assert cache.cached() == DATA


def test_resuming_prefers_the_source_after_the_one_that_broke_off(make_cache, network):
    cache = make_cache(sources=(A, B, C))
    client = cache.get()
    network.pending(url(A)).refuse()
    body = network.pending(url(B)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    body.cut()
    # C comes after B; A is in back-off; B broke off: C, then A, then B.
    network.pending(url(C)).serve(b"", 404)
    network.pending(url(A)).serve_rest(DATA)
    assert (client.body, client.complete) == (DATA, True)

"""
``--max-downloads`` (misses wait for a slot, in order) and
``--max-file-size`` (bodies over the limit are refused and never cached).
"""

from __future__ import annotations

from tests.memory.conftest import A, B, C, url

DATA = b"x" * 1000


# -- --max-downloads ----------------------------------------------------------


def test_a_miss_waits_for_a_free_download_slot(make_cache, network):
    cache = make_cache(max_downloads=1)
    one = cache.get("/one")
    two = cache.get("/two")
    assert network.urls == [url(A, "/one")], "the second miss must wait for the first"
    body = network.pending(url(A, "/one")).respond(length=len(DATA))
    body.send(DATA[:500])
    assert network.urls == [url(A, "/one")]
    body.send(DATA[500:])
    assert one.complete
    assert network.urls == [url(A, "/one"), url(A, "/two")]
    network.pending(url(A, "/two")).serve(DATA)
    assert two.complete and cache.cached("/two") == DATA


def test_waiting_misses_start_in_arrival_order(make_cache, network):
    cache = make_cache(max_downloads=1)
    clients = {path: cache.get(path) for path in ("/one", "/two", "/three", "/four")}
    joined = cache.get("/one")  # joins the running download: takes no slot
    for path in ("/one", "/two", "/three", "/four"):
        assert network.waiting == [network.pending(url(A, path))]
        network.pending(url(A, path)).serve(DATA)
        assert clients[path].complete
    assert joined.complete
    assert network.urls == [url(A, path) for path in ("/one", "/two", "/three", "/four")]


def test_a_failed_download_frees_its_slot(make_cache, network):
    cache = make_cache(max_downloads=1)
    one = cache.get("/one")
    two = cache.get("/two")
    network.pending(url(A, "/one")).serve(b"", 404)
    network.pending(url(B, "/one")).serve(b"", 404)
    assert one.code == 404
    network.pending(url(A, "/two")).serve(DATA)
    assert two.complete


def test_a_miss_waiting_for_a_slot_whose_client_left_still_runs(make_cache, network):
    cache = make_cache(max_downloads=1)
    cache.get("/one")
    two = cache.get("/two")
    cache.disconnect(two)
    network.pending(url(A, "/one")).serve(DATA)
    network.pending(url(A, "/two")).serve(DATA)
    assert cache.cached("/two") == DATA


# -- --max-file-size ----------------------------------------------------------


def test_a_content_length_over_the_limit_is_502_and_nothing_is_cached(make_cache, network):
    cache = make_cache(max_body_size=999)
    client = cache.get()
    too_large = network.pending(url(A)).respond(length=1000)
    assert too_large.stopped, "a body over the limit is never read"
    network.pending(url(B)).respond(length=5000)
    assert client.code == 502
    assert "too large (1000 bytes, over the limit of 999)" in client.text
    assert cache.cached() is None and cache.spools() == []


def test_a_file_exactly_at_the_limit_is_served(make_cache, network):
    cache = make_cache(max_body_size=1000)
    client = cache.get()
    network.pending(url(A)).serve(DATA)
    assert (client.body, client.complete) == (DATA, True)
    assert cache.cached() == DATA


def test_a_chunked_body_passing_the_limit_fails_and_nothing_is_cached(make_cache, network):
    cache = make_cache(max_body_size=1000)
    client = cache.get()
    body = network.pending(url(A)).respond(chunked=True)
    body.send(DATA[:600])
    body.send(DATA[:600])
    assert body.stopped
    assert network.urls == [url(A)]
    assert client.body == DATA[:600] and client.cut_off
    assert cache.cached() is None and cache.spools() == []


def test_a_resumed_body_passing_the_limit_is_not_resumed_again(make_cache, network):
    cache = make_cache(sources=(A, B, C), max_body_size=1000)
    client = cache.get()
    body = network.pending(url(A)).respond(length=1000)
    body.send(DATA[:400])
    body.cut()
    # B claims the right range but sends more than the file can hold.
    resumed = network.pending(url(B)).respond(
        206, {"content-range": "bytes 400-999/1000"}, chunked=True
    )
    resumed.send(b"y" * 700)
    assert resumed.stopped
    assert network.waiting == [] and len(network.requests) == 2, "no source asked again"
    assert client.cut_off and client.body == DATA[:400]
    assert cache.cached() is None and cache.spools() == []

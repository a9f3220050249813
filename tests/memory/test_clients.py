"""
What clients of the cache see: coalesced downloads, clients that stop
reading or leave, and the status a client gets when the download fails
before its first byte.
"""

from __future__ import annotations


from pkgcache.responses import READ_SIZE

from tests.memory.conftest import A, B, PATH, url

DATA = bytes(range(256)) * 40  # 10 KiB
CUT = 4000
#: Larger than a connection's buffer and than one read of a cached file.
BIG = bytes(range(256)) * 4096  # 1 MiB
OTHER = "/distfiles/bar-2.0.tar.gz"


# -- coalescing ---------------------------------------------------------------


def test_two_clients_of_one_file_make_one_upstream_request(cache, network):
    first = cache.get()
    second = cache.get()
    assert network.urls == [url(A)]
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    third = cache.get()
    body.send(DATA[CUT:])
    for client in (first, second, third):
        assert (client.code, client.body, client.complete) == (200, DATA, True)
    assert network.urls == [url(A)]
    assert cache.cached() == DATA


def test_a_client_leaving_does_not_stop_the_download(cache, network):
    leaving = cache.get()
    staying = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    cache.disconnect(leaving)
    assert leaving.cut_off and not body.stopped
    body.send(DATA[CUT:])
    assert (staying.body, staying.complete) == (DATA, True)
    assert cache.cached() == DATA


def test_the_download_is_published_after_every_client_left(cache, network):
    before_headers = cache.get()
    cache.disconnect(before_headers)
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    mid_body = cache.get()
    cache.disconnect(mid_body)
    body.send(DATA[CUT:])
    assert cache.cached() == DATA and cache.spools() == []
    hit = cache.get()
    assert (hit.body, hit.complete) == (DATA, True)
    assert network.urls == [url(A)]


def test_a_range_of_a_miss_is_answered_from_the_download(cache, network):
    whole = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    ranged = cache.get(headers={"range": f"bytes={CUT}-{CUT + 99}"})
    assert ranged.code is None, "nothing to send before its bytes arrive"
    body.send(DATA[: CUT + 50])
    assert ranged.code == 206 and ranged.body == DATA[CUT : CUT + 50]
    body.send(DATA[CUT + 50 :])
    assert ranged.header("content-range") == f"bytes {CUT}-{CUT + 99}/{len(DATA)}"
    assert (ranged.body, ranged.complete) == (DATA[CUT : CUT + 100], True)
    assert whole.complete and network.urls == [url(A)]


# -- a failure before the first byte ------------------------------------------


def test_a_range_beyond_where_the_download_broke_gets_502(cache, network):
    first = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:CUT])
    ranged = cache.get(headers={"range": f"bytes={CUT + 1000}-"})
    assert ranged.code is None
    body.cut()
    network.pending(url(B)).refuse()
    network.pending(url(A)).refuse()
    assert first.cut_off
    assert ranged.code == 502 and ranged.complete, "an error status, not an empty reply"
    assert ranged.text.startswith("the download failed before these bytes arrived")
    assert "no source could resume" in ranged.text
    assert ranged.header("content-range") is None
    assert ranged.header("content-type") == "text/plain; charset=utf-8"
    # What says which caches answered stays.
    assert ranged.header("via") == "1.1 pkgcache"
    assert ranged.header("cache-status").startswith("pkgcache; fwd=miss")


def test_a_client_waiting_for_headers_gets_the_failure_status(cache, network):
    client = cache.get()
    joined = cache.get()
    network.pending(url(A)).serve(b"", 404)
    network.pending(url(B)).respond(500, length=0)
    assert client.code == joined.code == 502
    assert "server error (HTTP 500)" in client.text


# -- clients that stop reading ------------------------------------------------


def test_a_client_of_a_miss_that_stops_reading_is_dropped(make_cache, network):
    cache = make_cache(client_stall_timeout=60, idle_timeout=600)
    stalled = cache.get()
    reading = cache.get()
    body = network.pending(url(A)).respond(length=len(BIG))
    body.send(BIG[:100_000])
    stalled.stop_reading()
    body.send(BIG[100_000:500_000])  # more than its connection's buffer
    cache.advance(59)
    assert not stalled.ended
    cache.advance(1)
    assert stalled.aborted and stalled.cut_off
    assert 0 < len(stalled.body) < len(BIG)
    body.send(BIG[500_000:])
    assert (reading.body, reading.complete, reading.aborted) == (BIG, True, False)
    assert cache.cached() == BIG
    assert cache.timers() == []


def test_a_client_of_a_miss_that_reads_again_in_time_is_kept(make_cache, network):
    cache = make_cache(client_stall_timeout=60, idle_timeout=600)
    client = cache.get()
    body = network.pending(url(A)).respond(length=len(BIG))
    client.stop_reading()
    body.send(BIG[:500_000])
    cache.advance(59)
    cache.read_again(client)
    client.stop_reading()
    body.send(BIG[500_000:])
    cache.advance(59)
    cache.read_again(client)
    cache.advance(59)
    assert (client.body, client.complete, client.aborted) == (BIG, True, False)


def test_a_client_of_a_hit_that_stops_reading_is_dropped(make_cache):
    cache = make_cache(client_stall_timeout=60)
    cache.put(PATH, BIG)
    client = cache.get(stop_reading_after=1)
    assert client.code == 200 and 0 < len(client.body) < len(BIG)
    cache.advance(59)
    assert not client.ended
    cache.advance(1)
    assert client.aborted and client.cut_off
    assert cache.timers() == []


def test_a_client_of_a_small_hit_that_stops_reading_is_dropped(make_cache):
    cache = make_cache(client_stall_timeout=60)
    small = BIG[: READ_SIZE - 1000]  # sent in one write, more than a socket buffer
    cache.put(PATH, small)
    client = cache.get(stop_reading_after=1)
    assert client.code == 200 and 0 < len(client.body) < len(small)
    cache.advance(60)
    assert client.aborted and client.cut_off


def test_a_client_of_a_hit_that_reads_again_in_time_is_kept(make_cache):
    cache = make_cache(client_stall_timeout=60)
    cache.put(PATH, BIG)
    client = cache.get(stop_reading_after=1)
    cache.advance(59)
    cache.read_again(client)
    assert (client.body, client.complete, client.aborted) == (BIG, True, False)


def test_a_cut_off_client_that_never_reads_is_dropped(make_cache, network):
    """
    A client cut off mid-body is closed once it has read what was sent; one
    that reads nothing more keeps its connection only until the stall limit.
    """
    cache = make_cache(client_stall_timeout=60, idle_timeout=600)
    client = cache.get()
    body = network.pending(url(A)).respond(length=len(BIG))
    client.stop_reading()
    body.send(BIG[:500_000])
    body.cut()
    network.pending(url(B)).refuse()
    network.pending(url(A)).refuse()
    assert not client.ended
    cache.advance(60)
    assert client.aborted and client.cut_off
    assert cache.timers() == []

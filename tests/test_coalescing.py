"""
One download, many readers: concurrent misses share one upstream request,
late joiners and slow readers get every byte, vanished clients change
nothing, and Range/HEAD on a miss need no download of their own.
"""

from __future__ import annotations

import os
import shutil

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath

from pkgcache.download import DownloadState
from pkgcache.paths import cache_key_from_postpath
from pkgcache.sources import Source
from pkgcache.store import CacheStore
from pkgcache.upstream import UpstreamClient
from tests.clients import SmallBufferClient, multipart_parts, sha256, start_reading, within
from tests.conftest import fetch, raw_request, wait_for
from tests.origin import Gate, refused_url

PATH = "/distfiles/big-1.0.tar.xz"
KEY = cache_key_from_postpath([b"distfiles", b"big-1.0.tar.xz"])


def in_flight(proxy):
    return proxy.resource.downloads.in_flight(KEY)


def followers(proxy) -> int:
    """How many clients follow the download of ``PATH`` (0: none running)."""
    download = in_flight(proxy)
    return 0 if download is None else len(download.followers)


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_clients_one_upstream_request(origin, make_proxy, http):
    data = os.urandom(1_000_000)
    gate = Gate()
    # The origin holds the body after its first bytes until all twenty follow.
    origin.add(PATH, data, gate=gate, pause_at=100_000)
    proxy = make_proxy([origin.url])
    readers = [await start_reading(http, proxy.url + PATH) for _ in range(20)]
    assert followers(proxy) == 20
    gate.open()
    bodies = await DeferredList([reader.done for _, reader in readers], fireOnOneErrback=True)
    assert [sha256(body) for _, body in bodies] == [sha256(data)] * 20
    assert all(response.code == 200 for response, _ in readers)
    assert origin.count(PATH) == 1
    assert await proxy.published(PATH) == data


@pytest_twisted.ensureDeferred
async def test_client_joining_half_way_gets_everything_without_waiting(origin, make_proxy, http):
    data = os.urandom(1_000_000)
    gate = Gate()
    origin.add(PATH, data, gate=gate, pause_at=500_000)
    proxy = make_proxy([origin.url])
    _, first = await start_reading(http, proxy.url + PATH)
    await wait_for(lambda: in_flight(proxy) is not None and in_flight(proxy).received == 500_000)

    # The rest of the file comes only once the late joiner has its first byte.
    waited = "the late joiner waited for the whole download"
    _, late = await within(10, start_reading(http, proxy.url + PATH), waited)
    await within(10, late.first_byte, waited)
    assert not proxy.cached(PATH).exists(), waited
    assert in_flight(proxy).received < len(data)
    gate.open()
    assert await late.done == data
    assert await first.done == data
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_slow_reader_holds_back_neither_download_nor_fast_reader(origin, make_proxy, http):
    data = os.urandom(24 * 1024 * 1024)
    gate = Gate()
    # Held after its first megabyte until both clients follow the download.
    origin.add(PATH, data, chunk_size=256 * 1024, gate=gate, pause_at=1024 * 1024)
    proxy = make_proxy([origin.url])
    slow = SmallBufferClient(proxy.url + PATH)
    try:
        await wait_for(lambda: followers(proxy) == 1)
        _, fast = await start_reading(http, proxy.url + PATH)
        assert followers(proxy) == 2
        gate.open()
        # The slow reader reads at 1 MB/s, and takes at most 4 MiB before
        # the fast reader is done: it stays far behind however long the
        # download takes, and if the download or the fast reader waited
        # for it, they would never end.
        most = 4 * 1024 * 1024
        reading_slowly = Deferred.fromCoroutine(
            slow.read_at(1_000_000, until=lambda: fast.done.called or len(slow.body) >= most)
        )
        await wait_for(lambda: fast.done.called, timeout=30)
        assert sha256(await fast.done) == sha256(data)
        await reading_slowly
        assert await proxy.published(PATH) == data
        # Neither the download nor the fast reader waited for it.
        assert len(slow.body) < len(data) // 3
        assert sha256(await slow.read_to_end()) == sha256(data)
    finally:
        slow.close()
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_download_completes_after_every_client_left(origin, make_proxy, http):
    data = os.urandom(1_000_000)
    gate = Gate()
    # Held after its first bytes until every client has left.
    origin.add(PATH, data, gate=gate, pause_at=100_000)
    proxy = make_proxy([origin.url])
    readers = [await start_reading(http, proxy.url + PATH) for _ in range(3)]
    download = in_flight(proxy)
    assert len(download.followers) == 3
    for _, reader in readers:
        await reader.first_byte
        reader.hang_up()
    await wait_for(lambda: not download.followers)
    assert download.state is DownloadState.RECEIVING, "the download stopped with its clients"
    assert not download.finished.called
    assert in_flight(proxy) is download
    gate.open()
    assert await proxy.published(PATH) == data
    assert origin.count(PATH) == 1
    response, body = await fetch(http, proxy.url + PATH)
    assert body == data and origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_range_on_a_miss_is_served_from_the_shared_download(origin, make_proxy, http):
    data = os.urandom(1_000_000)
    gate = Gate()
    # Held after 50 bytes, short of every range, until all five follow.
    origin.add(PATH, data, gate=gate, pause_at=50)
    proxy = make_proxy([origin.url])
    ranges = {
        b"bytes=0-99": data[:100],
        b"bytes=500000-500999": data[500_000:501_000],
        b"bytes=-10": data[-10:],
        b"bytes=999990-": data[999_990:],
        b"bytes=999990-2000000": data[999_990:],
    }
    # Most answers start only once their bytes arrive: ask all at once.
    asking = [
        (wanted, Deferred.fromCoroutine(
            start_reading(http, proxy.url + PATH, headers={b"range": [header]})
        ))
        for header, wanted in ranges.items()
    ]
    await wait_for(lambda: followers(proxy) == len(ranges))
    gate.open()
    for wanted, answer in asking:
        response, reader = await answer
        assert response.code == 206
        assert await reader.done == wanted
        start = data.find(wanted)
        assert response.headers.getRawHeaders(b"content-range") == [
            b"bytes %d-%d/%d" % (start, start + len(wanted) - 1, len(data))
        ]
    assert origin.origin.requests == [(b"GET", PATH, None)]
    response, _ = await fetch(http, proxy.url + "/distfiles/big-1.0.tar.xz",
                              headers={b"range": [b"bytes=2000000-"]})
    assert response.code == 416


@pytest_twisted.ensureDeferred
async def test_multiple_ranges_get_the_same_multipart_answer_on_a_miss_and_a_hit(
    origin, make_proxy, http
):
    data = os.urandom(1_000_000)
    origin.add(PATH, data, rate=2_000_000)
    proxy = make_proxy([origin.url])
    ranges = {b"range": [b"bytes=900000-900009,0-1,-5"]}
    expected = [
        (b"bytes 900000-900009/1000000", data[900000:900010]),
        (b"bytes 0-1/1000000", data[0:2]),
        (b"bytes 999995-999999/1000000", data[-5:]),
    ]
    answers = [await fetch(http, proxy.url + PATH, headers=ranges)]
    await proxy.published(PATH)
    answers.append(await fetch(http, proxy.url + PATH, headers=ranges))
    for response, body in answers:
        assert response.code == 206
        assert response.length == len(body)
        (content_type,) = response.headers.getRawHeaders(b"content-type")
        assert multipart_parts(content_type, body) == expected


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed")
@pytest_twisted.ensureDeferred
async def test_aria2c_segmented_download_on_miss_and_hit(origin, make_proxy, tmp_path):
    data = os.urandom(3_000_000)
    origin.add(PATH, data, rate=6_000_000)
    proxy = make_proxy([origin.url])
    for attempt in ("miss", "hit"):
        out = tmp_path / attempt
        output, _, code = await getProcessOutputAndValue(
            "aria2c",
            ["-x4", "-s4", "-k1M", "--min-split-size=1M", "--allow-overwrite=true",
             "--console-log-level=warn", "--summary-interval=0", "--connect-timeout=10",
             "--timeout=20", "-d", str(tmp_path), "-o", attempt, proxy.url + PATH],
        )
        assert code == 0, output
        assert sha256(out.read_bytes()) == sha256(data), attempt
        await proxy.published(PATH)
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_curl_range_on_miss_and_hit(origin, make_proxy):
    data = os.urandom(500_000)
    origin.add(PATH, data, rate=2_000_000)
    proxy = make_proxy([origin.url])
    for _ in ("miss", "hit"):
        output, err, code = await getProcessOutputAndValue(
            "curl", ["-sS", "--max-time", "20", "-r", "1000-1999", proxy.url + PATH]
        )
        assert code == 0, err
        assert output == data[1000:2000]
        await proxy.published(PATH)
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_head_on_a_miss_asks_the_sources_and_caches_nothing(origins, make_proxy, http):
    broken, good = origins(), origins()
    broken.add(PATH, status=500)
    good.add(PATH, b"x" * 12345, headers={b"content-type": b"application/x-xz"})
    proxy = make_proxy([refused_url(), broken.url, good.url])
    answer = await raw_request(proxy.url, b"HEAD %s HTTP/1.0\r\n\r\n" % PATH.encode())
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"\r\nContent-Length: 12345\r\n" in answer
    assert b"\r\nContent-Type: application/x-xz\r\n" in answer
    assert answer.endswith(b"\r\n\r\n")
    assert (good.count(PATH, b"HEAD"), good.count(PATH)) == (1, 0)
    # The answer is complete: had the HEAD started a download to cache the
    # file, it would be running now (they start before any answer).
    assert len(proxy.resource.downloads) == 0
    assert not proxy.cached(PATH).exists()
    assert proxy.spools() == []
    # And a GET next is a miss: nothing was stored.
    response, body = await fetch(http, proxy.url + PATH)
    assert (response.code, len(body)) == (200, 12345)
    assert good.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_head_on_a_miss_for_a_missing_file_is_404(origin, make_proxy):
    proxy = make_proxy([origin.url])
    answer = await raw_request(proxy.url, b"HEAD /nothing HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 404 ")
    assert answer.endswith(b"\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_dropped(origin, make_proxy, http, tmp_path):
    data = os.urandom(24 * 1024 * 1024)
    gate = Gate()
    origin.add(PATH, data, chunk_size=256 * 1024, gate=gate, pause_at=256 * 1024)
    # The stall limit runs on a clock of its own; the network and the disk
    # on the reactor.
    clock = Clock()
    cache_dir = FilePath(str(tmp_path)).child("cache")
    proxy = make_proxy(
        [], cache_dir=cache_dir, reactor=clock, client_stall_timeout=0.5,
        store=CacheStore(cache_dir, reactor),
        upstream=UpstreamClient([Source(origin.url)], reactor),
    )
    stuck = SmallBufferClient(proxy.url + PATH)
    try:
        await wait_for(lambda: followers(proxy) == 1)
        download = in_flight(proxy)
        gate.open()
        # It reads nothing more: the whole file is published meanwhile, and
        # its connection fills up, so pkgcache stops sending and starts
        # counting its stall.
        assert await proxy.published(PATH) == data
        await wait_for(lambda: clock.getDelayedCalls())
        assert download.followers, "dropped before its stall limit"
        clock.advance(0.5)
        await wait_for(lambda: not download.followers)
        body = await stuck.read_to_end()
    finally:
        stuck.close()
    assert len(body) < len(data)

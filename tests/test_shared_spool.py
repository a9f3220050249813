"""
One download per file across processes, on real sockets: two
``PackageCacheResource`` s (two ``Downloads`` registries, as two worker
processes have), each in its own site on its own port, on one cache
directory, in front of one origin.  A client of either that asks for a
file the other is downloading follows that download from its spool: its
first bytes come at once, the origin is asked once, and a download that
breaks off cuts every follower off.  (``tests/test_twist.py`` does the
same with two real ``twist pkgcache`` processes.)
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.filepath import FilePath
from twisted.web.client import ResponseFailed

from pkgcache.paths import cache_key_from_postpath
from pkgcache.shared_spool import RECORD_XATTR, FollowedHeaders, SpoolRecord
from pkgcache.spool import shared_spool_path
from tests.clients import sha256, start_reading, within
from tests.conftest import fetch, wait_for
from tests.origin import Gate

PATH = "/distfiles/shared-1.0.tar.xz"
KEY = cache_key_from_postpath([b"distfiles", b"shared-1.0.tar.xz"])


@pytest.fixture
def two(make_proxy, origin, tmp_path):
    """Two proxies on one cache directory, in front of ``origin``."""
    cache_dir = FilePath(str(tmp_path)).child("cache")
    return (
        make_proxy([origin.url], cache_dir=cache_dir),
        make_proxy([origin.url], cache_dir=cache_dir),
    )


def in_flight(proxy):
    return proxy.resource.downloads.in_flight(KEY)


def spool_of(proxy) -> str:
    store = proxy.resource.store
    return shared_spool_path(
        store.spool_dir.path, store.cache_dir.path, store.path_for(KEY).path
    )


@pytest_twisted.ensureDeferred
async def test_a_client_of_the_other_process_gets_its_first_bytes_at_once(two, origin, http):
    first, second = two
    data = os.urandom(2_000_000)
    gate = Gate()
    # The origin holds the rest after 200 kB until the test lets it go.
    origin.add(PATH, data, gate=gate, pause_at=200_000)
    _, downloading = await start_reading(http, first.url + PATH)
    await downloading.first_byte
    response, following = await start_reading(http, second.url + PATH)
    await within(10, following.first_byte, "the follower waited for the whole download")
    assert in_flight(second).following
    assert not first.cached(PATH).exists()
    assert response.code == 200 and response.length == len(data)
    assert b"collapsed" in response.headers.getRawHeaders(b"cache-status")[0]
    gate.open()
    assert sha256(await downloading.done) == sha256(await following.done) == sha256(data)
    assert origin.count(PATH) == 1
    assert await first.published(PATH) == data
    await wait_for(lambda: in_flight(first) is None and in_flight(second) is None)
    assert first.spools() == []


@pytest_twisted.ensureDeferred
async def test_twenty_clients_over_two_processes_make_one_upstream_request(two, origin, http):
    data = os.urandom(1_000_000)
    gate = Gate()
    origin.add(PATH, data, gate=gate, pause_at=100_000)
    readers = []
    for number in range(20):
        proxy = two[number % 2]
        response, reader = await start_reading(http, proxy.url + PATH)
        # Every one of them has its first bytes before the download goes on.
        await within(10, reader.first_byte, f"client {number} waited for the download")
        readers.append((response, reader))
    assert [len(in_flight(proxy).followers) for proxy in two] == [10, 10]
    gate.open()
    bodies = await DeferredList([reader.done for _, reader in readers], fireOnOneErrback=True)
    assert [sha256(body) for _, body in bodies] == [sha256(data)] * 20
    assert all(response.code == 200 for response, _ in readers)
    assert origin.origin.requests == [(b"GET", PATH, None)]
    assert await two[0].published(PATH) == data


@pytest_twisted.ensureDeferred
async def test_a_download_that_breaks_off_cuts_off_the_other_process_clients(
    two, origin, http
):
    first, second = two
    data = os.urandom(1_000_000)
    gate = Gate()
    # It breaks off at 300 kB, and no source can resume it.
    origin.add(PATH, data, gate=gate, pause_at=100_000, close_at=300_000, ranges=False)
    _, downloading = await start_reading(http, first.url + PATH)
    followers = [await start_reading(http, second.url + PATH) for _ in range(3)]
    for _, reader in followers:
        await within(10, reader.first_byte, "a follower waited for the download")
    gate.open()
    for _, reader in [(None, downloading), *followers]:
        with pytest.raises(ResponseFailed):
            await reader.done
        assert 0 < reader.received < len(data)
    await wait_for(lambda: in_flight(first) is None and in_flight(second) is None)
    await wait_for(lambda: first.spools() == [])
    assert not first.cached(PATH).exists()
    # One download (its attempt to resume is the only other request).
    assert [range_ for _, path, range_ in origin.origin.requests if path == PATH] == [
        None, b"bytes=300000-",
    ]
    # The next client starts afresh, and the file is cached whole.
    origin.add(PATH, data)
    response, body = await fetch(http, second.url + PATH)
    assert (response.code, sha256(body)) == (200, sha256(data))
    assert await first.published(PATH) == data


@pytest_twisted.ensureDeferred
async def test_a_spool_left_by_a_dead_process_is_taken_over(two, origin, http):
    first, second = two
    data = os.urandom(500_000)
    origin.add(PATH, data, content_type=b"application/x-xz")
    # A process died mid-download: its spool, its record, no lock.
    spool = spool_of(first)
    with open(spool, "wb") as dead:
        dead.write(b"the first bytes of another day")
        record = SpoolRecord(FollowedHeaders(200, origin.url, {}, 12345, 0.0, 0.0))
        os.setxattr(dead.fileno(), RECORD_XATTR, record.encode())
    responses = await DeferredList(
        [Deferred.fromCoroutine(fetch(http, proxy.url + PATH)) for proxy in (first, second, first)],
        fireOnOneErrback=True,
    )
    for _, (response, body) in responses:
        assert (response.code, response.length, sha256(body)) == (200, len(data), sha256(data))
        assert response.headers.getRawHeaders(b"content-type") == [b"application/x-xz"]
    assert origin.count(PATH) == 1
    assert await first.published(PATH) == data
    await wait_for(lambda: first.spools() == [])


@pytest_twisted.ensureDeferred
async def test_a_starting_process_never_sweeps_a_live_spool(origin, make_proxy, http, tmp_path):
    data = os.urandom(1_000_000)
    gate = Gate()
    origin.add(PATH, data, gate=gate, pause_at=100_000)
    cache_dir = FilePath(str(tmp_path)).child("cache")
    first = make_proxy([origin.url], cache_dir=cache_dir)
    _, downloading = await start_reading(http, first.url + PATH)
    await downloading.first_byte
    spool = spool_of(first)
    assert os.path.exists(spool)
    # Several more processes start on the directory while it downloads.
    others = [make_proxy([origin.url], cache_dir=cache_dir) for _ in range(3)]
    assert os.path.exists(spool)
    _, following = await start_reading(http, others[-1].url + PATH)
    await following.first_byte
    gate.open()
    assert sha256(await following.done) == sha256(await downloading.done) == sha256(data)
    assert origin.count(PATH) == 1

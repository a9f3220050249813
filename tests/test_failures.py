"""
When sources and disks fail mid-download: resume from another source, or
cut every client off and publish nothing; keep streaming when the disk is
full; two processes sharing one cache directory.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.web.client import ResponseFailed

from pkgcache.accesslog import AccessLog
from pkgcache.download import MEMORY_HIGH_WATER, DownloadState
from pkgcache import spool
from pkgcache.metrics import Metrics
from pkgcache.responses import READ_SIZE
from pkgcache.sources import Source
from pkgcache.upstream import UpstreamClient
from tests.clients import open_raw, sha256, start_reading
from tests.conftest import fetch, sleep, wait_for
from tests.origin import Gate
from tests.test_coalescing import PATH, in_flight

DATA = os.urandom(1_000_000)


def _upstream(urls, clock: Clock, **options) -> UpstreamClient:
    """A client for the sources at ``urls`` whose timers and back-off run on ``clock``."""
    return UpstreamClient([Source(url) for url in urls], reactor, clock=clock, **options)


@pytest_twisted.ensureDeferred
async def test_resume_from_next_source_after_a_drop(origins, make_proxy, http):
    dropping, resuming = origins(), origins()
    dropping.add(PATH, DATA, close_at=300_000)
    resuming.add(PATH, DATA)
    proxy = make_proxy([dropping.url, resuming.url])
    response, body = await fetch(http, proxy.url + PATH)
    assert (response.code, sha256(body)) == (200, sha256(DATA))
    assert resuming.origin.requests == [(b"GET", PATH, b"bytes=300000-")]
    assert await proxy.published(PATH) == DATA


@pytest_twisted.ensureDeferred
async def test_resume_after_a_stall(origins, make_proxy, http):
    stalling, resuming = origins(), origins()
    stalling.add(PATH, DATA, stall_at=400_000)
    resuming.add(PATH, DATA)
    clock = Clock()
    upstream = _upstream([stalling.url, resuming.url], clock, idle_timeout=0.5)
    proxy = make_proxy([], upstream=upstream)
    _, reader = await start_reading(http, proxy.url + PATH)
    download = in_flight(proxy)
    # Everything the stalling source will send has come: then its silence
    # outlasts the idle timeout.
    await wait_for(lambda: download.received == 400_000)
    clock.advance(0.5)
    assert sha256(await reader.done) == sha256(DATA)
    assert resuming.origin.requests == [(b"GET", PATH, b"bytes=400000-")]


@pytest_twisted.ensureDeferred
async def test_every_client_cut_off_when_no_source_can_resume(origins, make_proxy, http):
    dropping, no_ranges, other_file = origins(), origins(), origins()
    # Holds its body after 100 kB until all three clients follow the
    # download, then breaks off at 300 kB; it is asked last to resume (it
    # broke off), and cannot.
    gate = Gate()
    dropping.add(PATH, DATA, close_at=300_000, ranges=False, gate=gate, pause_at=100_000)
    no_ranges.add(PATH, DATA, ranges=False)
    other_file.add(PATH, DATA + b"longer")  # ranges, but not the same file
    # The back-off runs on a clock that stands still.
    proxy = make_proxy(
        [], upstream=_upstream([dropping.url, no_ranges.url, other_file.url], Clock())
    )
    readers = [await start_reading(http, proxy.url + PATH) for _ in range(3)]
    assert len(in_flight(proxy).followers) == 3
    gate.open()
    results = await DeferredList([reader.done for _, reader in readers], consumeErrors=True)
    for succeeded, result in results:
        assert not succeeded and result.check(ResponseFailed)
    assert not proxy.cached(PATH).exists()
    await wait_for(lambda: proxy.spools() == [])
    assert other_file.origin.requests == [(b"GET", PATH, b"bytes=300000-")]

    # The next request starts afresh (from the second source: the first
    # broke off, so it is asked last while its back-off lasts).
    response, body = await fetch(http, proxy.url + PATH)
    assert body == DATA
    assert no_ranges.origin.requests[-1] == (b"GET", PATH, None)
    assert await proxy.published(PATH) == DATA


@pytest_twisted.ensureDeferred
async def test_cut_off_client_sees_curl_error_18(origin, make_proxy):
    origin.add(PATH, DATA, close_at=300_000, ranges=False)
    proxy = make_proxy([origin.url])
    _, err, code = await getProcessOutputAndValue(
        "curl", ["-sS", "-o", "/dev/null", "--max-time", "20", proxy.url + PATH]
    )
    assert code == 18, err


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs, to run out of space on."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield FilePath(str(mount_point))
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest_twisted.ensureDeferred
async def test_full_disk_keeps_streaming_to_attached_clients(
    origin, make_proxy, http, tiny_filesystem
):
    data = os.urandom(12 * 1024 * 1024)
    # The source sends 256 KiB (the disk is not full yet), then holds the
    # rest until both clients follow the download; then twice as fast as
    # the slow reader reads.
    gate = Gate()
    origin.add(PATH, data, chunk_size=256 * 1024, rate=8_000_000, gate=gate, pause_at=256 * 1024)
    origin.add("/small", b"small file")
    proxy = make_proxy([origin.url], cache_dir=tiny_filesystem.child("cache"))
    _, slow = await start_reading(http, proxy.url + PATH, rate=4_000_000)
    download = in_flight(proxy)
    _, fast = await start_reading(http, proxy.url + PATH)
    assert len(download.followers) == 2
    gate.open()

    largest_buffer = 0
    while not fast.done.called:
        largest_buffer = max(largest_buffer, download.buffered_bytes)
        await sleep(0.01)
    slow.full_speed()
    assert sha256(await fast.done) == sha256(data)
    assert sha256(await slow.done) == sha256(data)
    # The slow reader fell far behind, but memory stayed bounded: the
    # source was paused instead.
    assert 0 < largest_buffer <= MEMORY_HIGH_WATER + READ_SIZE * 4
    assert not proxy.cached(PATH).exists()
    assert proxy.spools() == []

    # Still serving, and caching what fits.
    response, body = await fetch(http, proxy.url + "/small")
    assert body == b"small file"
    assert await proxy.published("/small") == b"small file"


@pytest_twisted.ensureDeferred
async def test_two_processes_on_one_cache_dir(origin, make_proxy, http, tmp_path):
    # The download holds after 300 kB until the second server follows it.
    gate = Gate()
    origin.add(PATH, DATA, gate=gate, pause_at=300_000)
    shared = FilePath(str(tmp_path)).child("shared")
    first = make_proxy([origin.url], cache_dir=shared)
    _, early = await start_reading(http, first.url + PATH)
    await early.first_byte
    # A second server starting on the same directory sweeps stale spools:
    # it must leave the first one's live spool alone.
    second = make_proxy([origin.url], cache_dir=shared)
    assert len(first.spools()) == 1
    # ... and follows the first one's download rather than fetch again.
    _, late = await start_reading(http, second.url + PATH)
    await late.first_byte
    assert in_flight(second).following
    gate.open()
    assert sha256(await early.done) == sha256(DATA)
    assert sha256(await late.done) == sha256(DATA)
    assert await first.published(PATH) == DATA
    await wait_for(lambda: in_flight(first) is None and in_flight(second) is None)
    assert first.cached(PATH).getContent() == DATA
    assert first.spools() == []
    assert origin.count(PATH) == 1


@pytest.mark.parametrize("content_length", [True, False], ids=["short-length", "short-chunked"])
@pytest_twisted.ensureDeferred
async def test_a_resume_that_stops_short_is_never_published(
    origins, make_proxy, http, content_length
):
    dropping, lying = origins(), origins()
    dropping.add(PATH, DATA, close_at=300_000, ranges=False)
    # Claims "bytes 300000-999999/1000000", sends 100 bytes.
    lying.add(PATH, DATA, short_ranges=100, content_length=content_length)
    proxy = make_proxy([dropping.url, lying.url])
    _, reader = await start_reading(http, proxy.url + PATH)
    with pytest.raises(ResponseFailed):
        await reader.done
    assert reader.received < len(DATA)
    await wait_for(lambda: in_flight(proxy) is None and proxy.spools() == [])
    assert not proxy.cached(PATH).exists()


@pytest_twisted.ensureDeferred
async def test_shutdown_mid_download_cuts_clients_and_publishes_nothing(origin, make_proxy, http):
    # The rest of the body never comes: the download is mid-way at shutdown.
    origin.add(PATH, DATA, gate=Gate(), pause_at=100_000)
    proxy = make_proxy([origin.url])
    _, reader = await start_reading(http, proxy.url + PATH)
    await reader.first_byte
    await proxy.resource.close()
    with pytest.raises(ResponseFailed):
        await reader.done
    await wait_for(lambda: proxy.spools() == [])
    assert not proxy.cached(PATH).exists()
    # Giving up was our doing: the source is not held against.
    assert not proxy.resource.upstream.health.is_down(proxy.resource.upstream.sources[0])


@pytest_twisted.ensureDeferred
async def test_shutdown_while_waiting_for_headers(origins, make_proxy, http):
    silent, good = origins(), origins()
    silent.add(PATH, hang=True)
    good.add(PATH, DATA)
    proxy = make_proxy([silent.url, good.url])
    answer = Deferred.fromCoroutine(fetch(http, proxy.url + PATH))
    await wait_for(lambda: silent.count(PATH) == 1)
    await proxy.resource.close()
    response, body = await answer
    assert (response.code, body) == (503, b"shutting down\n")
    assert good.count(PATH) == 0
    assert not proxy.resource.upstream.health.is_down(proxy.resource.upstream.sources[0])


@pytest_twisted.ensureDeferred
async def test_a_client_arriving_as_a_download_fails_starts_afresh(
    origin, make_proxy, http, monkeypatch
):
    # A failed download winds down (removes its spool, on a slow disk
    # perhaps) after it has failed: here that waits until the test lets it
    # go, so the next client surely comes meanwhile.
    original_discard = spool.SpoolWriter.discard
    winding_down: list = []
    let_go: Deferred[None] = Deferred()

    async def held_discard(self, record=None):
        if not winding_down:
            winding_down.append(self)
            await let_go
        await original_discard(self, record)

    monkeypatch.setattr(spool.SpoolWriter, "discard", held_discard)
    gate = Gate()
    origin.add(PATH, DATA, close_at=300_000, ranges=False, gate=gate, pause_at=100_000)
    proxy = make_proxy([origin.url])
    try:
        _, first = await start_reading(http, proxy.url + PATH)
        failing = in_flight(proxy)
        gate.open()  # it breaks off at 300 kB
        await wait_for(lambda: winding_down)
        assert failing.state is DownloadState.FAILED
        assert not failing.finished.called
        assert in_flight(proxy) is None
        origin.add(PATH, DATA)
        response, body = await fetch(http, proxy.url + PATH)
        assert (response.code, body) == (200, DATA)
        assert not failing.finished.called, "the new client came after the wind-down"
    finally:
        if not let_go.called:
            let_go.callback(None)
    with pytest.raises(ResponseFailed):
        await first.done
    assert await proxy.published(PATH) == DATA
    await failing.finished


@pytest_twisted.ensureDeferred
async def test_http10_client_without_length_sees_an_error(origin, make_proxy):
    origin.add(PATH, DATA, close_at=300_000, content_length=False, ranges=False)
    proxy = make_proxy([origin.url])
    _, err, code = await getProcessOutputAndValue(
        "curl", ["-sS", "--http1.0", "-o", "/dev/null", "--max-time", "20", proxy.url + PATH]
    )
    assert code != 0, "an HTTP/1.0 client took a cut body for a whole file"


@pytest_twisted.ensureDeferred
async def test_head_miss_client_leaving_early_is_quiet(origin, make_proxy):
    # The source holds its answer until the client has left.
    gate = Gate()
    origin.add(PATH, DATA, gate=gate)
    log = io.BytesIO()
    metrics = Metrics()
    proxy = make_proxy([origin.url], metrics=metrics, access_log=AccessLog(log, reactor))
    client = await open_raw(proxy.url, b"HEAD %s HTTP/1.0\r\n\r\n" % PATH.encode())
    try:
        await wait_for(lambda: origin.count(PATH, b"HEAD") == 1)
    finally:
        answer = await client.hang_up()
    assert answer == b""
    # pkgcache has seen the client go: its request is logged, dropped.
    await wait_for(lambda: log.getvalue().endswith(b" dropped\n"))
    gate.open()
    # The source answers after the client left: once pkgcache has its
    # answer (counted as it arrives, and the HEAD is handled at once), no
    # error was logged and nothing more was written.
    answered = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "pkgcache_upstream_requests_total", {"source": origin.url, "status": "200"}
    )
    await wait_for(lambda: answered() == 1)
    assert log.getvalue().count(b"\n") == 1


@pytest_twisted.ensureDeferred
async def test_disk_write_error_keeps_streaming(origin, make_proxy, http, monkeypatch):
    """The same as on a full tmpfs, where none can be mounted: EIO mid-spool."""
    original = spool._write_all
    written = []

    def failing_write_all(fd, chunks):
        if sum(written) > 200_000:
            raise OSError(errno.EIO, "Input/output error")
        written.append(original(fd, chunks))
        return written[-1]

    monkeypatch.setattr(spool, "_write_all", failing_write_all)
    # Held after 100 kB (before the disk fails) until both clients follow.
    gate = Gate()
    origin.add(PATH, DATA, gate=gate, pause_at=100_000)
    proxy = make_proxy([origin.url])
    readers = [await start_reading(http, proxy.url + PATH) for _ in range(2)]
    assert len(in_flight(proxy).followers) == 2
    gate.open()
    for _, reader in readers:
        assert sha256(await reader.done) == sha256(DATA)
    # (Its spool goes once its last word to other processes is on it.)
    await wait_for(lambda: in_flight(proxy) is None and proxy.spools() == [])
    assert not proxy.cached(PATH).exists()
    assert origin.count(PATH) == 1

"""
One download per file across processes, in memory: two caches on one
cache directory (two ``Downloads`` registries, as two worker processes
have), on one network and one clock.  A miss that one of them is
downloading is followed by the other from its spool; the follower looks at
the spool only while a client waits, every ``FOLLOW_POLL_INTERVAL`` of the
clock, and a downloader that dies, fails, gives up or hangs never lets a
follower's client take a short file for a whole one.

"Processes" that are not pkgcache (one that dies, one that hangs) are
played by :class:`ForeignDownloader`: a spool under the file's name, with
its lock, record and bytes, made by hand.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Callable

import pytest

from pkgcache import shared_spool
from pkgcache.download import FOLLOW_POLL_INTERVAL
from pkgcache.metadata import EntryMetadata
from pkgcache.shared_spool import RECORD_XATTR, FollowedHeaders, SpoolRecord, SpoolUnshared
from pkgcache.spool import shared_spool_path
from tests.memory.conftest import A, B, PATH, MemoryCache, key, url

DATA = bytes(range(256)) * 4000  # 1,024,000 bytes


@dataclass
class Pair:
    """Two caches on one directory: ``first`` and ``second``."""

    first: MemoryCache
    second: MemoryCache
    pump: Callable[[], None]

    def advance(self, seconds: float) -> None:
        self.first.clock.advance(seconds)
        self.pump()

    def poll(self, times: int = 1) -> None:
        """Let a follower look at the spool ``times`` times."""
        for _ in range(times):
            self.advance(FOLLOW_POLL_INTERVAL)

    def download(self, cache: MemoryCache, path: str = PATH):
        return cache.resource.downloads.in_flight(key(path))


@pytest.fixture
def pair(make_cache, network) -> Pair:
    first, second = make_cache(), make_cache()

    def pump() -> None:
        for _ in range(3):
            first.pump()
            second.pump()

    network.after_step = pump
    return Pair(first, second, pump)


def poll_timers(cache: MemoryCache) -> list:
    """The clock's calls that are a follower's next look at a spool."""
    now = cache.clock.seconds()
    return [call for call in cache.timers() if call.getTime() - now <= FOLLOW_POLL_INTERVAL]


class ForeignDownloader:
    """A process downloading ``PATH`` into its shared spool, by hand."""

    def __init__(self, cache: MemoryCache, path: str = PATH) -> None:
        self.target = cache.store.path_for(key(path)).path
        self.path = shared_spool_path(
            cache.store.spool_dir.path, cache.store.cache_dir.path, self.target
        )
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.record = SpoolRecord()
        self.mark()

    def mark(self) -> None:
        os.setxattr(self.fd, RECORD_XATTR, self.record.encode())

    def answered(self, length=len(DATA), content_type="application/x-test") -> None:
        self.record.headers = FollowedHeaders(
            200, A, {"content-type": content_type}, length, 1_000_000.0, 0.0
        )
        self.mark()

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def publish(self, metadata: EntryMetadata) -> None:
        metadata.write(self.fd)
        os.makedirs(os.path.dirname(self.target), exist_ok=True)
        os.rename(self.path, self.target)
        os.close(self.fd)

    def die(self) -> None:
        """Its lock dies with it; its spool stays behind."""
        os.close(self.fd)


def test_a_miss_another_process_is_downloading_is_followed_not_fetched(pair, network):
    downloading = pair.first.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:100_000])
    following = pair.second.get()
    assert pair.download(pair.second).following
    pair.poll()
    # Its first bytes come at once, while the download is still under way.
    assert following.code == 200 and following.length == len(DATA)
    assert following.body == DATA[:100_000]
    assert "collapsed" in following.header("cache-status")
    # Another client of the same process joins the same follower.
    joining = pair.second.get()
    assert len(pair.download(pair.second).followers) == 2
    body.send(DATA[100_000:])
    pair.poll()
    for client in (downloading, following, joining):
        assert (client.body, client.complete) == (DATA, True)
    assert network.urls == [url(A)]
    assert pair.first.cached() == DATA
    assert pair.first.spools() == []
    assert pair.download(pair.second) is None


def test_a_follower_holds_no_body_in_memory(pair, network):
    pair.first.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    pair.second.get()
    follower = pair.download(pair.second)
    for offset in range(0, len(DATA), 64 * 1024):
        body.send(DATA[offset : offset + 64 * 1024])
        pair.poll()
        assert follower.buffered_bytes == 0


def test_a_follower_looks_at_the_spool_only_while_a_client_waits(pair, network):
    pair.first.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:100_000])
    reader = pair.second.get()
    pair.poll()
    assert reader.body == DATA[:100_000]
    # Caught up: it waits for more, so the spool is looked at.
    assert len(poll_timers(pair.second)) == 1
    reader.stop_reading()
    body.send(DATA[100_000:900_000])
    pair.poll(3)
    # Behind, and not reading: nothing to look for, however long it takes.
    follower = pair.download(pair.second)
    assert follower.received == 900_000 and len(reader.body) < 900_000
    assert poll_timers(pair.second) == []
    pair.advance(20)  # (within the source's idle limit and the client's stall limit)
    assert poll_timers(pair.second) == []
    reader.read_again()
    pair.pump()
    # Caught up again: looking again.
    assert reader.body == DATA[:900_000] and not reader.ended
    assert len(poll_timers(pair.second)) == 1
    body.send(DATA[900_000:])
    pair.poll()
    assert (reader.body, reader.complete) == (DATA, True)
    assert poll_timers(pair.second) == []
    assert pair.download(pair.second) is None


def test_a_follower_of_a_download_that_breaks_off_cuts_its_clients_off(pair, network):
    downloading = pair.first.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:300_000])
    following = pair.second.get()
    pair.poll()
    assert following.body == DATA[:300_000]
    body.cut()
    network.pending(url(B)).refuse()
    network.pending(url(A)).refuse()
    pair.poll()
    assert downloading.cut_off and following.cut_off
    assert len(following.body) < len(DATA)
    assert pair.first.cached() is None and pair.first.spools() == []
    # The next client starts afresh.
    again = pair.second.get()
    network.pending(url(A)).serve(DATA)
    assert (again.body, again.complete) == (DATA, True)
    assert pair.first.cached() == DATA


def test_a_follower_waiting_for_the_headers_gets_the_same_failure(pair, network):
    asking = pair.first.get()
    waiting = pair.second.get()
    pair.poll()
    assert waiting.code is None
    network.pending(url(A)).serve(b"gone", code=404)
    network.pending(url(B)).serve(b"gone", code=404)
    pair.poll()
    assert asking.code == waiting.code == 404
    assert network.urls == [url(A), url(B)]
    # Remembered on both sides.
    assert pair.second.get().header("cache-status") == "pkgcache; hit; detail=negative"


def test_a_follower_gets_its_headers_as_soon_as_the_downloader_does(pair, network):
    pair.first.get()
    waiting = [pair.second.get(), pair.second.get(headers={"range": "bytes=1000-1999"})]
    pair.poll(5)
    assert [client.code for client in waiting] == [None, None]
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:500_000])
    pair.poll()
    assert waiting[0].code == 200 and waiting[0].body == DATA[:500_000]
    assert waiting[1].code == 206 and (waiting[1].body, waiting[1].complete) == (
        DATA[1000:2000], True,
    )
    body.send(DATA[500_000:])
    pair.poll()
    assert waiting[0].body == DATA and waiting[0].complete


def test_a_follower_whose_downloader_shuts_down_before_the_headers_fetches_itself(
    pair, network
):
    asking = pair.first.get()
    waiting = pair.second.get()
    pair.first.stop()
    assert asking.code == 503
    pair.poll()
    # It claimed the file itself: the request is its own.
    assert not pair.download(pair.second).following
    network.pending(url(A)).serve(DATA)
    assert (waiting.body, waiting.complete) == (DATA, True)
    assert pair.second.cached() == DATA


def test_a_follower_whose_downloader_shuts_down_mid_body_is_cut_off(pair, network):
    pair.first.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:100_000])
    following = pair.second.get()
    pair.poll()
    assert following.body == DATA[:100_000]
    pair.first.stop()
    pair.poll()
    assert following.cut_off
    assert pair.second.cached() is None and pair.second.spools() == []


def test_a_waiting_downloader_is_followed_however_long_its_sources_take(make_cache, network):
    first, second = make_cache(idle_timeout=30), make_cache(idle_timeout=30)
    pair = Pair(first, second, lambda: (first.pump(), second.pump(), first.pump()))
    network.after_step = pair.pump
    first.get()
    waiting = second.get()
    # The source takes 29 s to answer; the downloader's beat keeps its
    # follower from taking it for hung.
    for _ in range(29):
        pair.advance(1)
    assert network.urls == [url(A)]
    network.pending(url(A)).serve(DATA)
    pair.poll()
    assert (waiting.body, waiting.complete) == (DATA, True)
    assert network.urls == [url(A)]


def test_a_downloader_that_hangs_before_its_headers_is_given_up(make_cache, network):
    first = make_cache(idle_timeout=30)
    hung = ForeignDownloader(first)
    waiting = first.get()
    for _ in range(29):
        first.advance(1)
    assert network.urls == []
    first.advance(1)
    first.advance(FOLLOW_POLL_INTERVAL)
    # Fetched here, unshared: the hung process holds the spool's name.
    network.pending(url(A)).serve(DATA)
    assert (waiting.body, waiting.complete) == (DATA, True)
    assert first.cached() == DATA
    hung.die()


def test_a_downloader_that_hangs_mid_body_cuts_its_followers_off(make_cache, network):
    first = make_cache(idle_timeout=30)
    hung = ForeignDownloader(first)
    hung.answered()
    hung.write(DATA[:1000])
    following = first.get()
    first.advance(FOLLOW_POLL_INTERVAL)
    assert following.code == 200 and following.body == DATA[:1000]
    for _ in range(29):
        first.advance(1)
    assert not following.ended
    first.advance(1)
    first.advance(FOLLOW_POLL_INTERVAL)
    assert following.cut_off
    assert network.urls == []
    hung.die()


def test_a_follower_of_a_process_that_dies_is_cut_off(make_cache, network):
    first = make_cache()
    dying = ForeignDownloader(first)
    dying.answered()
    dying.write(DATA[:1000])
    following = first.get()
    first.advance(FOLLOW_POLL_INTERVAL)
    assert following.body == DATA[:1000]
    dying.write(DATA[1000:500_000])
    dying.die()
    first.advance(FOLLOW_POLL_INTERVAL)
    assert following.cut_off
    assert first.cached() is None


def test_a_dead_process_spool_is_taken_over(make_cache, network):
    first = make_cache()
    dead = ForeignDownloader(first)
    dead.answered(content_type="text/x-stale")
    dead.write(b"stale bytes")
    dead.die()
    client = first.get()
    # Its record is not believed: nobody holds the spool.
    assert client.code is None
    network.pending(url(A)).serve(DATA, headers={"content-type": "application/x-fresh"})
    assert (client.body, client.complete) == (DATA, True)
    assert client.header("content-type") == "application/x-fresh"
    assert first.cached() == DATA
    assert first.spools() == []


def test_a_follower_of_a_dead_process_spool_takes_it_over(make_cache, network):
    first = make_cache()
    dying = ForeignDownloader(first)
    following = first.get()
    dying.die()  # before its headers
    first.advance(FOLLOW_POLL_INTERVAL)
    network.pending(url(A)).serve(DATA)
    assert (following.body, following.complete) == (DATA, True)
    assert first.cached() == DATA and first.spools() == []


def test_a_file_published_before_the_follower_saw_its_headers_is_served(make_cache, network):
    first = make_cache()
    fast = ForeignDownloader(first)
    waiting = first.get()
    fast.write(DATA)
    fast.publish(EntryMetadata(content_type=b"application/x-fast", source=A))
    first.advance(FOLLOW_POLL_INTERVAL)
    assert (waiting.code, waiting.body, waiting.complete) == (200, DATA, True)
    assert waiting.header("content-type") == "application/x-fast"
    assert network.urls == []


def test_a_complete_download_that_could_not_be_published_still_serves_the_whole_file(
    make_cache, network
):
    first = make_cache()
    downloader = ForeignDownloader(first)
    downloader.answered()
    following = first.get()
    downloader.write(DATA)
    downloader.record.end, downloader.record.received = "complete", len(DATA)
    downloader.mark()
    first.advance(FOLLOW_POLL_INTERVAL)
    assert (following.body, following.complete) == (DATA, True)
    # (Its rename failed:) the spool goes, nothing is published.
    os.unlink(downloader.path)
    downloader.die()
    first.advance(FOLLOW_POLL_INTERVAL)
    assert first.cached() is None and first.resource.downloads.in_flight(key()) is None


def test_a_spool_that_cannot_be_followed_is_fetched_here(pair, network, monkeypatch):
    def unsupported(fd):
        raise SpoolUnshared("no extended attributes here")

    monkeypatch.setattr(shared_spool, "_read_record", unsupported)
    first_client = pair.first.get()
    second_client = pair.second.get()
    pair.poll()
    assert len(network.requests) == 2
    for request in list(network.requests):
        request.serve(DATA)
    pair.pump()
    assert first_client.body == second_client.body == DATA
    assert pair.first.cached() == DATA and pair.first.spools() == []


def test_revalidations_and_volatile_files_stay_with_their_process(make_cache, network):
    first = make_cache(volatile=[r"\.index$"])
    second = make_cache(volatile=[r"\.index$"])
    pair = Pair(first, second, lambda: (first.pump(), second.pump(), first.pump()))
    network.after_step = pair.pump
    path = "/dists/x.index"
    clients = [first.get(path), second.get(path)]
    assert [pair.download(cache, path).following for cache in (first, second)] == [False, False]
    for request in list(network.requests):
        request.serve(b"an index\n")
    assert [client.body for client in clients] == [b"an index\n"] * 2


def test_a_follower_whose_client_leaves_while_it_looks_still_ends(make_cache, network):
    """
    The client takes the last bytes, and leaves, within the follower's own
    look at the spool (a fast client): the follower is given up then, not
    left asleep for good once nobody waits.
    """
    small = DATA[:10_000]
    first = make_cache()
    downloader = ForeignDownloader(first)
    downloader.answered(length=len(small))
    client = first.get()
    first.advance(FOLLOW_POLL_INTERVAL)
    assert client.body == b"" and not client.complete
    downloader.write(small)
    first.advance(FOLLOW_POLL_INTERVAL)
    assert (client.body, client.complete) == (small, True)
    first.advance(FOLLOW_POLL_INTERVAL)
    assert first.resource.downloads.in_flight(key()) is None
    assert poll_timers(first) == []
    # (The downloader goes on as it will.)
    downloader.publish(EntryMetadata(content_type=b"application/x-test", source=A))


def test_a_client_answered_as_it_wakes_a_sleeping_follower(make_cache, network):
    """
    The follower sleeps (its one client has stopped reading) while the
    other process downloads on.  A client asking for a range past what the
    follower has seen wakes it as it attaches, and is answered whole right
    there, before its producer would be registered: that must not break
    (a worker following another's download logged AttributeErrors).
    """
    first = make_cache()
    downloader = ForeignDownloader(first)
    downloader.answered(length=len(DATA))
    downloader.write(DATA[:200_000])
    slow = first.get(stop_reading_after=0)
    first.advance(FOLLOW_POLL_INTERVAL)
    downloader.write(DATA[200_000:500_000])
    first.advance(FOLLOW_POLL_INTERVAL)
    first.advance(FOLLOW_POLL_INTERVAL)
    assert poll_timers(first) == []  # asleep: nobody waits for bytes
    downloader.write(DATA[500_000:])
    tail = first.get(headers={"range": "bytes=1000000-1000999"})
    assert (tail.code, tail.body, tail.complete) == (206, DATA[1_000_000:1_001_000], True)
    downloader.publish(EntryMetadata(content_type=b"application/x-test", source=A))
    slow.connection.read_again()
    first.advance(FOLLOW_POLL_INTERVAL)
    assert (slow.body, slow.complete) == (DATA, True)


def test_a_follower_passes_on_the_upper_tiers_entries(pair, network):
    """Via and Cache-Status of the source (a tier above), as the
    downloading process got them: answers do not differ by worker."""
    downloading = pair.first.get()
    body = network.pending(url(A)).respond(
        length=len(DATA), headers={"via": "1.1 dc", "cache-status": "dc; hit"}
    )
    body.send(DATA[:1000])
    following = pair.second.get()
    pair.poll()
    for client in (downloading, following):
        assert client.header("via") == "1.1 dc, 1.1 pkgcache"
        assert client.header("cache-status").startswith("dc; hit, pkgcache; fwd=miss")
    body.send(DATA[1000:])
    pair.poll()
    assert following.body == DATA

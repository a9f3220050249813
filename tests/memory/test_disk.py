"""
When the disk falls behind or fails: the source is paused while too much
waits in memory, and a download that cannot be spooled keeps streaming to
its clients but is never published.
"""

from __future__ import annotations

import errno

from twisted.internet.defer import fail, maybeDeferred

from pkgcache.download import MEMORY_HIGH_WATER
from tests.memory.conftest import A, HeldDisk, key, url

MIB = 1024 * 1024
CHUNK = bytes(range(256)) * 4096  # 1 MiB


def test_a_source_is_paused_while_the_disk_is_behind(make_cache, network):
    disk = HeldDisk()
    cache = make_cache(run_blocking=disk, idle_timeout=30)
    client = cache.get()
    chunks = MEMORY_HIGH_WATER // MIB + 2
    body = network.pending(url(A)).respond(length=chunks * MIB)
    for _ in range(chunks - 1):
        assert not body.paused
        body.send(CHUNK)
    assert body.paused, "past the high-water mark the source must be paused"
    assert len(client.body) == (chunks - 1) * MIB, "clients still get what is in memory"
    cache.advance(60)
    assert not body.stopped, "a source paused by us is not timed out"
    disk.run_all()
    assert not body.paused
    body.send(CHUNK)
    disk.run_all()
    assert client.complete and len(client.body) == chunks * MIB
    assert cache.cached() == CHUNK * chunks


def test_the_source_is_asked_with_no_disk_work_queued_before(make_cache, network):
    """The claim of the file's shared spool writes nothing yet: the first
    disk job is the record of the source's headers, once they come."""
    disk = HeldDisk()
    cache = make_cache(run_blocking=disk)
    cache.get()
    asked = network.pending(url(A))
    assert disk.queued == 0
    body = asked.respond(length=len(CHUNK))
    assert disk.queued == 1, "the headers' record, and only it"
    body.send(CHUNK)
    disk.run_all()
    assert cache.cached() == CHUNK


def _no_space_for_writes(function, *args):
    if function.__name__ == "_write_all":
        return fail(OSError(errno.ENOSPC, "No space left on device"))
    return maybeDeferred(function, *args)


def test_a_full_disk_keeps_streaming_and_publishes_nothing(make_cache, network):
    cache = make_cache(run_blocking=_no_space_for_writes)
    client = cache.get()
    body = network.pending(url(A)).respond(length=2 * MIB)
    body.send(CHUNK)
    # A new client does not join a download that cannot be cached.
    other = cache.get()
    assert len(network.requests) == 2
    body.send(CHUNK)
    assert (client.body, client.complete) == (CHUNK * 2, True)
    assert cache.cached() is None
    # (The second download claimed the file's spool as it started.)
    network.pending(url(A)).serve(CHUNK)
    assert other.complete
    assert cache.cached() is None and cache.spools() == []


def test_a_download_nobody_follows_that_cannot_be_cached_stops(make_cache, network):
    cache = make_cache(run_blocking=_no_space_for_writes)
    client = cache.get()
    body = network.pending(url(A)).respond(length=2 * MIB)
    body.send(CHUNK)
    cache.disconnect(client)
    assert body.stopped
    assert cache.spools() == []


def test_an_uncached_download_whose_client_takes_the_last_byte_lets_the_body_end(
    make_cache, network
):
    """
    The client takes the last byte as it arrives, before the source's
    response has ended: the body is left to end on its own, not cut (a cut
    there spoilt a keep-alive connection to the source, whose next request
    then broke and was sent again).
    """
    small = CHUNK[:16 * 1024]  # so that the client's connection takes each at once
    cache = make_cache(run_blocking=_no_space_for_writes)
    client = cache.get()
    body = network.pending(url(A)).respond(length=2 * len(small))
    body.send(small)
    body.send(small)
    assert (client.body, client.complete) == (small * 2, True)
    assert not body.stopped
    assert cache.resource.downloads.in_flight(key()) is None

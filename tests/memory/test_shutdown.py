"""
Shutdown while downloads run: clients cut off (or 503 if nothing was sent
yet), nothing published afterwards, and 503 for every later request.
"""

from __future__ import annotations

import pytest

from tests.memory.conftest import A, PATH, url

DATA = bytes(range(256)) * 40
OTHER = "/distfiles/bar-2.0.tar.gz"


def test_stopping_the_service_gives_up_downloads_in_progress(cache, network):
    receiving = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:4000])
    waiting = cache.get(OTHER)
    hanging = network.pending(url(A, OTHER))

    stopped = cache.stop()
    assert stopped.called and stopped.result is None

    assert receiving.body == DATA[:4000] and receiving.cut_off
    assert waiting.code == 503 and waiting.text == "shutting down\n"
    assert body.stopped and hanging.cancelled
    assert network.waiting == [], "no source is asked anything more"
    body.send(DATA[4000:])  # too late: the connection is closed
    assert cache.cached() is None and cache.cached(OTHER) is None
    assert cache.spools() == []

    after = cache.get()
    assert after.code == 503 and "not running" in after.text
    assert len(network.requests) == 2


def test_resource_close_gives_up_downloads_in_progress(cache, network):
    receiving = cache.get()
    body = network.pending(url(A)).respond(length=len(DATA))
    body.send(DATA[:4000])
    closed = cache.resource.close()
    cache.pump()
    assert closed.called
    assert receiving.cut_off and body.stopped
    assert cache.cached() is None and cache.spools() == []
    assert cache.get().code == 503


def test_a_download_waiting_for_a_slot_is_given_up_with_503(make_cache, network):
    cache = make_cache(max_downloads=1)
    first = cache.get()
    queued = cache.get(OTHER)
    cache.stop()
    assert first.code == 503 and queued.code == 503
    assert network.requests[0].cancelled
    assert network.waiting == []
    assert cache.spools() == []


class _InsertionOrderedSet:
    """The part of ``set`` that ``Downloads`` uses, iterated in insertion order."""

    def __init__(self) -> None:
        self._items: dict = {}

    def add(self, item) -> None:
        self._items[item] = None

    def discard(self, item) -> None:
        self._items.pop(item, None)

    def __iter__(self):
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


@pytest.mark.parametrize(
    "holder_cancelled",
    [
        "last",
        "first",
    ],
)
def test_shutdown_starts_no_download_that_waited_for_a_slot(make_cache, network, holder_cancelled):
    """
    Downloads.cancel_all walks a set, whose order varies from run to run;
    both orders are pinned here (the set is swapped for an ordered one).
    """
    cache = make_cache(max_downloads=1)
    running = cache.resource.downloads._running = _InsertionOrderedSet()
    cache.get()
    queued = cache.get(OTHER)
    if holder_cancelled == "last":
        (holder,) = [d for d in running if d.key.segments[-1] == "foo-1.0.tar.gz"]
        running.discard(holder)
        running.add(holder)
    cache.stop()
    assert queued.code == 503
    assert network.urls == [url(A)], "no source may be asked anything during shutdown"


def test_a_cancelled_request_blames_no_source(cache, network):
    """A shutdown's cancel is not a timeout: the source is not put in back-off."""
    cache.get()
    cache.stop()
    assert not cache.health.is_down(cache.upstream.sources[0])
    assert cache.timers() == []


def test_a_hit_being_sent_at_shutdown_is_not_cut_short(cache, network):
    """Shutdown gives up downloads; a file already cached is sent whole."""
    big = bytes(range(256)) * 4096
    cache.put(PATH, big)
    client = cache.get(stop_reading_after=1)
    cache.stop()
    cache.read_again(client)
    assert (client.body, client.complete) == (big, True)

"""
What a hit of a small file does not cost (beyond tests/memory/test_hits.py):
no stall timer unless its client pauses it, and its status line and
headers go to the transport in one write.
"""

from __future__ import annotations

import os

from twisted.internet.testing import StringTransport

from pkgcache import responses
from tests.memory.conftest import PATH

DATA = os.urandom(10_000)


def test_a_body_sent_at_once_makes_no_stall_timer(make_cache, network, monkeypatch):
    """The stall timer of a hit's producer is made only when a client pauses it."""
    made: list = []
    real = responses.IdleTimer
    monkeypatch.setattr(responses, "IdleTimer", lambda *a: made.append(a) or real(*a))
    cache = make_cache(client_stall_timeout=60)
    cache.put(PATH, DATA)
    assert cache.get().complete
    assert made == []
    cache.put(PATH, DATA * 100)
    stalled = cache.get(stop_reading_after=1)
    assert len(made) == 1
    cache.advance(60)
    assert stalled.aborted and cache.timers() == []


class _Writes(StringTransport):
    """A transport that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, data) -> None:
        self.writes.extend(["piece"] * len(data))
        super().writeSequence(data)


def test_a_hits_headers_go_in_one_write(make_cache):
    cache = make_cache()
    cache.put(PATH, DATA)
    transport = _Writes()
    channel = cache.site.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    channel.dataReceived(b"GET %s HTTP/1.1\r\nHost: cache.example\r\n\r\n" % PATH.encode())
    headers, body = transport.writes
    assert headers.startswith(b"HTTP/1.1 200 OK\r\n") and headers.endswith(b"\r\n\r\n")
    assert body == DATA
    channel.connectionLost(None)

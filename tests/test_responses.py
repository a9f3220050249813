"""
The answer shared by hits and misses, in memory: Range parsing, multipart
framing, and the body producer over a byte source that hands out a few
bytes at a time (as a download does, one chunk per read).
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from pkgcache.interfaces import IByteSource
from pkgcache.ranges import MAX_RANGES, UNSATISFIABLE, ByteRange, requested_ranges
from pkgcache.responses import Entity, send_entity
from tests.clients import multipart_parts

DATA = bytes(range(256)) * 40  # 10,240 bytes


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        (b"bytes=0-9", [ByteRange(0, 10)]),
        (b"bytes=10-", [ByteRange(10, 100)]),
        (b"bytes=-5", [ByteRange(95, 100)]),
        (b"bytes=-500", [ByteRange(0, 100)]),
        (b"bytes=90-200", [ByteRange(90, 100)]),
        (b"bytes=0-1, 5-9", [ByteRange(0, 2), ByteRange(5, 10)]),
        (b"BYTES = 0-1", [ByteRange(0, 2)]),
        (b"bytes=100-", UNSATISFIABLE),
        (b"bytes=-0", UNSATISFIABLE),
        (b"bytes=100-, 200-300", UNSATISFIABLE),
        (b"bytes=100-, 5-9", [ByteRange(5, 10)]),
        (b"bytes=9-5", None),  # malformed: ignored
        (b"bytes=a-b", None),
        (b"bytes=-", None),
        (b"items=0-1", None),
        (b"bytes=0-9,5-20", None),  # overlapping: the whole file
        (b"bytes=" + b",".join(b"%d-%d" % (n, n) for n in range(MAX_RANGES + 1)), None),
    ],
)
def test_requested_ranges(header, expected):
    assert requested_ranges(header, 100) == expected


def test_no_ranges_of_an_unknown_length_or_an_empty_file():
    assert requested_ranges(b"bytes=0-1", None) is None
    assert requested_ranges(b"bytes=0-1", 0) is None


@implementer(IByteSource)
class Trickle:
    """A complete file that hands out at most ``step`` bytes per read."""

    complete = True
    failure = None

    def __init__(self, data: bytes, step: int) -> None:
        self._data = data
        self._step = step
        self.received = len(data)
        self.detached = False

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + min(length, self._step)]

    def attach(self, follower) -> None:
        pass

    def detach(self, follower) -> None:
        self.detached = True

    def follower_advanced(self) -> None:
        pass


class Answer(Resource):
    isLeaf = True

    def __init__(self, source: IByteSource) -> None:
        super().__init__()
        self.source = source

    def render(self, request):
        entity = Entity(len(DATA), 1_600_000_000.0, b"application/x-test")
        producer = send_entity(request, entity, self.source, clock=Clock(), stall_timeout=60)
        if producer is not None:
            producer.start()
        return NOT_DONE_YET


def answer(source: IByteSource, *headers: bytes) -> tuple[bytes, bytes]:
    """Ask ``/x`` in memory; the response's head and body."""
    channel = Site(Answer(source)).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        b"GET /x HTTP/1.0\r\n" + b"".join(header + b"\r\n" for header in headers) + b"\r\n"
    )
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("step", [1, 7, 4096, len(DATA)])
def test_short_reads_still_make_the_whole_body(step):
    source = Trickle(DATA, step)
    head, body = answer(source)
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"Content-Length: %d" % len(DATA) in head
    assert body == DATA
    assert source.detached


def test_a_multipart_answer_from_short_reads():
    head, body = answer(Trickle(DATA, 3), b"Range: bytes=10-19,-4")
    assert head.startswith(b"HTTP/1.0 206 ")
    (content_type,) = [
        line.split(b": ", 1)[1] for line in head.split(b"\r\n") if line.startswith(b"Content-Type")
    ]
    assert multipart_parts(content_type, body) == [
        (b"bytes 10-19/10240", DATA[10:20]),
        (b"bytes 10236-10239/10240", DATA[-4:]),
    ]
    assert b"Content-Length: %d" % len(body) in head


def test_if_range_with_another_date_gets_the_whole_file():
    head, body = answer(
        Trickle(DATA, 100), b"Range: bytes=0-9", b"If-Range: Mon, 01 Jan 2001 00:00:00 GMT"
    )
    assert head.startswith(b"HTTP/1.0 200 ") and body == DATA
    head, body = answer(
        Trickle(DATA, 100), b"Range: bytes=0-9", b"If-Range: Sun, 13 Sep 2020 12:26:40 GMT"
    )
    assert head.startswith(b"HTTP/1.0 206 ") and body == DATA[:10]

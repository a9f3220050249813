"""
The fakes against the real thing: a body that :class:`FakeBody` ends, and a
request :class:`FakeRequest` cancels, report what Twisted's own client
reports for the same bytes on the wire.  If Twisted changed how it reports
them, these fail before the tests built on the fakes mislead anyone.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, Request, ResponseNeverReceived
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from tests.memory.conftest import FakeNetwork

_HEAD = {
    "length": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "none": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
}
_PART = {"length": b"hello", "chunked": b"5\r\nhello\r\n", "none": b"hello"}


class _Record(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.reason = reason


def _shape(reason: Failure) -> tuple:
    """A failure's type and, for ResponseFailed, the types of its reasons."""
    if reason.check(ResponseFailed):
        return (ResponseFailed, tuple(inner.type for inner in reason.value.reasons))
    return (reason.type,)


def _twisted_report(framing: str, lost_with: Failure) -> tuple[bytes, tuple]:
    """What Twisted's client tells a body protocol when the connection is lost."""
    client = HTTP11ClientProtocol()
    client.makeConnection(StringTransport())
    responses = []
    client.request(Request(b"GET", b"/f", Headers({b"host": [b"x"]}), None)).addCallback(
        responses.append
    )
    client.dataReceived(_HEAD[framing])
    record = _Record()
    responses[0].deliverBody(record)
    client.dataReceived(_PART[framing])
    client.connectionLost(lost_with)
    return record.data, _shape(record.reason)


def _fake_body(framing: str):
    network = FakeNetwork()
    network.request(b"GET", b"http://a.example/f")
    responses = []
    network.requests[0].answer.addCallback(responses.append)
    body = network.requests[0].respond(
        length=10 if framing == "length" else None, chunked=framing == "chunked"
    )
    record = _Record()
    responses[0].deliverBody(record)
    body.send(b"hello")
    return network, body, record


@pytest.mark.parametrize("framing", ["length", "chunked", "none"])
def test_a_cut_is_reported_as_twisted_reports_it(framing):
    _, body, record = _fake_body(framing)
    body.cut()
    expected_data, expected_shape = _twisted_report(framing, Failure(ConnectionDone()))
    assert record.data == expected_data
    assert _shape(record.reason)[0] == expected_shape[0]
    if expected_shape[0] is ResponseFailed:
        # The connection-level reason differs (ours says lost, not closed).
        assert _shape(record.reason)[1][1:] == expected_shape[1][1:]


@pytest.mark.parametrize("framing", ["length", "chunked", "none"])
def test_stop_producing_is_reported_as_twisted_reports_it(framing):
    network, body, record = _fake_body(framing)
    record.transport.stopProducing()
    assert record.reason is None, "a closed connection is reported later, not at once"
    network.pump()
    assert body.stopped
    assert _shape(record.reason) == _twisted_report(framing, Failure(ConnectionDone()))[1]


def test_a_cancelled_request_fails_as_twisted_s_does():
    client = HTTP11ClientProtocol()
    client.makeConnection(StringTransport())
    real = client.request(Request(b"GET", b"/f", Headers({b"host": [b"x"]}), None))
    real_failures = []
    real.addErrback(real_failures.append)
    real.cancel()

    network = FakeNetwork()
    fake = network.request(b"GET", b"http://a.example/f")
    fake_failures = []
    fake.addErrback(fake_failures.append)
    fake.cancel()

    for failure in (real_failures[0], fake_failures[0]):
        assert failure.check(ResponseNeverReceived)
        assert [reason.type for reason in failure.value.reasons] == [CancelledError]
    assert network.requests[0].cancelled

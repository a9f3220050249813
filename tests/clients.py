"""
Test clients that read a response body in particular ways.
"""

from __future__ import annotations

import hashlib
from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone


class BodyReader(Protocol):
    """
    Collects a body, optionally at no more than ``rate`` bytes per second
    (by pausing the connection, so the server sees a slow reader), and
    records when its first byte came.

    :ivar done: fires with the whole body, fails if it was cut short.
    """

    def __init__(self, rate: Optional[float] = None) -> None:
        self.rate = rate
        self.received = 0
        self._chunks: list[bytes] = []
        self.first_byte: Deferred[None] = Deferred()
        self.done: Deferred[bytes] = Deferred()
        self._resume_call = None

    def dataReceived(self, data: bytes) -> None:
        if not self.first_byte.called:
            self.first_byte.callback(None)
        self.received += len(data)
        self._chunks.append(data)
        if self.rate:
            self.transport.pauseProducing()
            self._resume_call = reactor.callLater(len(data) / self.rate, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        self.transport.resumeProducing()

    def full_speed(self) -> None:
        """Stop throttling."""
        self.rate = None
        if self._resume_call is not None:
            self._resume_call.cancel()
            self._resume()

    def hang_up(self) -> None:
        self.done.addErrback(lambda _: None)
        self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        if not self.first_byte.called:
            self.first_byte.callback(None)
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


async def start_reading(http, url: str, rate: Optional[float] = None, headers=None):
    """Send a GET and start reading its body: ``(response, reader)``."""
    response = await http.request("GET", url, headers=headers)
    reader = BodyReader(rate)
    response.deliverBody(reader)
    return response, reader


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SmallBufferClient:
    """
    A GET over a plain non-blocking socket with a small receive buffer, read
    only when the test says: so the server really feels a slow or stalled
    client (the kernel's default loopback buffers can swallow tens of
    megabytes, hiding any reader's pace from the server).
    """

    def __init__(self, url: str, receive_buffer: int = 64 * 1024) -> None:
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self._socket.connect((parts.hostname, parts.port))
        self._socket.setblocking(False)
        self._socket.sendall(
            b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % parts.path.encode()
        )
        self._data = bytearray()
        self.closed = False

    @property
    def body(self) -> bytes:
        return bytes(self._data.split(b"\r\n\r\n", 1)[1]) if b"\r\n\r\n" in self._data else b""

    def read(self, limit: int) -> int:
        """Take at most ``limit`` bytes that have arrived; how many came."""
        taken = 0
        while taken < limit and not self.closed:
            try:
                chunk = self._socket.recv(min(65536, limit - taken))
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
            self._data += chunk
            taken += len(chunk)
        return taken

    async def read_at(self, rate: float, until) -> None:
        """Read at ``rate`` bytes per second until ``until()`` holds."""
        from tests.conftest import sleep

        while not until() and not self.closed:
            self.read(int(rate / 100))
            await sleep(0.01)

    async def read_to_end(self, timeout: float = 30.0) -> bytes:
        from tests.conftest import wait_for

        await wait_for(lambda: self.read(1 << 30) >= 0 and self.closed, timeout)
        return self.body

    def close(self) -> None:
        self._socket.close()


def multipart_parts(content_type: bytes, body: bytes) -> list[tuple[bytes, bytes]]:
    """
    The parts of a ``multipart/byteranges`` body, as ``(Content-Range,
    data)``; fails on anything but exact framing.
    """
    media_type, _, parameter = content_type.partition(b"; boundary=")
    assert media_type == b"multipart/byteranges", content_type
    delimiter = b"\r\n--" + parameter
    assert body.endswith(delimiter + b"--\r\n"), "no closing delimiter"
    parts = []
    for part in body[: -len(delimiter + b"--\r\n")].split(delimiter)[1:]:
        head, _, data = part.partition(b"\r\n\r\n")
        headers = dict(
            line.split(b": ", 1) for line in head.split(b"\r\n") if line
        )
        parts.append((headers[b"Content-Range"], data))
    return parts


class RawConnection(Protocol):
    """
    A connection that sends its request as is and stays open until the
    server closes it or the test hangs up: a client that leaves at the
    moment the test chooses (see :func:`open_raw`).

    :ivar received: everything the server has sent so far.
    :ivar closed: fires with everything received once the connection is gone.
    """

    def __init__(self, request: bytes) -> None:
        self._request = request
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.received)

    def hang_up(self) -> "Deferred[bytes]":
        """Drop the connection (if the server has not): fires once it is gone."""
        if not self.closed.called:
            self.transport.abortConnection()
        return self.closed


async def open_raw(url: str, request: bytes, timeout: float = 10.0) -> RawConnection:
    """Connect to ``url`` (``http://host:port``) and send ``request``."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    endpoint = TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout)
    return await connectProtocol(endpoint, RawConnection(request))


async def within(seconds: float, waiting, failure: str):
    """
    The result of ``waiting`` (a Deferred or a coroutine), which must come
    within ``seconds``, else ``AssertionError(failure)``: for an event the
    test has made sure can come (a held origin, say), where its never
    coming is the bug, so that the test says so instead of hanging until
    the suite's timeout.
    """
    waited = waiting if isinstance(waiting, Deferred) else Deferred.fromCoroutine(waiting)
    expired: list = []

    def expire() -> None:
        expired.append(True)
        waited.cancel()

    timer = reactor.callLater(seconds, expire)
    try:
        return await waited
    except Exception:
        # Cancelling shows in many forms (an Agent's ResponseNeverReceived...).
        if expired:
            raise AssertionError(failure) from None
        raise
    finally:
        if timer.active():
            timer.cancel()

"""
An in-memory test layer: pkgcache's download, upstream and resource logic
driven in milliseconds, with no socket and no real time.

- :class:`FakeNetwork` stands in for the sources' network (an ``IAgent``).
  It records every request pkgcache makes (:class:`FakeRequest`), and the
  test answers each one, step by step: a status and headers, then body
  chunks (:class:`FakeBody`), a clean end, a cut, silence, a refused
  connection, or no answer at all.
- :class:`MemoryCache` is pkgcache as its clients see it: a
  :class:`~pkgcache.resource.PackageCacheResource` in a real ``Site``, its
  store on ``tmp_path`` (disk work done at once), every timer on one
  ``Clock``.  Each client request (:class:`Exchange`) has a connection of
  its own (:class:`MemoryConnection`) with real Twisted HTTP protocols at
  both ends, so producers, pauses, disconnects and headers behave as over
  a socket.
- :func:`run_at_once` and :class:`HeldDisk` run the store's disk work: at
  once, or when the test lets it (a disk that falls behind).

Nothing happens by itself.  What a reactor would do later (hand bytes to
the other end of a connection, report a closed connection) happens in
:meth:`MemoryCache.pump`, which the harness runs after every step a test
takes (answering a request, sending a chunk, advancing the clock, a client
pausing): when a step returns, everything it set off has happened, and
anything still pending is waiting for the network, a client or the clock.
"""

from __future__ import annotations

import itertools
import os
from io import BytesIO
from typing import Callable, Optional, Union

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web import http
from twisted.web._newclient import HTTP11ClientProtocol, Request as ClientRequest
from twisted.web._newclient import ResponseNeverReceived, _DataLoss
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IClientRequest, IResponse
from zope.interface import implementer

from pkgcache.paths import CacheKey, cache_key_from_postpath
from pkgcache.resource import PackageCacheResource
from pkgcache.service import CacheService, QuietSite
from pkgcache.sources import Peer, Source, SourceHealth
from pkgcache.store import CacheStore
from pkgcache.upstream import UpstreamClient

#: Three sources, tried in this order.
A = "http://a.example/"
B = "http://b.example/"
C = "http://c.example/"

#: The file most tests ask for, and its URL below a source.
PATH = "/distfiles/foo-1.0.tar.gz"


def url(source: str, path: str = PATH) -> str:
    """The URL pkgcache asks ``source`` for ``path``."""
    return source.rstrip("/") + path


def key(path: str = PATH) -> CacheKey:
    """The cache key of a request path, as the resource makes it."""
    return cache_key_from_postpath([segment.encode() for segment in path.lstrip("/").split("/")])


def _as_bytes(value: Union[str, bytes, int]) -> bytes:
    if isinstance(value, int):
        return b"%d" % (value,)
    return value.encode("latin-1") if isinstance(value, str) else value


def _headers(headers: Optional[dict]) -> Headers:
    result = Headers()
    for name, value in (headers or {}).items():
        result.addRawHeader(_as_bytes(name), _as_bytes(value))
    return result


# -- the sources' network -----------------------------------------------------


@implementer(IAgent)
class FakeNetwork:
    """
    The network to the sources, as an ``IAgent``: pass it as
    ``UpstreamClient(agent=...)``.

    Every request is recorded, in order, in :attr:`requests`, and waits
    until the test answers it (see :class:`FakeRequest`).

    :ivar after_step: run after each step a test takes on the network
        (an answer, a chunk, an end): by default :meth:`pump`; a
        :class:`MemoryCache` makes it pump its clients' connections too.
    """

    def __init__(self) -> None:
        self.requests: list[FakeRequest] = []
        self._bodies: list[FakeBody] = []
        self.after_step: Callable[[], None] = self.pump

    def request(self, method, uri, headers=None, bodyProducer=None) -> "Deferred[IResponse]":
        assert bodyProducer is None, "pkgcache sends no request bodies"
        request = FakeRequest(self, method, uri, headers if headers is not None else Headers())
        self.requests.append(request)
        return request.answer

    # what the test looks at

    @property
    def urls(self) -> list[str]:
        """The URL of every request so far, in order."""
        return [request.url for request in self.requests]

    @property
    def waiting(self) -> list["FakeRequest"]:
        """The requests nobody answered or cancelled yet."""
        return [request for request in self.requests if not request.answer.called]

    def pending(self, to: str) -> "FakeRequest":
        """
        The one request for ``to`` (a URL) that waits for an answer: fails
        the test if there is none, or more than one.
        """
        matching = [request for request in self.waiting if request.url == to]
        assert len(matching) == 1, (
            f"expected one request waiting for {to}, found {len(matching)}; "
            f"waiting: {[request.url for request in self.waiting]}"
        )
        return matching[0]

    # what a reactor would do

    def deliver(self) -> bool:
        """
        Hand every body's protocol what reached it since the last call.

        :return: whether anything was delivered.
        """
        delivered = [body.deliver() for body in self._bodies]
        self._bodies = [body for body in self._bodies if not body.ended]
        return any(delivered)

    def pump(self) -> None:
        """Deliver until nothing more arrives."""
        while self.deliver():
            pass

    def _track(self, body: "FakeBody") -> None:
        self._bodies.append(body)


@implementer(IClientRequest)
class FakeRequest:
    """
    One request pkgcache sent to a source, waiting for the test to answer
    it with exactly one of :meth:`respond` (or :meth:`serve`,
    :meth:`serve_rest`, :meth:`redirect`), :meth:`refuse`, or :meth:`fail`.

    Answered with none of them, it hangs, as a source that accepted the
    connection and never answers: pkgcache's idle timer (on the clock)
    then cancels it, which fails it as Twisted's ``Agent`` does, with
    ``ResponseNeverReceived([Failure(CancelledError())])``.

    :ivar method: as sent, e.g. ``b"GET"``.
    :ivar absoluteURI: as sent.
    :ivar url: the same, as text.
    :ivar headers: as sent.
    :ivar cancelled: whether pkgcache gave up waiting for the answer.
    """

    def __init__(self, network: FakeNetwork, method: bytes, uri: bytes, headers: Headers):
        self._network = network
        self.method = method
        self.absoluteURI = uri
        self.url = uri.decode("ascii")
        self.headers = headers
        self.cancelled = False
        self.answer: Deferred[IResponse] = Deferred(self._cancel)

    def header(self, name: str) -> Optional[str]:
        """The request's (first) ``name`` header, or ``None``."""
        value = self.headers.getRawHeaders(name.encode("ascii"), [None])[0]
        return None if value is None else value.decode("latin-1")

    @property
    def range(self) -> Optional[str]:
        """The ``Range`` header, as in ``bytes=100-``."""
        return self.header("range")

    @property
    def range_start(self) -> int:
        """Where a ``Range: bytes=N-`` request starts (0 without one)."""
        if self.range is None:
            return 0
        unit, _, spec = self.range.partition("=")
        assert unit == "bytes" and spec.endswith("-"), f"unexpected Range {self.range!r}"
        return int(spec[:-1])

    # answers

    def respond(
        self,
        code: int = http.OK,
        headers: Optional[dict] = None,
        *,
        length: Optional[int] = None,
        chunked: bool = False,
    ) -> "FakeBody":
        """
        Answer with a status and headers; the body follows through the
        :class:`FakeBody` returned.

        :param length: the ``Content-Length``; ``None`` for none: then the
            body is ``chunked``, or ends when the connection closes (which
            a client cannot tell from a cut).
        """
        assert not (chunked and length is not None), "a chunked body has no Content-Length"
        self._check_unanswered()
        body = FakeBody(self._network, self.method, length, chunked)
        response = FakeResponse(self, code, _headers(headers), body)
        self._network._track(body)
        self.answer.callback(response)
        self._network.after_step()
        return body

    def serve(self, data: bytes, code: int = http.OK, headers: Optional[dict] = None) -> "FakeBody":
        """Answer with ``data`` as the whole body, and its length."""
        body = self.respond(code, headers, length=len(data))
        if data and self.method != b"HEAD":
            body.send(data)
        return body

    def respond_rest(self, length: int, headers: Optional[dict] = None) -> "FakeBody":
        """
        Answer a ``Range: bytes=N-`` request as a mirror that has a file of
        ``length`` bytes: 206 and its ``Content-Range``; the bytes from
        ``N`` are to be sent through the body returned.
        """
        start = self.range_start
        assert 0 < start < length, f"not a range within the file: {self.range!r}"
        content_range = f"bytes {start}-{length - 1}/{length}"
        return self.respond(
            http.PARTIAL_CONTENT,
            dict(headers or {}, **{"content-range": content_range}),
            length=length - start,
        )

    def serve_rest(self, data: bytes, headers: Optional[dict] = None) -> "FakeBody":
        """As :meth:`respond_rest` for ``data``, and send its bytes from ``N``."""
        body = self.respond_rest(len(data), headers)
        body.send(data[self.range_start :])
        return body

    def redirect(self, location: str, code: int = http.FOUND) -> "FakeBody":
        """Answer with a redirect to ``location`` (and an empty body)."""
        return self.respond(code, {"location": location}, length=0)

    def refuse(self) -> None:
        """Refuse the connection, as Twisted's ``Agent`` reports it."""
        self.fail(ConnectionRefusedError("Connection refused"))

    def fail(self, reason: BaseException) -> None:
        """Fail the request with ``reason``, as the agent would."""
        self._check_unanswered()
        self.answer.errback(Failure(reason))
        self._network.after_step()

    def _check_unanswered(self) -> None:
        assert not self.cancelled, f"pkgcache gave up on {self.url} already"
        assert not self.answer.called, f"{self.url} was answered already"

    def _cancel(self, answer: Deferred) -> None:
        # What HTTP11ClientProtocol does when its request is cancelled
        # before the response arrived.
        self.cancelled = True
        answer.errback(Failure(ResponseNeverReceived([Failure(CancelledError())])))


@implementer(IResponse)
class FakeResponse:
    """
    A source's response as Twisted's client hands it over: ``length`` holds
    the ``Content-Length`` (kept out of ``headers``, except for HEAD), and
    the body comes through :meth:`deliverBody`.
    """

    version = (b"HTTP", 1, 1)

    def __init__(self, request: FakeRequest, code: int, headers: Headers, body: "FakeBody"):
        self.request = request
        self.code = code
        self.phrase = http.RESPONSES.get(code, b"Unknown")
        self.headers = headers
        self.previousResponse: Optional[IResponse] = None
        self._body = body
        if request.method == b"HEAD":
            if body.announced is not None:
                headers.setRawHeaders(b"content-length", [b"%d" % (body.announced,)])
            self.length = 0
        else:
            self.length = UNKNOWN_LENGTH if body.announced is None else body.announced

    def deliverBody(self, protocol) -> None:
        self._body.attach(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


@implementer(IPushProducer)
class FakeBody:
    """
    A response body in transit, and the connection it comes over: the
    protocol given to ``deliverBody`` has this as its ``transport``.

    The test :meth:`send` chunks and ends the body (:meth:`finish`,
    :meth:`cut`), or sends nothing (a stall: pkgcache's idle timer then
    calls :meth:`stopProducing`).  Chunks reach the protocol one
    ``dataReceived`` each, at the next pump, while it has not paused the
    connection.  A body with a ``Content-Length`` ends cleanly once that
    many bytes arrived.  The protocol is told how it ended with the reason
    Twisted's client gives: ``ResponseDone``, ``ResponseFailed([...,
    _DataLoss])`` for a connection lost before the end, or
    ``PotentialDataLoss`` for a body that ends with its connection.

    :ivar sent: bytes the test sent.
    :ivar delivered: bytes handed to the protocol.
    :ivar paused: whether the protocol paused the connection now.
    :ivar was_paused: whether it ever did.
    :ivar stopped: whether pkgcache closed the connection
        (``stopProducing``): it discarded the body, or gave up on it.
    :ivar reason: how the protocol was told the body ended, once it was.
    """

    def __init__(
        self, network: FakeNetwork, method: bytes, length: Optional[int], chunked: bool
    ) -> None:
        self._network = network
        self.announced = length
        # A HEAD's answer has no body, whatever its Content-Length says.
        self._length = 0 if method == b"HEAD" else length
        self._chunked = chunked
        self.protocol: Optional[Protocol] = None
        self._queue: list[bytes] = []
        self._end: Optional[Failure] = None
        self.sent = 0
        self.delivered = 0
        self.paused = False
        self.was_paused = False
        self.stopped = False
        self.reason: Optional[Failure] = None

    @property
    def ended(self) -> bool:
        """Whether the protocol was told that the body ended."""
        return self.reason is not None

    # the test's side

    def send(self, data: bytes) -> None:
        """
        Send a chunk of the body (delivered at the next pump; lost if
        pkgcache closed the connection).
        """
        if self._length is not None:
            assert self.sent + len(data) <= self._length, "more than the Content-Length"
        self.sent += len(data)
        if self.stopped:
            return
        assert self._end is None and not self.ended, "the body has ended"
        self._queue.append(data)
        self._network.after_step()

    def finish(self) -> None:
        """
        End a body that has no ``Content-Length``: with its last chunk
        (chunked), or by closing the connection (which Twisted's client
        reports as ``PotentialDataLoss``).  One with a length ends by
        itself once all of it is sent: use :meth:`cut` to end it early.
        """
        assert self._length is None, "a body with a length ends once it is all sent"
        if self._chunked:
            self._end_with(Failure(ResponseDone()))
        else:
            self._end_with(Failure(PotentialDataLoss()))

    def cut(self) -> None:
        """The source's connection breaks off after what was sent."""
        self._end_with(self._lost(ConnectionLost()))

    def _end_with(self, reason: Failure) -> None:
        if self.stopped:
            return  # pkgcache closed the connection already
        assert self._end is None and not self.ended, "the body has ended"
        self._end = reason
        self._network.after_step()

    def _lost(self, why: Exception) -> Failure:
        """What Twisted's client reports when the connection is lost."""
        if self._length is None and not self._chunked:
            return Failure(PotentialDataLoss())
        return Failure(ResponseFailed([Failure(why), Failure(_DataLoss())]))

    # the protocol's side

    def attach(self, protocol: Protocol) -> None:
        assert self.protocol is None, "deliverBody called twice"
        self.protocol = protocol
        protocol.makeConnection(self)

    def pauseProducing(self) -> None:
        if not self.ended:
            self.paused = self.was_paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        if not self.ended and not self.stopped:
            # The connection is closed: what was on its way never arrives.
            self.stopped = True
            self._queue.clear()

    def loseConnection(self) -> None:
        self.stopProducing()

    def deliver(self) -> bool:
        """
        Hand the protocol what reached it: called by the network's pump.

        :return: whether anything happened.
        """
        if self.protocol is None or self.ended:
            return False
        if self._complete:
            # As Twisted's client, which ends a body the moment its last
            # byte arrives (an empty one at once), paused or not.
            self._tell(Failure(ResponseDone()))
            return True
        if self.stopped:
            # A connection closed by its protocol is lost later, as with a
            # real reactor (not inside the stopProducing call).
            self._tell(self._lost(ConnectionDone()))
            return True
        progress = False
        while self._queue and not self.paused and not self.stopped and not self._complete:
            data = self._queue.pop(0)
            self.delivered += len(data)
            self.protocol.dataReceived(data)
            progress = True
        if self._complete or self.stopped:
            return self.deliver() or True
        if self._end is not None and not self._queue and not self.paused:
            self._tell(self._end)
            return True
        return progress

    @property
    def _complete(self) -> bool:
        return self._length is not None and self.delivered == self._length

    def _tell(self, reason: Failure) -> None:
        self.reason = reason
        self.paused = False
        assert self.protocol is not None
        self.protocol.connectionLost(reason)


# -- pkgcache's clients -------------------------------------------------------


class _CacheEnd(StringTransport):
    """
    The cache's end of a :class:`MemoryConnection`: what the ``Site``
    writes waits in the buffer until the client reads it.
    """

    def __init__(self, connection: "MemoryConnection", peer_port: int) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 4000),
            peerAddress=IPv4Address("TCP", "127.0.0.1", peer_port),
            lenient=True,
        )
        self._connection = connection
        self.aborted = False

    def write(self, data: bytes) -> None:
        if self._connection.closed:
            return  # as a real transport, once the connection is gone
        super().write(data)
        self._connection._cache_wrote()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    @property
    def waiting(self) -> int:
        """How many bytes wait for the client to read them."""
        return self.io.tell()

    def take(self, size: int) -> bytes:
        """Remove and return up to ``size`` bytes of what waits to be read."""
        waiting = self.io.getvalue()
        self.io = BytesIO()
        self.io.write(waiting[size:])
        return waiting[:size]


class MemoryConnection:
    """
    One client connection to the cache, in memory: the cache's ``Site``
    protocol at one end, Twisted's ``HTTP11ClientProtocol`` at the other,
    and :meth:`pump` carrying the bytes between them.

    It behaves as a TCP connection whose send buffer holds ``buffer_size``
    bytes: once more than that waits for the client, the cache's producer
    is paused, and it is resumed once the client has read everything.  A
    client that stops reading (:meth:`stop_reading`) therefore pauses the
    cache's producer as soon as the cache writes past the buffer.

    :ivar closed: whether the connection is gone.
    :ivar aborted: whether the cache reset it (``abortConnection``).
    """

    _ports = itertools.count(40000)

    def __init__(self, site, buffer_size: int = 64 * 1024) -> None:
        self.buffer_size = buffer_size
        self.reading = True
        self.closed = False
        self.aborted = False
        self._paused_cache = False
        self.cache_end = _CacheEnd(self, next(self._ports))
        self.client_end = StringTransport(lenient=True)
        self.server = site.buildProtocol(self.cache_end.getPeer())
        self.client = HTTP11ClientProtocol()
        self.server.makeConnection(self.cache_end)
        self.client.makeConnection(self.client_end)

    def stop_reading(self) -> None:
        """
        The client takes nothing more until :meth:`read_again` (the cache
        notices once it has written more than the buffer holds).
        """
        self.reading = False

    def read_again(self) -> None:
        self.reading = True

    def disconnect(self) -> None:
        """The client closes the connection (at the next pump)."""
        self.client_end.loseConnection()

    def pump(self) -> bool:
        """
        Move what each end wrote to the other, and close the connection
        if one end closed it.

        :return: whether anything happened.
        """
        if self.closed:
            return False
        progress = False
        request_bytes = self.client_end.value()
        if request_bytes and self.cache_end.producerState == "producing":
            self.client_end.clear()
            self.server.dataReceived(request_bytes)
            progress = True
        # A buffer's worth at a time, so that a client can stop reading
        # part-way through what the cache wrote in one go.
        while (
            self.reading
            and self.client_end.producerState == "producing"
            and self.cache_end.waiting
            and not self.closed
        ):
            self.client.dataReceived(self.cache_end.take(self.buffer_size))
            progress = True
        if self.reading and self.client_end.producerState == "producing":
            if self._paused_cache and not self.cache_end.waiting and not self.closed:
                self._paused_cache = False
                if self.cache_end.producer is not None:
                    self.cache_end.producer.resumeProducing()
                progress = True
        if self.closed:
            return progress
        if self.cache_end.aborted:
            # A reset: what the client did not read yet is lost.
            self._close(ConnectionAborted(), ConnectionLost("connection reset"), aborted=True)
        elif self.client_end.disconnecting:
            self._close(ConnectionDone(), ConnectionDone())
        elif self.cache_end.disconnecting and not self.cache_end.waiting:
            self._close(ConnectionDone(), ConnectionDone())
        else:
            return progress
        return True

    def _cache_wrote(self) -> None:
        full = self.cache_end.waiting > self.buffer_size
        if full and not self._paused_cache and self.cache_end.producer is not None:
            self._paused_cache = True
            self.cache_end.producer.pauseProducing()

    def _close(self, cache_reason: Exception, client_reason: Exception, aborted=False) -> None:
        self.closed = True
        self.aborted = aborted
        self.cache_end.clear()
        self.cache_end.connected = self.client_end.connected = False
        self.server.connectionLost(Failure(cache_reason))
        self.client.connectionLost(Failure(client_reason))


class Exchange:
    """
    One request from a client of the cache, as that client sees it.

    :ivar response: Twisted's response, once its headers arrived.
    :ivar reason: why the response ended, once it has: ``ResponseDone`` if
        it was complete, else the failure Twisted's client reported
        (``ResponseFailed``, ``PotentialDataLoss``, ``ResponseNeverReceived``).
    """

    def __init__(
        self,
        connection: MemoryConnection,
        method: bytes,
        path: str,
        headers: Optional[dict],
        stop_reading_after: Optional[int],
    ) -> None:
        self.connection = connection
        self._method = method
        self.response: Optional[IResponse] = None
        self.reason: Optional[Failure] = None
        self._chunks: list[bytes] = []
        self._stop_reading_after = stop_reading_after
        request_headers = _headers(dict({"host": "cache.example"}, **(headers or {})))
        request = ClientRequest(method, path.encode("ascii"), request_headers, None)
        connection.client.request(request).addCallbacks(self._got_response, self._ended)

    # what the client saw

    @property
    def code(self) -> Optional[int]:
        return None if self.response is None else self.response.code

    @property
    def length(self) -> Optional[int]:
        """The ``Content-Length``, if there was one."""
        if self.response is None:
            return None
        if self._method == b"HEAD":
            # Twisted's client keeps a HEAD's Content-Length as a header.
            announced = self.header("content-length")
            return None if announced is None else int(announced)
        return None if self.response.length is UNKNOWN_LENGTH else self.response.length

    def header(self, name: str) -> Optional[str]:
        """The response's (first) ``name`` header, or ``None``."""
        if self.response is None:
            return None
        value = self.response.headers.getRawHeaders(name.encode("ascii"), [None])[0]
        return None if value is None else value.decode("latin-1")

    @property
    def body(self) -> bytes:
        """The body received so far."""
        return b"".join(self._chunks)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    @property
    def ended(self) -> bool:
        """Whether the response is over, complete or not."""
        return self.reason is not None

    @property
    def complete(self) -> bool:
        """Whether the whole response arrived and ended cleanly."""
        return self.reason is not None and self.reason.check(ResponseDone) is not None

    @property
    def cut_off(self) -> bool:
        """Whether the response ended before it was complete."""
        return self.ended and not self.complete

    @property
    def aborted(self) -> bool:
        """Whether the cache reset the connection."""
        return self.connection.aborted

    # what the client does

    def stop_reading(self) -> None:
        """Stop reading (the cache's producer is paused once its buffer fills)."""
        self.connection.stop_reading()

    def read_again(self) -> None:
        self.connection.read_again()

    def disconnect(self) -> None:
        """Hang up."""
        self.connection.disconnect()

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.code} {len(self.body)} bytes "
            f"{'complete' if self.complete else 'cut off' if self.ended else 'open'}>"
        )

    def _got_response(self, response: IResponse) -> None:
        self.response = response
        response.deliverBody(_Collector(self))

    def _received(self, data: bytes) -> None:
        self._chunks.append(data)
        if self._stop_reading_after is not None and len(self.body) >= self._stop_reading_after:
            self._stop_reading_after = None
            self.connection.stop_reading()

    def _ended(self, reason: Failure) -> None:
        self.reason = reason


class _Collector(Protocol):
    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    def dataReceived(self, data: bytes) -> None:
        self._exchange._received(data)

    def connectionLost(self, reason=None) -> None:
        self._exchange._ended(reason)


# -- the cache ----------------------------------------------------------------


def run_at_once(function, *args) -> Deferred:
    """A disk runner for :class:`CacheStore` that does the work right away."""
    return maybeDeferred(function, *args)


class HeldDisk:
    """
    A disk runner for :class:`CacheStore` whose work waits until the test
    lets it run: a disk that falls behind the network.
    """

    def __init__(self) -> None:
        self._queue: list[tuple[Deferred, Callable, tuple]] = []
        self.after_step: Callable[[], None] = lambda: None

    def __call__(self, function, *args) -> Deferred:
        done: Deferred = Deferred()
        self._queue.append((done, function, args))
        return done

    @property
    def queued(self) -> int:
        return len(self._queue)

    def run_all(self) -> None:
        """Do the work queued, and whatever that work queues in turn."""
        while self._queue:
            done, function, args = self._queue.pop(0)
            maybeDeferred(function, *args).chainDeferred(done)
        self.after_step()


class MemoryCache:
    """
    A :class:`PackageCacheResource` in a ``Site``, its sources a
    :class:`FakeNetwork`, its cache in ``cache_dir``, its timers on
    ``clock``; started (its service runs) until :meth:`stop`.

    :ivar upstream: the :class:`UpstreamClient` (``health`` is its back-off,
        of its sources and of its ``peers``).
    """

    def __init__(
        self,
        cache_dir: FilePath,
        clock: Clock,
        network: FakeNetwork,
        sources=(A, B),
        *,
        idle_timeout: float = 30.0,
        client_stall_timeout: float = 300.0,
        max_downloads: Optional[int] = None,
        max_body_size: Optional[int] = None,
        run_blocking: Callable[..., Deferred] = run_at_once,
        peers=(),
        **resource_options,
    ) -> None:
        self.clock = clock
        self.network = network
        self.cache_dir = cache_dir
        self.health = SourceHealth(clock)
        self.upstream = UpstreamClient(
            [Source(source) for source in sources],
            agent=network,
            clock=clock,
            idle_timeout=idle_timeout,
            max_body_size=max_body_size,
            health=self.health,
            peers=[Peer(peer) for peer in peers],
        )
        self.store = CacheStore(cache_dir, reactor=clock, run_blocking=run_blocking)
        # Named as the tests' Cache-Status expectations have it.
        resource_options.setdefault("node_name", "pkgcache")
        self.resource = PackageCacheResource(
            reactor=clock,
            upstream=self.upstream,
            store=self.store,
            client_stall_timeout=client_stall_timeout,
            max_downloads=max_downloads,
            **resource_options,
        )
        self.service = CacheService(self.resource, reactor=clock)
        self.site = QuietSite(self.resource, reactor=clock)
        self.connections: list[MemoryConnection] = []
        self._pumping = False
        network.after_step = self.pump
        if isinstance(run_blocking, HeldDisk):
            run_blocking.after_step = self.pump
        self.service.startService()

    # clients

    def request(
        self,
        method: str,
        path: str = PATH,
        headers: Optional[dict] = None,
        *,
        stop_reading_after: Optional[int] = None,
    ) -> Exchange:
        """
        Send a request on a new connection, and pump.

        :param stop_reading_after: the client stops reading once it has this
            many bytes of the body (see :meth:`Exchange.stop_reading`).
        """
        connection = MemoryConnection(self.site)
        self.connections.append(connection)
        exchange = Exchange(connection, method.encode("ascii"), path, headers, stop_reading_after)
        self.pump()
        return exchange

    def get(self, path: str = PATH, headers: Optional[dict] = None, **options) -> Exchange:
        return self.request("GET", path, headers, **options)

    def head(self, path: str = PATH, headers: Optional[dict] = None) -> Exchange:
        return self.request("HEAD", path, headers)

    # time and events

    def pump(self) -> None:
        """Carry every byte and close that is due, until nothing moves."""
        if self._pumping:
            return  # the loop running now carries on until nothing moves
        self._pumping = True
        try:
            for _ in range(100_000):
                progress = self.network.deliver()
                for connection in list(self.connections):
                    progress = connection.pump() or progress
                if not progress:
                    return
            raise AssertionError("the pump never settles")
        finally:
            self._pumping = False

    def advance(self, seconds: float) -> None:
        """
        Move the clock on by ``seconds``, then pump.  Timers that the
        expired ones start count from the end of the advance: advance in
        the steps a test means (two timeouts in a row are two advances).
        """
        self.clock.advance(seconds)
        self.pump()

    def read_again(self, *exchanges: Exchange) -> None:
        """Let these clients read again, and pump."""
        for exchange in exchanges:
            exchange.read_again()
        self.pump()

    def disconnect(self, *exchanges: Exchange) -> None:
        """These clients hang up; pump."""
        for exchange in exchanges:
            exchange.disconnect()
        self.pump()

    def stop(self) -> Deferred:
        """Stop the service (shutdown), and pump."""
        stopping = self.service.stopService()
        self.pump()
        return stopping

    # the cache directory

    def cached(self, path: str = PATH) -> Optional[bytes]:
        """The published file's content, or ``None`` if it is not cached."""
        target = self.store.path_for(key(path))
        return target.getContent() if target.isfile() else None

    def spools(self) -> list[str]:
        """The names in the spool directory."""
        return os.listdir(self.store.spool_dir.path)

    def put(self, path: str, data: bytes) -> None:
        """Publish ``data`` at ``path`` by hand (a hit for later requests)."""
        target = self.store.path_for(key(path))
        target.parent().makedirs(ignoreExistingDirectory=True)
        target.setContent(data)

    def timers(self) -> list:
        """The clock's pending calls."""
        return self.clock.getDelayedCalls()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def network() -> FakeNetwork:
    return FakeNetwork()


@pytest.fixture
def make_cache(tmp_path, clock, network):
    """
    ``make_cache(sources=(A, B), **options)``: a started
    :class:`MemoryCache` on this test's clock and network; stopped after
    the test.
    """
    made: list[MemoryCache] = []

    def make(sources=(A, B), **options) -> MemoryCache:
        cache = MemoryCache(
            FilePath(str(tmp_path)).child("cache"), clock, network, sources, **options
        )
        made.append(cache)
        return cache

    yield make
    for cache in made:
        if cache.service.running:
            stopped = cache.stop()
            assert stopped.called, "the service did not stop at once"


@pytest.fixture
def cache(make_cache) -> MemoryCache:
    """A cache in front of sources :data:`A` and :data:`B`, default options."""
    return make_cache()

"""
Origin servers for tests: real HTTP servers on 127.0.0.1 that serve files and
misbehave on purpose (slowly, partly, not at all), and count what they are
asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

_RANGE = re.compile(rb"^bytes=(\d+)-(\d*)$")


class Gate:
    """
    Holds back what an origin sends until the test opens it, so that a test
    can arrange what it needs (clients joined, a request seen) while the
    download cannot move on, instead of hoping a slow origin leaves it time.

    Used as ``OriginFile.gate``: alone, every answer waits at the gate
    before its headers; with ``OriginFile.pause_at``, the headers and that
    many bytes of the body are sent, then the rest waits.  Once open, a
    gate stays open (later requests pass straight through).

    :ivar reached: how many answers have come to the gate (and, while it
        was closed, waited there).
    """

    def __init__(self) -> None:
        self.is_open = False
        self.reached = 0
        self._waiting: list[Deferred[None]] = []

    def open(self) -> None:
        """Let everything held, and everything to come, through."""
        self.is_open = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def passed(self) -> "Deferred[None]":
        """Fires once the gate is open (at once, if it is)."""
        self.reached += 1
        if self.is_open:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter


@dataclass
class OriginFile:
    """
    How an origin serves one path.

    :ivar data: the file.
    :ivar status: a status other than 200 is answered with a short body.
    :ivar ranges: honour ``Range: bytes=N-[M]`` with a 206.
    :ivar chunk_size: bytes written at a time.
    :ivar rate: bytes per second (``None``: as fast as the client reads).
    :ivar close_at: drop the connection once this many bytes were sent.
    :ivar stall_at: send this many bytes, then nothing, keeping the
        connection open.
    :ivar hang: accept the request and never answer it.
    :ivar content_length: announce the length (else the body is chunked).
    :ivar headers: extra response headers.
    :ivar content_type: the ``Content-Type`` to send (``None``: none).
    :ivar delay: seconds to wait before answering.
    :ivar short_ranges: answer a range request with a ``Content-Range`` to
        the end of the file but only this many bytes (a lying mirror).
    :ivar gate: a :class:`Gate` that holds each answer, headers and all,
        until the test opens it; with ``pause_at``, only the body from that
        byte on.
    :ivar pause_at: with ``gate``: send the headers and this many bytes of
        the body (counted like ``close_at``), then wait for the gate; the
        rest, up to ``close_at``/``stall_at`` if set, follows once it opens.
    """

    data: bytes = b""
    status: int = 200
    ranges: bool = True
    chunk_size: int = 16 * 1024
    rate: Optional[float] = None
    close_at: Optional[int] = None
    stall_at: Optional[int] = None
    hang: bool = False
    content_length: bool = True
    headers: Optional[dict] = None
    content_type: Optional[bytes] = b"application/octet-stream"
    delay: float = 0.0
    short_ranges: Optional[int] = None
    gate: Optional[Gate] = None
    pause_at: Optional[int] = None


class Origin(Resource):
    """
    Serves :class:`OriginFile` s by path and records every request as
    ``(method, path, range header)``.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, OriginFile] = {}
        self.requests: list[tuple[bytes, str, Optional[bytes]]] = []
        self._open: set[Request] = set()
        self._timers: set = set()

    def add(self, path: str, data: bytes = b"", **behaviour) -> OriginFile:
        self.files[path] = OriginFile(data=data, **behaviour)
        return self.files[path]

    def count(self, path: str, method: bytes = b"GET") -> int:
        return sum(1 for m, p, _ in self.requests if p == path and m == method)

    def render(self, request: Request):
        path = request.path.decode("utf-8")
        range_header = request.getHeader(b"range")
        self.requests.append((request.method, path, range_header))
        spec = self.files.get(path)
        if spec is None:
            request.setResponseCode(http.NOT_FOUND)
            return b"not here\n"
        self._track(request)
        if spec.hang:
            return NOT_DONE_YET
        if spec.gate is not None and spec.pause_at is None:
            spec.gate.passed().addCallback(
                lambda _: self._answer(request, spec, range_header)
            )
        elif spec.delay:
            timer = reactor.callLater(spec.delay, self._answer, request, spec, range_header)
            self._timers.add(timer)
        else:
            self._answer(request, spec, range_header)
        return NOT_DONE_YET

    def _answer(self, request: Request, spec: OriginFile, range_header: Optional[bytes]):
        if request.channel is None:
            return
        request.defaultContentType = spec.content_type
        for name, value in (spec.headers or {}).items():
            request.setHeader(name, value)
        if spec.status != http.OK:
            request.setResponseCode(spec.status)
            request.write(b"origin says %d\n" % (spec.status,))
            request.finish()
            return
        start, end = 0, len(spec.data)
        match = _RANGE.match(range_header or b"")
        if spec.ranges and match:
            start = int(match.group(1))
            if match.group(2):
                end = min(int(match.group(2)) + 1, end)
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(
                b"content-range", b"bytes %d-%d/%d" % (start, end - 1, len(spec.data))
            )
            if spec.short_ranges is not None:
                end = start + spec.short_ranges
        if spec.ranges:
            request.setHeader(b"accept-ranges", b"bytes")
        if spec.content_length:
            request.setHeader(b"content-length", b"%d" % (end - start,))
        if request.method == b"HEAD":
            request.finish()
            return
        self._send(request, spec, start, start, end)

    def _track(self, request: Request) -> None:
        self._open.add(request)
        request.notifyFinish().addBoth(lambda _: self._open.discard(request))

    def _send(self, request: Request, spec: OriginFile, first: int, offset: int, end: int):
        if request.finished or request.channel is None:
            return
        sent = offset - first
        if spec.close_at is not None and sent >= spec.close_at:
            request.transport.abortConnection()
            return
        if spec.stall_at is not None and sent >= spec.stall_at:
            return
        pausing = spec.gate is not None and spec.pause_at is not None and not spec.gate.is_open
        if pausing and sent >= spec.pause_at:
            spec.gate.passed().addCallback(
                lambda _: self._send(request, spec, first, offset, end)
            )
            return
        if offset >= end:
            request.finish()
            return
        limit = end
        for cut in (spec.close_at, spec.stall_at, spec.pause_at if pausing else None):
            if cut is not None:
                limit = min(limit, first + cut)
        chunk = spec.data[offset : min(offset + spec.chunk_size, limit)]
        request.write(chunk)
        delay = len(chunk) / spec.rate if spec.rate else 0
        timer = reactor.callLater(delay, self._sent, request, spec, first, offset + len(chunk), end)
        self._timers.add(timer)

    def _sent(self, request, spec, first, offset, end):
        self._timers = {timer for timer in self._timers if timer.active()}
        self._send(request, spec, first, offset, end)

    def close(self) -> None:
        """Drop every connection still open and stop every pending write."""
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        for request in list(self._open):
            if request.channel is not None:
                request.transport.abortConnection()


class OriginServer:
    """An :class:`Origin` listening on 127.0.0.1."""

    def __init__(self) -> None:
        self.origin = Origin()
        self.site = Site(self.origin)
        self.site.log = lambda request: None
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/"

    def add(self, path: str, data: bytes = b"", **behaviour) -> OriginFile:
        return self.origin.add(path, data, **behaviour)

    def count(self, path: str, method: bytes = b"GET") -> int:
        return self.origin.count(path, method)

    async def stop(self) -> None:
        self.origin.close()
        if self.port.connected:
            await self.port.stopListening()


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    number = port.getHost().port
    port.stopListening()
    return f"http://127.0.0.1:{number}/"

"""
How pkgcache answers: one set of headers and one body producer for hits
and misses alike, so a file looks the same whether it came from disk or is
still arriving from a source.

:func:`send_entity` sets the headers (``Content-Type`` as the source said,
``X-Content-Type-Options: nosniff``, ``Last-Modified``, ``Accept-Ranges``),
answers conditional and ``Range`` requests, and streams the body with a
:class:`BodyProducer` from a byte source (:class:`IByteSource`): an open
cached file, or a download that is still growing.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Union

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.http import (
    BAD_GATEWAY, NOT_MODIFIED, PARTIAL_CONTENT, REQUESTED_RANGE_NOT_SATISFIABLE,
    SERVICE_UNAVAILABLE, datetimeToString, stringToDatetime,
)
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from pkgcache.interfaces import IByteSource, IFollower
from pkgcache.ranges import UNSATISFIABLE, Multipart, requested_ranges
from pkgcache.sources import AllSourcesFailed
from pkgcache.timers import IdleTimer
from pkgcache.transports import IFileSender, ISendsFiles
from pkgcache.upstream import BodyFailed
from pkgcache.via import LOOP_DETECTED

#: How much one read from the byte source takes: a file up to this size is
#: answered in one write, with no producer.
READ_SIZE = 256 * 1024

log = Logger()


class Entity:
    """
    What the headers say about a file (a value: not changed once made).

    :ivar length: its length, if known (a chunked miss may not know it).
    :ivar last_modified: seconds since the epoch.
    :ivar etag: the source's entity tag, if it sent one.
    """

    # A plain class, not a frozen dataclass: one is made for every answer,
    # and a frozen dataclass's __init__ costs a hit about 1% of its time.
    __slots__ = ("length", "last_modified", "content_type", "etag")

    def __init__(
        self,
        length: Optional[int],
        last_modified: float,
        content_type: bytes,
        etag: Optional[bytes] = None,
    ) -> None:
        self.length = length
        self.last_modified = last_modified
        self.content_type = content_type
        self.etag = etag

    def __repr__(self) -> str:
        return (
            f"Entity(length={self.length!r}, last_modified={self.last_modified!r}, "
            f"content_type={self.content_type!r}, etag={self.etag!r})"
        )


class _Span:
    """A byte range still to send, of which ``start`` moves on; ``end``
    ``None`` means up to wherever the source completes."""

    def __init__(self, start: int, end: Optional[int]) -> None:
        self.start = start
        self.end = end


_Piece = Union[bytes, _Span]


def send_entity(
    request: Request,
    entity: Entity,
    source: IByteSource,
    *,
    clock: IReactorTime,
    stall_timeout: float,
) -> Optional["BodyProducer"]:
    """
    Answer ``request`` with the file ``entity`` describes, its body to be
    read from ``source``.

    :return: the producer to :meth:`~BodyProducer.start`, or ``None`` when
        the answer has no body (304, 416, HEAD) and is finished already.
    """
    # (The Headers' own methods: Request.setHeader and getHeader only call
    # them, and a hit sets or asks for nine.)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [entity.content_type])
    headers.setRawHeaders(b"x-content-type-options", _NOSNIFF)
    if entity.length is not None:
        headers.setRawHeaders(b"accept-ranges", _BYTES)
    if _not_modified(request, entity):
        request.setResponseCode(NOT_MODIFIED)
        request.finish()
        return None
    pieces = _plan_body(request, entity)
    if request.method == b"HEAD" or not pieces:
        request.finish()
        return None
    return BodyProducer(request, source, pieces, clock=clock, stall_timeout=stall_timeout)


_NOSNIFF = [b"nosniff"]
_BYTES = [b"bytes"]


@lru_cache(maxsize=4096)
def _http_date(seconds: int) -> bytes:
    """An HTTP date, made once for each of the times hot files have."""
    return datetimeToString(seconds)


def _not_modified(request: Request, entity: Entity) -> bool:
    """
    Whether the client's copy is current: by ``If-None-Match`` if it sent
    one (weak comparison, RFC 9110 13.1.2), else by ``If-Modified-Since``.
    Sets ``ETag`` and ``Last-Modified`` either way (the latter ourselves,
    not by ``Request.setLastModified``, so that its date is not formatted
    again for every request).
    """
    headers = request.responseHeaders
    if entity.etag is not None:
        headers.setRawHeaders(b"etag", [entity.etag])
    # HTTP dates are good for whole seconds.
    last_modified = math.ceil(entity.last_modified)
    headers.setRawHeaders(b"last-modified", [_http_date(last_modified)])
    asked = request.requestHeaders
    if_none_match = asked.getRawHeaders(b"if-none-match")
    if if_none_match is None:
        since = asked.getRawHeaders(b"if-modified-since")
        if since is None:
            return False
        try:
            return stringToDatetime(since[-1].split(b";", 1)[0]) >= last_modified
        except (ValueError, IndexError):  # not a date (IndexError: nothing before ";")
            return False
    if entity.etag is None:
        return False
    tags = {tag.strip().removeprefix(b"W/") for tag in if_none_match[-1].split(b",")}
    return b"*" in tags or entity.etag.removeprefix(b"W/") in tags


def _plan_body(request: Request, entity: Entity) -> list[_Piece]:
    """Set the status and length headers; return what the body is made of."""
    length = entity.length
    asked = request.requestHeaders.getRawHeaders(b"range")
    if asked is None:
        # No Range (a hit, mostly): the whole body.
        if length is not None:
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % (length,)])
        return [_Span(0, length)]
    ranges = requested_ranges(asked[-1], length)
    if ranges is not None:
        if_range = request.getHeader(b"if-range")
        if if_range is not None:
            # A strong match only: a weak tag or another date means a new file.
            date = _http_date(math.ceil(entity.last_modified))
            strong = entity.etag is not None and not entity.etag.startswith(b"W/")
            if if_range != date and not (strong and if_range == entity.etag):
                ranges = None
    if ranges is None:
        if length is not None:
            request.setHeader(b"content-length", b"%d" % (length,))
        return [_Span(0, length)]
    assert length is not None
    if ranges is UNSATISFIABLE:
        request.setResponseCode(REQUESTED_RANGE_NOT_SATISFIABLE)
        request.setHeader(b"content-range", b"bytes */%d" % (length,))
        request.setHeader(b"content-length", b"0")
        return []
    request.setResponseCode(PARTIAL_CONTENT)
    if len(ranges) == 1:
        (only,) = ranges
        request.setHeader(b"content-range", only.content_range(length))
        request.setHeader(b"content-length", b"%d" % (only.end - only.start,))
        return [_Span(only.start, only.end)]
    multipart = Multipart.new(entity.content_type, length)
    request.setHeader(b"content-type", multipart.media_type)
    request.setHeader(b"content-length", b"%d" % (multipart.body_length(ranges),))
    pieces: list[_Piece] = []
    for byte_range in ranges:
        pieces += [multipart.part_header(byte_range), _Span(byte_range.start, byte_range.end)]
    return pieces + [multipart.closing()]


#: The headers an answer keeps when its file fails before a byte is sent.
_KEPT_ON_FAILURE = (b"cache-status", b"via")


@implementer(IPushProducer, IFollower, IFileSender)
class BodyProducer:
    """
    Streams the pieces of a body from a byte source to one client, as the
    bytes become available and as fast as the client takes them.  A
    complete file (a hit) bigger than one read goes by ``sendfile`` where
    the transport can (:mod:`pkgcache.transports`).

    The client's transport pauses and resumes it; a download it follows
    tells it when there is more (:meth:`data_available`).  So a slow client
    only falls behind in the file, never in memory.

    If the source fails before anything was sent, the client gets an error
    status saying why.  After that, the response is never finished: the
    connection is closed short of ``Content-Length`` or with no last chunk,
    so the client's tool reports an error (curl: exit 18) instead of taking
    a short body for a whole file; where neither would show (HTTP/1.0
    without a length), the connection is reset.

    A client that takes nothing for ``stall_timeout`` seconds is dropped:
    Twisted suspends a connection's idle timeout while a request is being
    answered, so a client that stops reading would otherwise hold its
    connection and a descriptor for ever.
    """

    def __init__(
        self,
        request: Request,
        source: IByteSource,
        pieces: list[_Piece],
        *,
        clock: IReactorTime,
        stall_timeout: float,
    ) -> None:
        self._request = request
        self._source = source
        self._pieces = pieces
        self._paused = False
        self._pumping = False
        self._done = False
        self._clock = clock
        self._stall_timeout = stall_timeout
        # Made when first needed: most bodies are sent without a pause.
        self._stall_timer: Optional[IdleTimer] = None
        # The piece the transport is sending from the file, if it is.
        self._sending_file: Optional[_Span] = None
        self._may_send_file = True

    @property
    def _stalled(self) -> IdleTimer:
        """The stall timer (not running until touched)."""
        if self._stall_timer is None:
            self._stall_timer = IdleTimer(self._clock, self._stall_timeout, self._drop_stalled)
        return self._stall_timer

    def _stop_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.stop()

    @property
    def needed_from(self) -> int:
        spans = [piece.start for piece in self._pieces if isinstance(piece, _Span)]
        return min(spans, default=self._source.received)

    def start(self) -> None:
        """Start streaming; the request's headers must be set already."""
        # Registered even for a body sent in one write: a client that does
        # not take it pauses us, and the stall timer runs until it does.
        # Registered before attaching, as attaching may tell us of new
        # bytes at once (a download following another process's looks at
        # its spool as we wake it), and we may send them all and finish.
        self._request.registerProducer(self, True)
        self._source.attach(self)
        if self._done:
            return
        if (self._source.complete and self._send_at_once()
                and not self._paused and not self._done):
            self._finish()  # (what the pump would do now, less the looking)
            self._source.follower_advanced()
        else:
            self._pump()
        if not self._request.finished:
            # Still to send (or closing after a failure): hear of the client
            # leaving.  Asked only now, as it cannot leave while we run, so
            # that a body sent at once costs no Deferred for it.
            self._request.notifyFinish().addErrback(lambda _: self._client_gone())

    def data_available(self) -> None:
        if not self._paused:
            self._pump()

    # IPushProducer, driven by the client's transport

    def pauseProducing(self) -> None:
        self._paused = True
        if not self._stalled.running:
            self._stalled.touch()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._sending_file is None:
            self._stop_stall_timer()
            self._pump()

    # IFileSender, told by the transport

    def file_progressed(self, count: int) -> None:
        self._sending_file.start += count
        self._request.sentLength += count
        self._stalled.touch()

    def file_sent(self) -> None:
        self._sending_file = None
        if not self._paused:
            self._stop_stall_timer()
            self._pump()

    def file_unsendable(self) -> None:
        self._may_send_file = False
        self.file_sent()

    def stopProducing(self) -> None:
        self._client_gone()

    # internals

    def _send_at_once(self) -> bool:
        """
        Send a small body of a complete source in one write, rather than
        read by read (nothing is sent unless all of it can be).

        :return: whether it was sent.
        """
        source = self._source
        pieces = self._pieces
        size = 0
        for piece in pieces:
            size += len(piece) if isinstance(piece, bytes) else _end(piece, source) - piece.start
        if size > READ_SIZE:
            return False
        parts = []
        for piece in pieces:
            if isinstance(piece, bytes):
                parts.append(piece)
                continue
            # A download's read stops at a chunk's end, or at the spool's.
            offset, end = piece.start, _end(piece, source)
            while offset < end:
                data = source.read(offset, end - offset)
                if not data:
                    return False
                parts.append(data)
                offset += len(data)
        self._pieces = []
        self._request.write(parts[0] if len(parts) == 1 else b"".join(parts))
        return True

    def _pump(self) -> None:
        if self._pumping or self._done or self._sending_file is not None:
            return
        self._pumping = True
        try:
            while not self._paused and not self._done and self._send_some():
                pass
        finally:
            self._pumping = False
        self._source.follower_advanced()

    def _send_some(self) -> bool:
        """
        Send what is available of the next piece, or end the response if
        nothing more will be.

        :return: whether there may be more to send right away.
        """
        if not self._pieces:
            self._finish()
            return False
        piece = self._pieces[0]
        if isinstance(piece, bytes):
            self._pieces.pop(0)
            self._request.write(piece)
            return True
        source = self._source
        end = _end(piece, source) if source.complete else piece.end
        if end is not None and piece.start >= end:
            self._pieces.pop(0)
            return True
        if source.complete and source.fd is not None and self._may_send_file:
            transport = self._request.transport
            # The class, not the object: Twisted's TLS wrapper provides the
            # interfaces of the transport it wraps (and forwards their
            # methods to it), which would send the file past TLS.
            if ISendsFiles.implementedBy(type(transport)):
                # The headers, if not sent yet: they say if the body is chunked.
                self._request.write(b"")
                if not self._request.chunked:
                    self._sending_file = piece
                    self._stalled.touch()
                    transport.send_file(source.fd, piece.start, end - piece.start, self)
                    return False
            self._may_send_file = False
        wanted = READ_SIZE if end is None else min(READ_SIZE, end - piece.start)
        available = min(wanted, source.received - piece.start)
        if available > 0:
            data = source.read(piece.start, available)
            piece.start += len(data)
            self._request.write(data)
            return True
        if source.failure is not None:
            self._fail(source.failure)
        return False

    def _finish(self) -> None:
        self._done = True
        self._stop_stall_timer()
        if self._request.producer is not None:
            self._request.unregisterProducer()
        self._request.finish()
        self._source.detach(self)

    def _fail(self, reason: BaseException) -> None:
        self._done = True
        request = self._request
        if request.producer is not None:
            request.unregisterProducer()
        if not request.startedWriting:
            # The file's headers go; what says which caches answered stays.
            planned, request.responseHeaders = request.responseHeaders, Headers()
            for name in _KEPT_ON_FAILURE:
                values = planned.getRawHeaders(name)
                if values:
                    request.responseHeaders.setRawHeaders(name, values)
            status, message = failure_response(reason)
            send_error(request, status, message)
        elif request.responseHeaders.hasHeader(b"content-length") or request.chunked:
            # The client can tell this close from a complete response.  The
            # stall timer still drops it if it never reads what is buffered.
            request.transport.loseConnection()
            self._stalled.touch()
        else:
            request.transport.abortConnection()
        self._source.detach(self)

    def _drop_stalled(self) -> None:
        log.info(
            "dropping a client of {path} that took nothing for {seconds:g}s",
            path=self._request.path.decode("utf-8", "replace"), seconds=self._stalled.timeout,
        )
        # Not loseConnection: that would wait for the client to read what
        # is buffered, which it will not.
        self._request.transport.abortConnection()

    def _client_gone(self) -> None:
        self._stop_stall_timer()
        if not self._done:
            self._done = True
            self._source.detach(self)


def _end(piece: _Span, source: IByteSource) -> int:
    """Where ``piece`` ends, once ``source`` is complete."""
    return source.received if piece.end is None else piece.end


def failure_response(reason: BaseException) -> tuple[int, str]:
    """The status and short text that tell a client why its file failed."""
    if isinstance(reason, AllSourcesFailed):
        return reason.status, f"no source provided this file:\n{reason}"
    if isinstance(reason, CancelledError):
        return SERVICE_UNAVAILABLE, "shutting down"
    if isinstance(reason, BodyFailed):
        return BAD_GATEWAY, f"the download failed before these bytes arrived: {reason}"
    return BAD_GATEWAY, "the download failed"


#: Reason phrases of the statuses we send that Twisted has none for.
_PHRASES = {LOOP_DETECTED: b"Loop Detected"}


def send_error(
    request: Request, status: int, message: str, phrase: Optional[bytes] = None
) -> None:
    """
    A short plain-text answer, finished at once (if the client is still
    there); ``phrase``, the reason phrase of a status Twisted has none for.
    """
    body = (message + "\n").encode("utf-8")
    request.setResponseCode(status, phrase or _PHRASES.get(status))
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    if request.finished or request.channel is None:
        return
    if request.method != b"HEAD":
        request.write(body)
    request.finish()

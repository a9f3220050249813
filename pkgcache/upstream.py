"""
Fetching a file from the configured sources, with failover.

:class:`UpstreamClient` asks each source in turn for ``SOURCE + path`` and
hands back the first usable response; a source that refuses, times out or
answers 5xx is skipped for a while (:class:`SourceHealth`), so a dead mirror
costs its timeout once, not on every miss.  The body is then streamed chunk by
chunk through :meth:`UpstreamResponse.stream`, with an idle timer that a
stalled source cannot outlive.

Requests go through ``treq`` with ``unbuffered=True`` (treq otherwise holds
whole bodies in memory) over our own connection pool, and through
:class:`IdentityEncodingAgent`, because treq asks for gzip and decompresses:
a cache must store exactly the bytes the mirror stores.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from hyperlink import DecodedURL
from treq.client import HTTPClient
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from pkgcache import __version__
from pkgcache.metrics import Metrics
from pkgcache.paths import CacheKey

USER_AGENT = f"pkgcache/{__version__}".encode("ascii")

log = Logger()


class Source:
    """
    A base URL that files are fetched below: ``Source("https://m/gentoo/")``
    serves ``/distfiles/x`` from ``https://m/gentoo/distfiles/x``.
    """

    def __init__(self, text: str) -> None:
        """
        :raises ValueError: if ``text`` is not an absolute http(s) URL.
        """
        try:
            url = DecodedURL.from_text(text)
        except Exception as exc:
            raise ValueError(f"not a URL: {text!r} ({exc})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http:// or https:// URL: {text!r}")
        if url.query or url.fragment:
            raise ValueError(f"a source URL has no query or fragment: {text!r}")
        self.url = url
        self.text = text

    def url_for(self, key: CacheKey) -> str:
        """
        The URL of ``key`` on this source.

        Each segment is percent-encoded as one path segment, so a key can
        never reach another host or climb out of the source's base path.
        """
        base = self.url
        if base.path and base.path[-1] == "":
            # hyperlink's child() keeps an empty last segment: drop it so
            # "https://m/" and "https://m" both give "https://m/x".
            base = base.replace(path=base.path[:-1])
        return base.child(*key.segments).to_uri().to_text()

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Source({self.text!r})"


class FailureKind(enum.Enum):
    """
    Why a source did not give us the file; decides what we tell the client
    and whether the source is marked down.
    """

    NOT_FOUND = "not found"
    TIMEOUT = "timed out"
    CONNECTION = "connection failed"
    SERVER_ERROR = "server error"
    UNUSABLE = "unusable answer"

    @property
    def marks_source_down(self) -> bool:
        return self in (FailureKind.TIMEOUT, FailureKind.CONNECTION, FailureKind.SERVER_ERROR)


@dataclass(frozen=True)
class Attempt:
    """One source's failure to provide a file."""

    source: Source
    kind: FailureKind
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.kind.value} ({self.detail})"


class AllSourcesFailed(Exception):
    """
    No source provided the file.

    :ivar attempts: every source's failure, in the order tried.
    """

    def __init__(self, attempts: Sequence[Attempt]) -> None:
        super().__init__("; ".join(str(attempt) for attempt in attempts))
        self.attempts = list(attempts)

    @property
    def status(self) -> int:
        """
        The HTTP status for the client: 404 when every source said so,
        504 when every source timed out, else 502.
        """
        kinds = {attempt.kind for attempt in self.attempts}
        if kinds == {FailureKind.NOT_FOUND}:
            return http.NOT_FOUND
        if kinds == {FailureKind.TIMEOUT}:
            return http.GATEWAY_TIMEOUT
        return http.BAD_GATEWAY


class BodyFailed(Exception):
    """
    A response body ended before it was complete: the source closed early,
    stalled past the idle timeout, or sent the wrong number of bytes.
    """


class SourceHealth:
    """
    Which sources are believed down, and until when.

    A source that fails in a way that :attr:`FailureKind.marks_source_down`
    is skipped for ``initial_backoff`` seconds, doubling on each further
    failure up to ``max_backoff``; once that has passed it is tried again,
    and a success forgets its history.  A 404 says nothing about health.
    """

    def __init__(
        self,
        clock: IReactorTime,
        initial_backoff: float = 10.0,
        max_backoff: float = 600.0,
    ) -> None:
        self._clock = clock
        self._initial = initial_backoff
        self._max = max_backoff
        self._failures: dict[Source, int] = {}
        self._down_until: dict[Source, float] = {}

    def is_down(self, source: Source) -> bool:
        return self._down_until.get(source, 0.0) > self._clock.seconds()

    def record_failure(self, source: Source) -> float:
        """
        Mark ``source`` down.

        :return: how many seconds it will be skipped for.
        """
        failures = self._failures.get(source, 0) + 1
        self._failures[source] = failures
        backoff = min(self._initial * 2 ** min(failures - 1, 32), self._max)
        self._down_until[source] = self._clock.seconds() + backoff
        return backoff

    def record_success(self, source: Source) -> None:
        self._failures.pop(source, None)
        self._down_until.pop(source, None)

    def order(self, sources: Sequence[Source]) -> list[Source]:
        """
        The sources worth trying, in order: those not down, or all of them
        if every one is down (a guess beats a certain failure).
        """
        up = [source for source in sources if not self.is_down(source)]
        return up or list(sources)


@implementer(IAgent)
class IdentityEncodingAgent:
    """
    An agent that asks for, and hands back, the bytes as the server stores
    them.

    treq wraps every agent in a ``ContentDecoderAgent`` that asks for gzip
    and decompresses: we override its ``Accept-Encoding`` on the way out,
    and hide any ``Content-Encoding`` a server sends regardless (say, for a
    ``.tar.gz``) on the way back, so nothing is decoded.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(self, method, uri, headers=None, bodyProducer=None):
        headers = headers.copy() if headers is not None else Headers()
        headers.setRawHeaders(b"accept-encoding", [b"identity"])
        d = self._agent.request(method, uri, headers, bodyProducer)

        def keep_encoded(response):
            response.headers.removeHeader(b"content-encoding")
            return response

        return d.addCallback(keep_encoded)


class _IdleTimer:
    """
    Calls ``expire`` once nothing has happened for ``timeout`` seconds;
    ``touch`` means something happened.
    """

    def __init__(self, clock: IReactorTime, timeout: float, expire: Callable[[], None]):
        self._clock = clock
        self.timeout = timeout
        self._expire = expire
        self._call: Optional[IDelayedCall] = None
        self.expired = False

    def touch(self) -> None:
        if self._call is not None and self._call.active():
            self._call.reset(self.timeout)
        else:
            self._call = self._clock.callLater(self.timeout, self._fire)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        self.expired = True
        self._expire()


class _BodyReceiver(Protocol):
    """
    Passes each chunk of a response body on, and tells complete from cut.
    """

    def __init__(
        self,
        on_chunk: Callable[[bytes], None],
        expected_length: Optional[int],
        clock: IReactorTime,
        idle_timeout: float,
    ) -> None:
        self._on_chunk = on_chunk
        self._expected_length = expected_length
        self._received = 0
        self._idle = _IdleTimer(clock, idle_timeout, self._stalled)
        self._paused = False
        # Cancelling the wait (the download was given up) drops the connection.
        self.done: Deferred[None] = Deferred(lambda _: self.abort())

    def connectionMade(self) -> None:
        self._idle.touch()

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        if not self._paused:
            self._idle.touch()
        self._on_chunk(data)

    def connectionLost(self, reason: Failure) -> None:
        self._idle.stop()
        if self.done.called:
            return  # the wait was cancelled, which is what closed us
        if self._idle.expired:
            failure = BodyFailed(f"stalled: nothing received for {self._idle.timeout:g}s")
        elif not reason.check(ResponseDone):
            failure = BodyFailed(f"body cut short after {self._received} bytes: "
                                 f"{reason.getErrorMessage() or reason.type.__name__}")
        elif self._expected_length is not None and self._received != self._expected_length:
            failure = BodyFailed(
                f"{self._received} bytes received, {self._expected_length} announced"
            )
        else:
            self.done.callback(None)
            return
        self.done.errback(failure)

    def _stalled(self) -> None:
        self.transport.stopProducing()

    def pause(self) -> None:
        self._paused = True
        self._idle.stop()
        self.transport.pauseProducing()

    def resume(self) -> None:
        self._paused = False
        self._idle.touch()
        self.transport.resumeProducing()

    def abort(self) -> None:
        self.transport.stopProducing()


class _Discard(Protocol):
    """Closes an unwanted body's connection instead of reading it."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class UpstreamResponse:
    """
    A source's answer, headers received and body not yet read.

    :ivar offset: where the body starts in the file (non-zero on a resume).
    :ivar total_length: the whole file's length, when the source said.
    """

    def __init__(
        self, source: Source, response, method: bytes, offset: int, client: "UpstreamClient"
    ):
        self.source = source
        self.code: int = response.code
        self.headers: Headers = response.headers
        self.offset = offset
        self._response = response
        self._client = client
        self._receiver: Optional[_BodyReceiver] = None
        self.body_length: Optional[int] = _announced_length(response, method)
        self.total_length: Optional[int] = (
            None if self.body_length is None else offset + self.body_length
        )

    @property
    def content_type(self) -> Optional[bytes]:
        return self.headers.getRawHeaders(b"content-type", [None])[0]

    @property
    def last_modified(self) -> Optional[bytes]:
        return self.headers.getRawHeaders(b"last-modified", [None])[0]

    @property
    def last_modified_timestamp(self) -> Optional[float]:
        """``Last-Modified`` as seconds since the epoch, or ``None``."""
        if self.last_modified is None:
            return None
        try:
            return float(http.stringToDatetime(self.last_modified))
        except (ValueError, IndexError, KeyError):
            return None

    def stream(self, on_chunk: Callable[[bytes], None]) -> "Deferred[None]":
        """
        Deliver the body, chunk by chunk, to ``on_chunk``.

        :return: fires when the whole body arrived; fails with
            :class:`BodyFailed` if it was cut short or stalled.
        """
        self._receiver = _BodyReceiver(
            on_chunk, self.body_length, self._client.clock, self._client.idle_timeout
        )
        self._response.deliverBody(self._receiver)
        return self._receiver.done

    def pause(self) -> None:
        """Stop reading the body for now (the idle timer stops too)."""
        if self._receiver is not None:
            self._receiver.pause()

    def resume(self) -> None:
        if self._receiver is not None:
            self._receiver.resume()



class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """Twisted logs every connection's factory start and stop: one line per
    miss that says nothing."""

    noisy = False


def _announced_length(response, method: bytes) -> Optional[int]:
    """
    The body length a response announced: Twisted's client keeps
    Content-Length out of ``headers`` and in ``length``, except for a HEAD,
    whose ``length`` is 0 and whose Content-Length stays a header.
    """
    if method != b"HEAD":
        return response.length if isinstance(response.length, int) else None
    try:
        length = int(response.headers.getRawHeaders(b"content-length", [b""])[0])
    except ValueError:
        return None
    return length if length >= 0 else None


class UpstreamClient:
    """
    Fetches files from an ordered list of sources, failing over on error.

    :param sources: tried in this order.
    :param reactor: for connections and timers (a ``Clock`` cannot make
        connections, but the ``clock`` argument can replace the timers).
    :param http_client: a treq ``HTTPClient``; by default one over an
        :class:`IdentityEncodingAgent` and a pool of our own.
    :param connect_timeout: seconds to wait for a source to accept.
    :param idle_timeout: seconds a source may stay silent, before its
        headers or between two chunks of its body.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        reactor,
        *,
        http_client: Optional[HTTPClient] = None,
        clock: Optional[IReactorTime] = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        health: Optional[SourceHealth] = None,
        metrics: Optional[Metrics] = None,
    ) -> None:
        if not sources:
            raise ValueError("at least one source is needed")
        self.sources = list(sources)
        self.clock = clock if clock is not None else reactor
        self.idle_timeout = idle_timeout
        self.health = health if health is not None else SourceHealth(self.clock)
        self.metrics = metrics if metrics is not None else Metrics()
        self._pool: Optional[HTTPConnectionPool] = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor)
            self._pool._factory = _QuietHTTP11ClientFactory
            self._pool.maxPersistentPerHost = 4
            agent = Agent(reactor, connectTimeout=connect_timeout, pool=self._pool)
            http_client = HTTPClient(IdentityEncodingAgent(agent))
        self._http = http_client

    def close(self) -> "Deferred[None]":
        """Close idle connections to the sources (on shutdown)."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    async def fetch(
        self,
        key: CacheKey,
        *,
        method: bytes = b"GET",
        offset: int = 0,
        total_length: Optional[int] = None,
        after: Optional[Source] = None,
    ) -> UpstreamResponse:
        """
        Ask each source in turn for ``key`` until one answers usably.

        :param offset: with ``total_length``, resume: ask for
            ``bytes=offset-`` and accept only a 206 for exactly that range of
            a file of exactly that length.
        :param after: start with the source configured after this one,
            coming back round to it last (a resume prefers the next mirror);
            by default, the configured order.
        :raises AllSourcesFailed: if none did.
        """
        attempts: list[Attempt] = []
        if offset:
            self.metrics.failovers.inc()
        for source in self._ordered(after):
            if attempts:
                self.metrics.failovers.inc()
            try:
                response = await self._try(source, key, method, offset, total_length)
            except _SourceFailed as failed:
                attempt = Attempt(source, failed.kind, failed.detail)
                attempts.append(attempt)
                self._record_failure(attempt, key)
                continue
            if method == b"HEAD":
                # A GET's source has proved itself only once its body is in:
                # see report_body_complete.
                self.health.record_success(source)
            return response
        raise AllSourcesFailed(attempts)

    def report_body_complete(self, source: Source) -> None:
        """A whole body came from ``source``: forget its past failures."""
        self.health.record_success(source)

    def report_body_failure(self, source: Source, key: CacheKey, reason: str) -> None:
        """
        A body from ``source`` broke off: count it against the source.
        """
        self._record_failure(Attempt(source, FailureKind.CONNECTION, reason), key)

    def _ordered(self, after: Optional[Source]) -> Iterable[Source]:
        ordered = self.health.order(self.sources)
        if after is None or after not in self.sources:
            return ordered
        count, start = len(self.sources), self.sources.index(after) + 1
        return sorted(ordered, key=lambda source: (self.sources.index(source) - start) % count)

    def _record_failure(self, attempt: Attempt, key: CacheKey) -> None:
        if attempt.kind.marks_source_down:
            backoff = self.health.record_failure(attempt.source)
            log.warn(
                "source {source} failed for {path}: {kind} ({detail}); "
                "skipping it for {backoff:g}s",
                source=str(attempt.source), path=str(key), kind=attempt.kind.value,
                detail=attempt.detail, backoff=backoff,
            )
        else:
            log.info(
                "source {source} failed for {path}: {kind} ({detail})",
                source=str(attempt.source), path=str(key), kind=attempt.kind.value,
                detail=attempt.detail,
            )

    async def _try(
        self,
        source: Source,
        key: CacheKey,
        method: bytes,
        offset: int,
        total_length: Optional[int],
    ) -> UpstreamResponse:
        headers = {b"User-Agent": [USER_AGENT]}
        if offset:
            headers[b"Range"] = [b"bytes=%d-" % (offset,)]
        requesting = self._http.request(
            method.decode("ascii"), source.url_for(key), headers=headers, unbuffered=True
        )
        timer = _IdleTimer(self.clock, self.idle_timeout, requesting.cancel)
        timer.touch()
        try:
            response = await requesting
        except Exception as exc:
            if timer.expired:
                failed = _SourceFailed(
                    FailureKind.TIMEOUT, f"no answer within {self.idle_timeout:g}s"
                )
            elif _cancelled(exc):
                # Not the timer: our caller gave up (shutdown). Not the
                # source's fault, and no reason to try the next one.
                raise CancelledError() from None
            else:
                failed = _classify_request_error(exc)
            self.metrics.upstream_answered(
                str(source), "timeout" if failed.kind is FailureKind.TIMEOUT else "error"
            )
            raise failed from None
        finally:
            timer.stop()
        self.metrics.upstream_answered(str(source), str(response.code))
        upstream = UpstreamResponse(source, response, method, offset, self)
        problem = _check_response(upstream, offset, total_length)
        if problem is not None:
            response.deliverBody(_Discard())
            raise problem
        return upstream


class _SourceFailed(Exception):
    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _cancelled(exc: BaseException) -> bool:
    """
    Whether a request failed because its Deferred was cancelled: Twisted's
    client reports that as ``ResponseNeverReceived([CancelledError])``.
    """
    if isinstance(exc, CancelledError):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(reason.check(CancelledError) for reason in reasons)


def _classify_request_error(exc: BaseException) -> _SourceFailed:
    reasons = getattr(exc, "reasons", None) or [Failure(exc)]
    for reason in reasons:
        if reason.check(netError.TimeoutError):
            return _SourceFailed(FailureKind.TIMEOUT, "connect timed out")
    detail = ", ".join(
        reason.getErrorMessage() or reason.type.__name__ for reason in reasons
    )
    return _SourceFailed(FailureKind.CONNECTION, detail)


def _check_response(
    response: UpstreamResponse, offset: int, total_length: Optional[int]
) -> Optional[_SourceFailed]:
    """
    Why ``response`` cannot be used, or ``None`` if it can.
    """
    code = response.code
    if code in (http.NOT_FOUND, http.GONE):
        return _SourceFailed(FailureKind.NOT_FOUND, f"HTTP {code}")
    if code >= 500:
        return _SourceFailed(FailureKind.SERVER_ERROR, f"HTTP {code}")
    if not offset:
        if code != http.OK:
            return _SourceFailed(FailureKind.UNUSABLE, f"HTTP {code}")
        return None
    if code != http.PARTIAL_CONTENT:
        return _SourceFailed(FailureKind.UNUSABLE, f"HTTP {code} to a range request")
    if response.body_length is not None and response.body_length != total_length - offset:
        return _SourceFailed(
            FailureKind.UNUSABLE,
            f"a {response.body_length}-byte answer to a request for the last "
            f"{total_length - offset} bytes",
        )
    expected = b"bytes %d-%d/%d" % (offset, total_length - 1, total_length)
    content_range = response.headers.getRawHeaders(b"content-range", [b""])[0]
    if content_range != expected:
        return _SourceFailed(
            FailureKind.UNUSABLE,
            f"Content-Range {content_range.decode('latin-1')!r}, "
            f"wanted {expected.decode('ascii')!r}",
        )
    response.total_length = total_length
    return None

"""
Fetching a file from the configured sources, with failover.

:class:`UpstreamClient` asks every source in turn for ``SOURCE + path``, in
the order :class:`~pkgcache.sources.SourceHealth` gives (sources in back-off
last), and hands back the first usable response.  The body is then streamed
chunk by chunk through :meth:`UpstreamResponse.stream`, with an idle timer
that a stalled source cannot outlive and a size limit a body cannot pass.

Requests go through ``treq`` with ``unbuffered=True`` (treq otherwise holds
whole bodies in memory) and ``allow_redirects=False``, over an agent that
carries our own rules: :class:`~pkgcache.redirects.RedirectPolicyAgent`
(redirects only within the sources) and :class:`IdentityEncodingAgent`
(treq asks for gzip and decompresses: a cache must store exactly the bytes
the mirror stores).  The agent beneath is injected, so that tests can put
an in-memory one there.

With peers (``--peer``: sibling nodes behind the same load balancer), a
miss of an immutable file asks them first, with ``Cache-Control:
only-if-cached`` so that none of them fetches it for us: the file comes
from the first that has it in its cache, else from the sources.  Only a
peer's answer that says it is a hit of a pkgcache (its ``Cache-Status``),
whole (a ``Content-Length``) and not a redirect is taken: a mistyped
``--peer`` pointing at some other web server must not fill the cache.  A
peer that does not have the file (404, 504) is asked again next time;
one that fails in any other way (refused, silent for ``peer_timeout``,
a 5xx, a 508 when the peer is this very node, an answer that is not a
hit) sits out its back-off.  A peer is sent only this node's ``Via``: a
client's own would let anyone name a peer in it, and have it answer 508
and be skipped for everyone.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

from treq.client import HTTPClient
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from pkgcache import __version__
from pkgcache.cache_status import is_hit, says_loop
from pkgcache.metadata import EntryMetadata
from pkgcache.metrics import Metrics
from pkgcache.paths import CacheKey
from pkgcache.redirects import DiscardBody, RedirectPolicyAgent, RedirectRefused, allowed_origins
from pkgcache.sources import (
    AllSourcesFailed, Attempt, FailureKind, Peer, Source, SourceAnswer, SourceHealth,
)
from pkgcache.timers import IdleTimer
from pkgcache.via import LOOP_DETECTED, last_entry

USER_AGENT = f"pkgcache/{__version__}".encode("ascii")
#: A peer's answers that mean it does not have the file (a pkgcache asked
#: ``only-if-cached`` answers 504 for a file it would have to fetch).
NOT_IN_PEER = frozenset({http.NOT_FOUND, http.GONE, http.GATEWAY_TIMEOUT})
#: A peer's short answer is read to its end (its connection then kept)
#: if it is no longer than this.
SHORT_BODY = 4096

log = Logger()


class BodyFailed(Exception):
    """
    A response body ended before it was complete: the source closed early,
    stalled past the idle timeout, or sent the wrong number of bytes.  The
    rest may be had from another source.
    """


class BodyTooLarge(BodyFailed):
    """A body passed the size limit: no source is asked for the rest."""


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


class _BodyReceiver(Protocol):
    """
    Passes each chunk of a response body on, and tells complete from cut.

    :param limit: the most bytes the body may have.
    """

    def __init__(
        self,
        on_chunk: Callable[[bytes], None],
        expected_length: Optional[int],
        limit: Optional[int],
        clock: IReactorTime,
        idle_timeout: float,
    ) -> None:
        self._on_chunk = on_chunk
        self._expected_length = expected_length
        self._limit = limit
        self._received = 0
        self._idle = IdleTimer(clock, idle_timeout, self._stalled)
        self._too_large = False
        # Cancelling the wait (the download was given up) drops the connection.
        self.done: Deferred[None] = Deferred(lambda _: self.abort())

    def connectionMade(self) -> None:
        self._idle.touch()

    def dataReceived(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self._too_large = True
            self.abort()
            return
        if self._idle.running:
            self._idle.touch()
        self._on_chunk(data)

    def connectionLost(self, reason: Failure) -> None:
        self._idle.stop()
        if self.done.called:
            return  # the wait was cancelled, which is what closed us
        if self._too_large:
            failure: BodyFailed = BodyTooLarge(
                f"the body passed the size limit of {self._limit} bytes"
            )
        elif self._idle.expired:
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
        self._idle.stop()
        self.transport.pauseProducing()

    def resume(self) -> None:
        self._idle.touch()
        self.transport.resumeProducing()

    def abort(self) -> None:
        self.transport.stopProducing()


class _DropShortBody(Protocol):
    """
    Reads an unwanted short body to its end, for nothing, so that its
    keep-alive connection goes back to the pool (a peer's 504 comes with
    every miss it does not have); a long one, one of unknown length, or
    one that does not come within ``timeout``, closes its connection.
    """

    def __init__(self, clock: IReactorTime, timeout: float, length) -> None:
        self._short = isinstance(length, int) and length <= SHORT_BODY
        self._timer = IdleTimer(clock, timeout, self._give_up)

    def connectionMade(self) -> None:
        if self._short:
            self._timer.touch()
        else:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        self._timer.stop()

    def _give_up(self) -> None:
        self.transport.stopProducing()


class UpstreamResponse(SourceAnswer):
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

    def stream(self, on_chunk: Callable[[bytes], None]) -> "Deferred[None]":
        """
        Deliver the body, chunk by chunk, to ``on_chunk``.

        :return: fires when the whole body arrived; fails with
            :class:`BodyFailed` if it was cut short or stalled, and
            :class:`BodyTooLarge` if it passed the client's size limit.
        """
        limit = self._client.max_body_size
        self._receiver = _BodyReceiver(
            on_chunk,
            self.body_length,
            None if limit is None else limit - self.offset,
            self._client.clock,
            self._client.idle_timeout,
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


def network_agent(reactor, connect_timeout: float) -> tuple[IAgent, HTTPConnectionPool]:
    """
    An agent that reaches sources over the network, and the connection pool
    it keeps (to close on shutdown).
    """
    pool = HTTPConnectionPool(reactor)
    pool._factory = _QuietHTTP11ClientFactory
    pool.maxPersistentPerHost = 4
    return Agent(reactor, connectTimeout=connect_timeout, pool=pool), pool


class UpstreamClient:
    """
    Fetches files from an ordered list of sources, failing over on error.

    :param sources: tried in this order (those in back-off last).
    :param reactor: for connections and timers, when no ``agent`` is given.
    :param agent: reaches the sources (default: :func:`network_agent`);
        the redirect policy and identity encoding are added around it.
    :param clock: for the idle timer and the back-off (default: ``reactor``).
    :param connect_timeout: seconds to wait for a source to accept.
    :param idle_timeout: seconds a source may stay silent, before its
        headers or between two chunks of its body.
    :param max_body_size: refuse bodies larger than this many bytes.
    :param accept_by_representation: the ``Accept`` to send for a key of
        each representation (see :class:`~pkgcache.paths.CacheKey`).
    :param peers: sibling nodes, asked first (see the module).
    :param peer_timeout: seconds a peer may take to connect and send its
        headers (and the rest of a short "not here") before the sources
        are asked instead.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        reactor=None,
        *,
        agent: Optional[IAgent] = None,
        clock: Optional[IReactorTime] = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        max_body_size: Optional[int] = None,
        health: Optional[SourceHealth] = None,
        metrics: Optional[Metrics] = None,
        accept_by_representation: Optional[Mapping[str, bytes]] = None,
        peers: Sequence[Peer] = (),
        peer_timeout: float = 2.0,
    ) -> None:
        if not sources:
            raise ValueError("at least one source is needed")
        self.sources = list(sources)
        self.peers = list(peers)
        self.peer_timeout = peer_timeout
        self.clock = clock if clock is not None else reactor
        self.idle_timeout = idle_timeout
        self.max_body_size = max_body_size
        self.health = health if health is not None else SourceHealth(self.clock)
        self.metrics = metrics if metrics is not None else Metrics()
        self._accept = dict(accept_by_representation or {})
        self._pool: Optional[HTTPConnectionPool] = None
        if agent is None:
            agent, self._pool = network_agent(reactor, connect_timeout)
        # Peers are asked with no redirect followed: a pkgcache never
        # answers a file with one.
        self._peer_http = HTTPClient(IdentityEncodingAgent(agent))
        agent = RedirectPolicyAgent(agent, allowed_origins(source.url for source in self.sources))
        self._http = HTTPClient(IdentityEncodingAgent(agent))

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
        revalidating: Optional[EntryMetadata] = None,
        via: Optional[bytes] = None,
        peer_path: Optional[bytes] = None,
    ) -> UpstreamResponse:
        """
        Ask each source in turn for ``key`` until one answers usably.

        :param offset: with ``total_length``, resume: ask for
            ``bytes=offset-`` and accept only a 206 for exactly that range of
            a file of exactly that length.
        :param after: start with the source configured after this one,
            coming back round to it last (a resume prefers the next mirror);
            by default, the configured order.
        :param revalidating: what we know of a cached copy: the source it
            came from is asked first, with its validators (a 304 from it
            is a usable answer); the others are asked plainly.
        :param via: the ``Via`` header to send (see :mod:`pkgcache.via`).
        :param peer_path: the path a client asked this node for: the peers
            are asked for it first, for a whole file (not a revalidation,
            a resume or a HEAD), with this node's entry of ``via`` only.
        :raises AllSourcesFailed: if none did.
        """
        if peer_path is not None and method == b"GET" and not offset and revalidating is None:
            from_peer = await self._from_peers(key, peer_path, last_entry(via))
            if from_peer is not None:
                return from_peer
        attempts: list[Attempt] = []
        if offset:
            self.metrics.failovers.inc()
        producer = self._source_named(revalidating.source) if revalidating else None
        for source in self._ordered(after, first=producer):
            if attempts:
                self.metrics.failovers.inc()
            validators = revalidating if source is producer else None
            try:
                response = await self._try(
                    source, key, method, offset, total_length, validators, via
                )
            except _SourceFailed as failed:
                attempt = Attempt(source, failed.kind, failed.detail)
                attempts.append(attempt)
                self._record_failure(attempt, key)
                continue
            if method == b"HEAD" or response.not_modified:
                # A GET's source has proved itself only once its body is in:
                # see report_body_complete.
                self.health.record_success(source)
            return response
        raise AllSourcesFailed(attempts, len(self.sources))

    async def _from_peers(
        self, key: CacheKey, path: bytes, via: Optional[bytes]
    ) -> Optional[UpstreamResponse]:
        """The file from the first peer that has it cached, or ``None``."""
        for peer in self.peers:
            if self.health.is_down(peer):
                continue
            try:
                response = await self._try(
                    peer, key, b"GET", 0, None, via=via, url=peer.url_of_path(path)
                )
            except _SourceFailed as failed:
                if failed.kind is FailureKind.NOT_FOUND:
                    self.metrics.peer_answered(str(peer), "miss")
                    self.health.record_success(peer)  # it answered: it is up
                    log.debug("peer {peer} has no {path}", peer=str(peer), path=str(key))
                    continue
                self.metrics.peer_answered(str(peer), "error")
                detail = failed.detail
                if failed.kind is FailureKind.LOOP:
                    detail += ": it is this node, or a node with this one's --node-name"
                log.warn(
                    "peer {peer} failed for {path}: {kind} ({detail}); not asking it for {backoff:g}s",
                    peer=str(peer), path=str(key), kind=failed.kind.value, detail=detail,
                    backoff=self.health.record_failure(peer),
                )
                continue
            self.metrics.peer_answered(str(peer), "hit")
            return response
        return None

    def report_body_complete(self, source: Source) -> None:
        """A whole body came from ``source``: forget its past failures."""
        self.health.record_success(source)

    def report_body_failure(self, source: Source, key: CacheKey, reason: str) -> None:
        """
        A body from ``source`` broke off: count it against the source.
        """
        self._record_failure(Attempt(source, FailureKind.CONNECTION, reason), key)

    def _source_named(self, text: Optional[str]) -> Optional[Source]:
        return next((source for source in self.sources if source.text == text), None)

    def _ordered(self, after: Optional[Source], first: Optional[Source] = None) -> Iterable[Source]:
        sources = self.sources
        if after is not None and after in sources:
            start = sources.index(after) + 1
            sources = sources[start:] + sources[:start]
        ordered = self.health.order(sources)
        if first is not None and not self.health.is_down(first):
            ordered = [first] + [source for source in ordered if source is not first]
        return ordered

    def _record_failure(self, attempt: Attempt, key: CacheKey) -> None:
        fields = dict(
            role="peer" if isinstance(attempt.source, Peer) else "source",
            source=str(attempt.source), path=str(key), kind=attempt.kind.value,
            detail=attempt.detail,
        )
        if attempt.kind.marks_source_down:
            log.warn(
                "{role} {source} failed for {path}: {kind} ({detail}); "
                "asking it last for {backoff:g}s",
                backoff=self.health.record_failure(attempt.source), **fields,
            )
        else:
            log.info("{role} {source} failed for {path}: {kind} ({detail})", **fields)

    async def _try(
        self,
        source: Source,
        key: CacheKey,
        method: bytes,
        offset: int,
        total_length: Optional[int],
        validators: Optional[EntryMetadata] = None,
        via: Optional[bytes] = None,
        url: Optional[str] = None,
    ) -> UpstreamResponse:
        """
        One request to ``source`` (at ``url``, by default ``key``'s URL there).

        :raises _SourceFailed: if its answer cannot be used.
        """
        peer = isinstance(source, Peer)
        headers = {b"User-Agent": [USER_AGENT]}
        if via:
            headers[b"Via"] = [via]
        if peer:
            headers[b"Cache-Control"] = [b"only-if-cached"]
        client = self._peer_http if peer else self._http
        if key.representation:
            headers[b"Accept"] = [self._accept[key.representation]]
        if offset:
            headers[b"Range"] = [b"bytes=%d-" % (offset,)]
        if validators is not None and validators.etag is not None:
            headers[b"If-None-Match"] = [validators.etag]
        if validators is not None and validators.last_modified is not None:
            headers[b"If-Modified-Since"] = [validators.last_modified]
        requesting = client.request(
            method.decode("ascii"), url or source.url_for(key), headers=headers,
            unbuffered=True, allow_redirects=False,
        )
        timeout = self.peer_timeout if peer else self.idle_timeout
        timer = IdleTimer(self.clock, timeout, requesting.cancel)
        timer.touch()
        try:
            response = await requesting
        except Exception as exc:
            if timer.expired:
                failed = _SourceFailed(FailureKind.TIMEOUT, f"no answer within {timeout:g}s")
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
        conditional = b"If-None-Match" in headers or b"If-Modified-Since" in headers
        if conditional and upstream.not_modified:
            response.deliverBody(DiscardBody())
            return upstream
        if peer and response.code in NOT_IN_PEER:
            # The common answer of a peer: its connection is worth keeping.
            response.deliverBody(_DropShortBody(self.clock, self.peer_timeout, response.length))
            raise _SourceFailed(FailureKind.NOT_FOUND, f"not in its cache (HTTP {response.code})")
        problem = _check_response(upstream, offset, total_length, self.max_body_size)
        if problem is None and peer:
            problem = _check_peer_hit(upstream)
        if problem is not None:
            if method != b"HEAD":
                response.deliverBody(DiscardBody())
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
    if isinstance(exc, RedirectRefused):
        return _SourceFailed(FailureKind.REDIRECT_REFUSED, str(exc))
    reasons = getattr(exc, "reasons", None) or [Failure(exc)]
    for reason in reasons:
        if reason.check(netError.TimeoutError):
            return _SourceFailed(FailureKind.TIMEOUT, "connect timed out")
    detail = ", ".join(
        reason.getErrorMessage() or reason.type.__name__ for reason in reasons
    )
    return _SourceFailed(FailureKind.CONNECTION, detail)


def _check_peer_hit(response: UpstreamResponse) -> Optional[_SourceFailed]:
    """
    Why a peer's usable-looking answer is not to be taken, if it is not:
    it must be a pkgcache's hit, of a length it says.
    """
    cache_status = response.header_line(b"cache-status")
    if not is_hit(cache_status):
        return _SourceFailed(
            FailureKind.UNUSABLE,
            f"not a hit of a pkgcache (Cache-Status {cache_status!r})",
        )
    if response.body_length is None:
        return _SourceFailed(FailureKind.UNUSABLE, "no Content-Length")
    return None


def _check_response(
    response: UpstreamResponse,
    offset: int,
    total_length: Optional[int],
    max_body_size: Optional[int],
) -> Optional[_SourceFailed]:
    """
    Why ``response`` cannot be used, or ``None`` if it can.
    """
    code = response.code
    if code in (http.NOT_FOUND, http.GONE):
        return _SourceFailed(FailureKind.NOT_FOUND, f"HTTP {code}")
    if code == LOOP_DETECTED and says_loop(response.header_line(b"cache-status")):
        # (A 508 without the mark is some server's own: "resource limit".)
        return _SourceFailed(FailureKind.LOOP, f"HTTP {code}")
    if code >= 500:
        return _SourceFailed(FailureKind.SERVER_ERROR, f"HTTP {code}")
    if (
        max_body_size is not None
        and response.total_length is not None
        and response.total_length > max_body_size
    ):
        return _SourceFailed(
            FailureKind.TOO_LARGE,
            f"{response.total_length} bytes, over the limit of {max_body_size}",
        )
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

"""
The ``twisted.web`` resource that answers clients: a request is checked,
then answered as a hit (:mod:`pkgcache.hits`) or as a miss that follows a
shared :class:`~pkgcache.download.Download`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pkgcache.accesslog import AccessLog
from pkgcache.download import Downloads
from pkgcache.hits import serve_hit
from pkgcache.metadata import DEFAULT_CONTENT_TYPE
from pkgcache.metrics import Metrics
from pkgcache.outcomes import Outcome
from pkgcache.paths import CacheKey, UnsafePath, cache_key_from_postpath
from pkgcache.responses import Entity, failure_response, send_entity, send_error
from pkgcache.sources import AllSourcesFailed, Source
from pkgcache.store import CacheStore
from pkgcache.upstream import UpstreamClient

ALLOWED_METHODS = (b"GET", b"HEAD")

log = Logger()


@dataclass
class _RequestRecord:
    """What happened to one request, for its log line."""

    outcome: Outcome = Outcome.ERROR
    source: str = "-"
    started: float = 0.0


class PackageCacheResource(Resource):
    """
    A caching mirror of ``sources``, mountable anywhere in a site.

    ``GET /a/b`` (relative to where the resource is mounted) answers from
    ``cache_dir/a/b`` if it is there, else from ``SOURCE/a/b`` of the first
    source that has it, storing it as it streams.

    Making one does no I/O: :class:`~pkgcache.service.CacheService` opens
    its store (directories, sweep, disk threads) at start-up and closes it.

    :param sources: base URLs (or :class:`~pkgcache.sources.Source`), tried
        in this order.
    :param cache_dir: where files are kept; created at start-up if missing.
    :param reactor: the reactor (default: the global one).
    :param upstream: the client for sources (default: one built from
        ``sources``, the timeouts and ``max_file_size``).
    :param metrics: where to count requests (default: the upstream
        client's).
    :param access_log: where to write one combined-format line per request.
    :param client_stall_timeout: drop a client that has taken no data for
        this many seconds.
    :param max_file_size: refuse (502) files larger than this many bytes.
    :param max_downloads: fetch at most this many files from the sources at
        once; more misses wait, in order.
    :param store: the cache directory's store (default: one for
        ``cache_dir``), to share it or to run its disk work differently.
    """

    isLeaf = True

    def __init__(
        self,
        sources: Sequence[Union[str, Source]] = (),
        cache_dir: Union[str, FilePath] = "",
        *,
        reactor=None,
        upstream: Optional[UpstreamClient] = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        metrics: Optional[Metrics] = None,
        access_log: Optional[AccessLog] = None,
        client_stall_timeout: float = 300.0,
        max_file_size: Optional[int] = None,
        max_downloads: Optional[int] = None,
        store: Optional[CacheStore] = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        if not cache_dir and store is None:
            raise ValueError("a cache directory is needed")
        self._reactor = reactor
        self._access_log = access_log
        self._client_stall_timeout = client_stall_timeout
        if upstream is None:
            upstream = UpstreamClient(
                [s if isinstance(s, Source) else Source(s) for s in sources],
                reactor,
                connect_timeout=connect_timeout,
                idle_timeout=idle_timeout,
                max_body_size=max_file_size,
                metrics=metrics,
            )
        self.upstream = upstream
        self.metrics = metrics if metrics is not None else upstream.metrics
        if store is None:
            store = CacheStore(
                cache_dir if isinstance(cache_dir, FilePath) else FilePath(cache_dir), reactor
            )
        self.store = store
        self.downloads = Downloads(self.store, self.upstream, max_downloads)
        self.metrics.count_downloads(lambda: len(self.downloads), lambda: self.downloads.waiting)

    def close(self) -> "Deferred[None]":
        """
        Stop for good: give up downloads in progress (nothing partial is
        published), then stop the disk threads and close connections to
        the sources.  From then on requests get 503, and once the Deferred
        fires nothing more is written to the cache.
        """
        self.downloads.cancel_all()
        closing = DeferredList([self.store.close(), self.upstream.close()], consumeErrors=True)
        return closing.addCallback(lambda _: None)

    def render(self, request: Request):
        record = _RequestRecord(started=self._reactor.seconds())
        request.notifyFinish().addBoth(self._request_done, request, record)
        try:
            self._answer(request, record)
        except Exception:
            log.failure("error answering {path}", path=request.path)
            record.outcome = Outcome.ERROR
            if not request.startedWriting:
                send_error(request, http.INTERNAL_SERVER_ERROR, "internal error")
            elif not request.finished:
                request.transport.abortConnection()
        return NOT_DONE_YET

    def _answer(self, request: Request, record: _RequestRecord) -> None:
        if not self.store.running:
            # Not started (see CacheService), or closed.
            return send_error(request, http.SERVICE_UNAVAILABLE, "the cache is not running")
        if request.method not in ALLOWED_METHODS:
            request.setHeader(b"allow", b", ".join(ALLOWED_METHODS))
            return send_error(request, http.NOT_ALLOWED, "only GET and HEAD are supported")
        if not request.uri.startswith(b"/"):
            # An absolute-form request, as sent to a forward proxy: we are not one.
            return send_error(request, http.BAD_REQUEST, "not a proxy: ask for a path")
        try:
            key = cache_key_from_postpath(request.postpath)
        except UnsafePath as unsafe:
            return send_error(request, unsafe.status, unsafe.reason)
        try:
            cached = self.store.open_file(key)
        except IsADirectoryError:
            return send_error(request, http.NOT_FOUND, "directories are not served")
        if cached is not None:
            record.outcome = Outcome.HIT
            return serve_hit(
                request, cached, clock=self._reactor, stall_timeout=self._client_stall_timeout
            )
        miss = self._head_miss if request.method == b"HEAD" else self._get_miss
        Deferred.fromCoroutine(miss(request, key, record)).addErrback(
            self._unexpected, request, record
        )

    async def _get_miss(self, request: Request, key: CacheKey, record: _RequestRecord) -> None:
        client_gone = _watch_disconnect(request)
        download, joined = self.downloads.join_or_start(key)
        record.outcome = Outcome.COALESCED if joined else Outcome.MISS
        try:
            response = await download.when_headers_known()
        except (AllSourcesFailed, CancelledError) as failed:
            record.outcome = Outcome.ERROR
            return send_error(request, *failure_response(failed))
        record.source = str(response.source)
        if client_gone:
            return
        entity = Entity(
            download.length,
            download.last_modified,
            response.content_type or DEFAULT_CONTENT_TYPE,
        )
        producer = send_entity(
            request, entity, download,
            clock=self._reactor, stall_timeout=self._client_stall_timeout, label=str(key),
        )
        if producer is not None:
            producer.start()

    async def _head_miss(self, request: Request, key: CacheKey, record: _RequestRecord) -> None:
        """
        Answer HEAD from the download in progress, or from a HEAD to the
        sources: either way, nothing is cached.
        """
        client_gone = _watch_disconnect(request)
        record.outcome = Outcome.MISS
        download = self.downloads.in_flight(key)
        if download is not None and download.response is not None:
            response, last_modified = download.response, download.last_modified
        else:
            try:
                response = await self.upstream.fetch(key, method=b"HEAD")
            except AllSourcesFailed as failed:
                record.outcome = Outcome.ERROR
                return send_error(request, *failure_response(failed))
            last_modified = response.last_modified or self._reactor.seconds()
        record.source = str(response.source)
        if client_gone:
            return
        entity = Entity(
            response.total_length, last_modified, response.content_type or DEFAULT_CONTENT_TYPE
        )
        send_entity(
            request, entity, download,
            clock=self._reactor, stall_timeout=self._client_stall_timeout, label=str(key),
        )

    def _unexpected(self, failure: Failure, request: Request, record: _RequestRecord) -> None:
        log.failure("error answering {path}", failure, path=request.path)
        record.outcome = Outcome.ERROR
        if request.producer is not None:
            request.unregisterProducer()
        if not request.startedWriting:
            send_error(request, http.INTERNAL_SERVER_ERROR, "internal error")
        elif not request.finished and request.channel is not None:
            request.transport.abortConnection()

    def _request_done(self, result, request: Request, record: _RequestRecord) -> None:
        dropped = isinstance(result, Failure)
        if request.code >= 500:
            # However it began, a request answered 5xx (a download that
            # failed before its first byte) is an error.
            record.outcome = Outcome.ERROR
        log.info(
            "{method} {path} {outcome} {status} {bytes} bytes {duration:.3f}s "
            "source={source}{dropped}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            outcome=record.outcome.value,
            status=request.code,
            bytes=request.sentLength,
            duration=self._reactor.seconds() - record.started,
            source=record.source,
            dropped=" (connection dropped)" if dropped else "",
        )
        self.metrics.request_finished(record.outcome, request.sentLength)
        if self._access_log is not None:
            self._access_log.record(request, record.outcome, dropped)


def _watch_disconnect(request: Request) -> list:
    """
    A list that becomes non-empty (so, true) once the client disconnects:
    ``notifyFinish`` must be asked before the disconnect to hear of it.
    """
    gone: list = []
    request.notifyFinish().addErrback(lambda failure: gone.append(failure))
    return gone

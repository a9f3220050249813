"""
The ``twisted.web`` resource that answers clients: hits from disk, misses
through a shared :class:`~pkgcache.download.Download`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web import http, static
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pkgcache.accesslog import AccessLog
from pkgcache.download import Download, Downloads
from pkgcache.metrics import Metrics
from pkgcache.paths import CacheKey, UnsafePath, cache_key_from_postpath
from pkgcache.reader import DownloadReader
from pkgcache.store import CacheStore
from pkgcache.upstream import AllSourcesFailed, Source, UpstreamClient, UpstreamResponse

ALLOWED_METHODS = (b"GET", b"HEAD")
_SINGLE_RANGE = re.compile(rb"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")

log = Logger()


class CachedFile(static.File):
    """
    A published file, served by ``static.File`` (Range, HEAD, conditional
    GET, a producer that reads 64 KiB at a time), but with no
    ``Content-Encoding`` guessed from the name: a ``.tar.gz`` is a file to
    store, not a compressed ``.tar`` for the client to unpack.
    """

    contentEncodings: dict = {}

    def __init__(self, path: str) -> None:
        super().__init__(path, defaultType="application/octet-stream")


@dataclass
class Outcome:
    """What happened to one request, for its log line."""

    kind: str = "error"
    source: str = "-"
    started: float = 0.0


class PackageCacheResource(Resource):
    """
    A caching mirror of ``sources``, mountable anywhere in a site.

    ``GET /a/b`` (relative to where the resource is mounted) answers from
    ``cache_dir/a/b`` if it is there, else from ``SOURCE/a/b`` of the first
    source that has it, storing it as it streams.

    :param sources: base URLs (or :class:`Source`), tried in this order.
    :param cache_dir: where files are kept; created if missing.
    :param reactor: the reactor (default: the global one).
    :param upstream: the client for sources (default: one built from
        ``sources`` and the timeouts).
    :param metrics: where to count requests (default: the upstream
        client's).
    :param access_log: where to write one combined-format line per request.
    :param client_stall_timeout: drop a client of a download that has taken
        no data for this many seconds.
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
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        if not cache_dir:
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
                metrics=metrics,
            )
        self.upstream = upstream
        self.metrics = metrics if metrics is not None else upstream.metrics
        if not isinstance(cache_dir, FilePath):
            cache_dir = FilePath(cache_dir)
        self.store = CacheStore(cache_dir, reactor)
        self.store.create()
        self.store.sweep_stale_spools()
        self.downloads = Downloads(self.store, self.upstream)
        self.metrics.count_in_flight(lambda: len(self.downloads))

    def close(self) -> "Deferred[None]":
        """Give up downloads in progress and close connections to sources."""
        self.downloads.cancel_all()
        self.store.close()
        return self.upstream.close()

    def render(self, request: Request):
        outcome = Outcome(started=self._reactor.seconds())
        request.notifyFinish().addBoth(self._request_done, request, outcome)
        if request.method not in ALLOWED_METHODS:
            request.setHeader(b"allow", b", ".join(ALLOWED_METHODS))
            return _error(request, http.NOT_ALLOWED, "only GET and HEAD are supported")
        if not request.uri.startswith(b"/"):
            # An absolute-form request, as sent to a forward proxy: we are not one.
            return _error(request, http.BAD_REQUEST, "not a proxy: ask for a path")
        try:
            key = cache_key_from_postpath(request.postpath)
        except UnsafePath as unsafe:
            return _error(request, unsafe.status, unsafe.reason)
        path = self.store.lookup(key)
        if path is not None:
            outcome.kind = "hit"
            self.store.record_access(path)
            return CachedFile(path.path).render(request)
        if self.store.is_directory(key):
            return _error(request, http.NOT_FOUND, "directories are not served")
        if request.method == b"HEAD":
            serving = self._head_miss(request, key, outcome)
        else:
            serving = self._get_miss(request, key, outcome)
        Deferred.fromCoroutine(serving).addErrback(self._unexpected, request, outcome)
        return NOT_DONE_YET

    async def _get_miss(self, request: Request, key: CacheKey, outcome: Outcome) -> None:
        client_gone = _watch_disconnect(request)
        download, joined = self.downloads.join_or_start(key)
        outcome.kind = "coalesced" if joined else "miss"
        try:
            response = await download.when_headers_known()
        except AllSourcesFailed as failed:
            _source_failure(request, failed, outcome)
            return
        except CancelledError:
            outcome.kind = "error"
            _error(request, http.SERVICE_UNAVAILABLE, "shutting down", finish=True)
            return
        outcome.source = str(response.source)
        if client_gone:
            return
        start, end = _respond_headers(request, download, response)
        if request.code == http.REQUESTED_RANGE_NOT_SATISFIABLE:
            request.finish()
            return
        DownloadReader(
            download, request, start, end,
            clock=self._reactor, stall_timeout=self._client_stall_timeout,
        ).begin()

    async def _head_miss(self, request: Request, key: CacheKey, outcome: Outcome) -> None:
        """
        Answer HEAD from the download in progress, or from a HEAD to the
        sources: either way, nothing is cached.
        """
        client_gone = _watch_disconnect(request)
        download = self.downloads.in_flight(key)
        outcome.kind = "miss"
        if download is not None and download.response is not None:
            response = download.response
        else:
            try:
                response = await self.upstream.fetch(key, method=b"HEAD")
            except AllSourcesFailed as failed:
                _source_failure(request, failed, outcome)
                return
        outcome.source = str(response.source)
        if client_gone:
            return
        _set_entity_headers(request, response, response.total_length)
        request.finish()

    def _unexpected(self, failure: Failure, request: Request, outcome: Outcome) -> None:
        log.failure("error answering {path}", failure, path=request.path)
        outcome.kind = "error"
        if request.producer is not None:
            request.unregisterProducer()
        if not request.startedWriting:
            _error(request, http.INTERNAL_SERVER_ERROR, "internal error", finish=True)
        else:
            request.transport.abortConnection()

    def _request_done(self, result, request: Request, outcome: Outcome) -> None:
        dropped = isinstance(result, Failure)
        log.info(
            "{method} {path} {outcome} {status} {bytes} bytes {duration:.3f}s "
            "source={source}{dropped}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            outcome=outcome.kind,
            status=request.code,
            bytes=request.sentLength,
            duration=self._reactor.seconds() - outcome.started,
            source=outcome.source,
            dropped=" (connection dropped)" if dropped else "",
        )
        self.metrics.request_finished(outcome.kind, request.sentLength)
        if self._access_log is not None:
            self._access_log.record(request, outcome.kind, dropped)


def _watch_disconnect(request: Request) -> list:
    """
    A list that becomes non-empty (so, true) once the client disconnects:
    ``notifyFinish`` must be asked before the disconnect to hear of it.
    """
    gone: list = []
    request.notifyFinish().addErrback(lambda failure: gone.append(failure))
    return gone


def _respond_headers(
    request: Request, download: Download, response: UpstreamResponse
) -> tuple[int, Optional[int]]:
    """
    Set the status and headers of a miss.

    :return: the byte range of the file to send, end exclusive (``None``:
        to the end, whatever its length).
    """
    length = download.length
    requested = _parse_single_range(request.getHeader(b"range"), length)
    if requested is None:
        _set_entity_headers(request, response, length)
        return 0, None
    if requested == "unsatisfiable":
        request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
        request.setHeader(b"content-range", b"bytes */%d" % (length,))
        request.setHeader(b"content-length", b"0")
        return 0, 0
    start, end = requested
    request.setResponseCode(http.PARTIAL_CONTENT)
    _set_entity_headers(request, response, end - start)
    request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end - 1, length))
    return start, end


def _set_entity_headers(request: Request, response: UpstreamResponse, length: Optional[int]):
    request.setHeader(b"content-type", response.content_type or b"application/octet-stream")
    if response.last_modified is not None:
        request.setHeader(b"last-modified", response.last_modified)
    if length is not None:
        request.setHeader(b"content-length", b"%d" % (length,))
    if response.total_length is not None:
        request.setHeader(b"accept-ranges", b"bytes")


def _parse_single_range(header: Optional[bytes], length: Optional[int]):
    """
    A ``Range`` header we can answer on a miss, as ``(start, end)`` (end
    exclusive), or ``"unsatisfiable"``, or ``None`` to send the whole file:
    for no header, for several ranges, for anything unparsable, or when the
    length is unknown (a server may always ignore ``Range``).
    """
    if header is None or not length:
        # No header; or an unknown length, or an empty file, which no range
        # can be part of: send it all (a server may always ignore Range).
        return None
    match = _SINGLE_RANGE.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        return max(length - suffix, 0), length
    start = int(first)
    end = min(int(last) + 1, length) if last else length
    if last and int(last) < start:
        return None
    if start >= length:
        return "unsatisfiable"
    return start, end


def _source_failure(request: Request, failed: AllSourcesFailed, outcome: Outcome) -> None:
    outcome.kind = "error"
    _error(request, failed.status, f"no source provided this file:\n{failed}", finish=True)


def _error(request: Request, status: int, message: str, finish: bool = False) -> bytes:
    """
    A short plain-text error response; ``finish`` it ourselves when
    answering after ``render`` has returned.
    """
    body = (message + "\n").encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    if request.method == b"HEAD":
        body = b""
    if not finish:
        return body
    if not request.finished and request.channel is not None:
        request.write(body)
        request.finish()
    return b""

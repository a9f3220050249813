"""
The ``twisted.web`` resource that answers clients: a request is checked,
then answered as a hit (:mod:`pkgcache.hits`) or as a miss that follows a
shared :class:`~pkgcache.download.Download`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote
from typing import Optional, Sequence, Union

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pkgcache.accesslog import AccessLog
from pkgcache.cache_status import LOOP_DETAIL, cache_name, entry
from pkgcache.download import Download, Downloads
from pkgcache.freshness import (
    DEFAULT_MAX_AGE, DEFAULT_NEGATIVE_MAX_AGE, DEFAULT_STALE_IF_ERROR, Freshness,
)
from pkgcache.hits import serve_document, serve_hit
from pkgcache.interfaces import IDocumentRewriter
from pkgcache.kinds.debian import ReleaseTracker, is_release_file
from pkgcache.metadata import DEFAULT_CONTENT_TYPE
from pkgcache.metrics import Metrics
from pkgcache.outcomes import Outcome
from pkgcache.paths import CacheKey, UnsafePath, cache_key_from_postpath
from pkgcache.responses import Entity, failure_response, send_entity, send_error
from pkgcache.sources import AllSourcesFailed, Peer, Source
from pkgcache.store import CachedFile, CacheStore
from pkgcache.upstream import UpstreamClient, UpstreamResponse
from pkgcache.via import LOOP_DETECTED, default_node_name, extended, passed

ALLOWED_METHODS = (b"GET", b"HEAD")
#: The largest document rewritten (the biggest PyPI pages and npm
#: documents are tens of MiB); it is read whole to be rewritten.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
#: A ``Host`` header that may go into a link: a name or address, a port.
_HOST = re.compile(rb"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")

log = Logger()


@dataclass(frozen=True)
class _Revalidation:
    """
    A stale (or client-refused) copy to check with its source.

    :ivar forced: the copy was fresh; the client's ``Cache-Control`` asked.
    :ivar conditional: send its validators (not for a copy known wrong).
    """

    copy: CachedFile
    forced: bool
    conditional: bool


@dataclass
class _RequestRecord:
    """What happened to one request, for its log line."""

    outcome: Outcome = Outcome.ERROR
    #: a 5xx that is the answer asked for, not a failure: only-if-cached's
    #: 504 (a sibling's probe) is a miss
    status_asked_for: bool = False
    source: str = "-"
    #: when it began, if its line is logged (see ``log_requests``)
    started: float = 0.0


def _cache_control(request: Request) -> dict[bytes, bytes]:
    """The request's ``Cache-Control`` directives, by lower-case name (values as sent)."""
    header = request.getHeader(b"cache-control")
    if header is None:
        return {}
    directives = {}
    for directive in header.split(b","):
        name, _, value = directive.strip().partition(b"=")
        directives.setdefault(name.lower(), value)
    return directives


def _client_max_age(request: Request) -> Optional[float]:
    """
    How old a copy the client accepts, by its ``Cache-Control``
    (``no-cache`` is 0; ``Pragma: no-cache`` too, for HTTP/1.0 clients);
    ``None`` if it did not say.
    """
    directives = _cache_control(request)
    if not directives:
        return 0.0 if request.getHeader(b"pragma") == b"no-cache" else None
    if b"no-cache" in directives:
        return 0.0
    if b"max-age" not in directives:
        return None
    try:
        return float(min(int(directives[b"max-age"].strip(b'"')), 2**31))
    except ValueError:
        return 0.0


def _only_if_cached(request: Request) -> bool:
    """The client wants a stored answer or none (a sibling cache asking: issue 9's peers)."""
    return b"only-if-cached" in _cache_control(request)


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
    :param log_requests: log a line per request with ``twisted.logger``
        too (method, path, outcome, status, bytes, duration, source):
        formatting it costs a hit about a quarter of its time, so it is
        off unless asked for.
    :param client_stall_timeout: drop a client that has taken no data for
        this many seconds.
    :param max_file_size: refuse (502) files larger than this many bytes.
    :param max_downloads: fetch at most this many files from the sources at
        once; more misses wait, in order.
    :param store: the cache directory's store (default: one for
        ``cache_dir``), to share it or to run its disk work differently.
    :param volatile: more patterns of files that change in place (see
        :class:`~pkgcache.freshness.Freshness`, as are the ages and
        ``min_revalidation_interval``).
    :param clock: tells the time for freshness (default: ``reactor``).
    :param kind: the kind of repository, which chooses the built-in
        volatile rules (see :data:`~pkgcache.freshness.VOLATILE_BY_KIND`).
    :param name: the mirror's name, for its metrics' ``mirror`` label.
    :param rewriter: the kind's documents, rewritten as they are served
        (a PyPI mirror's pages, an npm mirror's package documents).
    :param public_url: the URL clients reach pkgcache by (behind a load
        balancer), for links that must be absolute; else each request's
        own ``Host``.
    :param node_name: this node's name in ``Via`` (a token; by default the
        host's name): a request that already passed it is refused (508).
    :param peers: sibling nodes with the same mirrors, asked for a miss
        before the sources (see :mod:`pkgcache.upstream`), each within
        ``peer_timeout`` seconds.
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
        log_requests: bool = False,
        client_stall_timeout: float = 300.0,
        max_file_size: Optional[int] = None,
        max_downloads: Optional[int] = None,
        store: Optional[CacheStore] = None,
        volatile: Sequence[str] = (),
        volatile_max_age: float = DEFAULT_MAX_AGE,
        negative_max_age: float = DEFAULT_NEGATIVE_MAX_AGE,
        min_revalidation_interval: float = 0.0,
        stale_if_error: float = DEFAULT_STALE_IF_ERROR,
        clock=None,
        kind: str = "generic",
        name: str = "",
        rewriter: Optional[IDocumentRewriter] = None,
        public_url: Optional[str] = None,
        node_name: Optional[str] = None,
        peers: Sequence[Union[str, Peer]] = (),
        peer_timeout: float = 2.0,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        if not cache_dir and store is None:
            raise ValueError("a cache directory is needed")
        self._reactor = reactor
        self.name = name
        self.node = (node_name or default_node_name()).encode("ascii")
        self._served_via = extended(None, self.node)
        self._status_name = cache_name(self.node)
        #: The ``Cache-Status`` of an immutable hit, the most common answer.
        self._immutable_hit = entry(self._status_name, "hit")
        self._rewriter = rewriter
        self._public_url = public_url
        self._access_log = access_log
        self._log_requests = log_requests
        self._client_stall_timeout = client_stall_timeout
        if upstream is None:
            upstream = UpstreamClient(
                [s if isinstance(s, Source) else Source(s) for s in sources],
                reactor,
                connect_timeout=connect_timeout,
                idle_timeout=idle_timeout,
                max_body_size=max_file_size,
                metrics=metrics,
                accept_by_representation=rewriter.accept_by_representation if rewriter else None,
                peers=[p if isinstance(p, Peer) else Peer(p) for p in peers],
                peer_timeout=peer_timeout,
            )
        self.upstream = upstream
        self.metrics = metrics if metrics is not None else upstream.metrics
        if store is None:
            store = CacheStore(
                cache_dir if isinstance(cache_dir, FilePath) else FilePath(cache_dir), reactor
            )
        self.store = store
        self.freshness = Freshness(
            volatile,
            max_age=volatile_max_age,
            min_revalidation_interval=min_revalidation_interval,
            negative_max_age=negative_max_age,
            stale_if_error=stale_if_error,
            clock=clock if clock is not None else reactor,
            kind=kind,
        )
        self.releases = ReleaseTracker(store, self._revalidate_now)
        self.downloads = Downloads(
            self.store, self.upstream, max_downloads,
            clock=self.freshness.clock, check=self.releases,
        )
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
        record = _RequestRecord()
        if self._log_requests:
            record.started = self._reactor.seconds()
        request.notifyFinish().addBoth(self._request_done, request, record)
        try:
            self._answer(request, record)
        except Exception:
            self._unexpected(Failure(), request, record)
        return NOT_DONE_YET

    def _answer(self, request: Request, record: _RequestRecord) -> None:
        if not self.store.running:
            # Not started (see CacheService), or closed.
            return send_error(request, http.SERVICE_UNAVAILABLE, "the cache is not running")
        if passed(_incoming_via(request), self.node):
            self._cache_status(request, LOOP_DETAIL)
            return send_error(
                request, LOOP_DETECTED,
                f"loop detected: this request already passed through {self.node.decode()}",
            )
        request.setHeader(b"via", self._served_via)
        if request.method not in ALLOWED_METHODS:
            request.setHeader(b"allow", b", ".join(ALLOWED_METHODS))
            return send_error(request, http.NOT_ALLOWED, "only GET and HEAD are supported")
        if not request.uri.startswith(b"/"):
            # An absolute-form request, as sent to a forward proxy: we are not one.
            return send_error(request, http.BAD_REQUEST, "not a proxy: ask for a path")
        try:
            if self._rewriter is None:
                key = cache_key_from_postpath(request.postpath)
            else:
                key = self._rewriter.key_for(request.postpath)
        except UnsafePath as unsafe:
            return send_error(request, unsafe.status, unsafe.reason)
        if self._rewrites(key):
            location = self._rewriter.redirect(key)
            if location is not None:
                request.setHeader(b"location", location)
                return send_error(request, http.MOVED_PERMANENTLY, "see the normalised name")
            request.setHeader(b"vary", b"Accept")
            key = self._rewriter.representation(key, request.getHeader(b"accept"))
        volatile = self.freshness.is_volatile(key)
        try:
            cached = self.store.open_file(key, keep=not volatile)
        except IsADirectoryError:
            return send_error(request, http.NOT_FOUND, "directories are not served")
        if cached is not None and not volatile:
            record.outcome = Outcome.HIT
            request.setHeader(b"cache-status", self._immutable_hit)
            return serve_hit(
                request, cached, clock=self._reactor, stall_timeout=self._client_stall_timeout
            )
        if cached is not None:
            return self._answer_volatile(request, key, record, cached)
        if key in self.freshness.negative:
            # Whatever the client's Cache-Control: apt and pip send max-age=0
            # with every index request.
            record.outcome = Outcome.NEGATIVE
            self.metrics.negative_hit(self.name)
            self._cache_status(request, "hit", "detail=negative")
            return send_error(request, http.NOT_FOUND, "no source has this file (remembered)")
        self._miss(request, key, record, volatile, None)

    def _answer_volatile(
        self, request: Request, key: CacheKey, record: _RequestRecord, cached: CachedFile
    ) -> None:
        """A cached volatile file: served while fresh, else revalidated."""
        try:
            metadata = cached.metadata
            consistent = self.releases.is_consistent(key, metadata)
            fresh = consistent and self.freshness.is_fresh(metadata)
            client_max_age = _client_max_age(request)
            fresh_for_client = fresh and self.freshness.is_fresh(metadata, client_max_age)
        except BaseException:
            cached.close()
            raise
        if fresh_for_client:
            record.outcome = Outcome.HIT
            self._cache_status(request, "hit", f"ttl={self.freshness.ttl(metadata)}")
            return self._serve_copy(request, key, cached)
        if consistent and key in self.freshness.unreachable and (
            self.freshness.may_serve_stale(metadata)
        ):
            return self._serve_stale(request, key, cached, record)
        # A copy its suite's index says is wrong is fetched afresh: its
        # source, if it lags, would confirm it with a 304.
        self._miss(request, key, record, True, _Revalidation(cached, fresh, consistent))

    def _miss(
        self,
        request: Request,
        key: CacheKey,
        record: _RequestRecord,
        volatile: bool,
        revalidation: Optional["_Revalidation"],
    ) -> None:
        if _only_if_cached(request):
            # Nothing fresh stored, and the client said not to fetch it.
            if revalidation is not None:
                revalidation.copy.close()
            record.outcome = Outcome.MISS
            record.status_asked_for = True
            self._cache_status(request, "detail=only-if-cached")
            return send_error(request, http.GATEWAY_TIMEOUT, "not in this cache (only-if-cached)")
        if request.method == b"HEAD" and revalidation is None and not self._rewrites(key):
            # (A rewritten document's length is known only once it is.)
            answering = self._head_miss(request, key, record)
        else:
            answering = self._get_miss(request, key, record, volatile, revalidation)
        Deferred.fromCoroutine(answering).addErrback(self._unexpected, request, record)

    def _serve_copy(self, request: Request, key: CacheKey, cached: CachedFile) -> None:
        """Serve a cached copy: as it is, or rewritten (see ``rewriter``)."""
        if not self._rewrites(key):
            return serve_hit(
                request, cached, clock=self._reactor, stall_timeout=self._client_stall_timeout
            )
        try:
            if cached.size > MAX_DOCUMENT_BYTES:
                return send_error(request, http.BAD_GATEWAY, "the document is too large to rewrite")
            base = tree_url(request, self._public_url)
            if base is None:
                return send_error(request, http.BAD_REQUEST, "a Host header (or --public-url) is needed")
            document = cached.read(0, cached.size)
            content_type = cached.metadata.content_type
            body = self._rewriter.rewrite(key, document, content_type, base)
        finally:
            cached.close()
        serve_document(
            request, body, cached.mtime, content_type or DEFAULT_CONTENT_TYPE,
            clock=self._reactor, stall_timeout=self._client_stall_timeout,
        )

    async def _get_miss(
        self,
        request: Request,
        key: CacheKey,
        record: _RequestRecord,
        volatile: bool,
        revalidation: Optional["_Revalidation"],
    ) -> None:
        """Answer from the download of ``key``: a miss, or a revalidation."""
        client_gone = _watch_disconnect(request)
        stale = revalidation.copy if revalidation is not None else None
        download, joined = self.downloads.join_or_start(
            key,
            revalidating=stale,
            conditional=revalidation is None or revalidation.conditional,
            volatile=volatile,
            via=extended(_incoming_via(request), self.node),
            peer_path=self._peer_path(request, key, volatile, revalidation),
        )
        if revalidation is None:
            forwarded = "fwd=miss"
        else:
            forwarded = "fwd=request" if revalidation.forced else "fwd=stale"
        record.outcome = Outcome.COALESCED if joined else Outcome.MISS
        try:
            response = await download.when_headers_known()
        except CancelledError as failed:
            record.outcome = Outcome.ERROR
            return send_error(request, *failure_response(failed))
        except AllSourcesFailed as failed:
            self._sources_failed(key, failed, revalidation=stale is not None, counted=not joined)
            if client_gone:
                return
            if stale is not None and not failed.not_found:
                copy = self.store.open_file(key)
                if copy is not None and self.freshness.may_serve_stale(copy.metadata):
                    return self._serve_stale(request, key, copy, record)
                if copy is not None:
                    copy.close()
            record.outcome = Outcome.ERROR
            self._cache_status(request, forwarded, *_failure_detail(failed))
            return send_error(request, *failure_response(failed))
        record.source = str(response.source)
        self.freshness.unreachable.forget(key)
        if response.not_modified:
            if not joined:
                self.metrics.revalidated(self.name, "not-modified")
            record.outcome = Outcome.REVALIDATED
            if client_gone:
                return
            self._cache_status(request, forwarded, "fwd-status=304")
            return self._answer_from_store(request, key)
        if stale is not None and not joined:
            self.metrics.revalidated(self.name, "modified")
        if is_release_file(str(key)) or self._rewrites(key):
            # Answered from the store once complete: a Debian release is
            # checked first (an older one than ours is refused, the indexes
            # it lists are checked: kinds.debian), a PyPI page is rewritten
            # as it is served (kinds.pypi).
            await download.finished
            if client_gone:
                return
            kept = [] if download.published else ["detail=not-stored"]
            if kept and stale is not None:
                # Refused (older than the copy): the copy is the answer.
                record.outcome = Outcome.REVALIDATED
            self._forwarded(request, response, forwarded, *kept)
            return self._answer_from_store(request, key)
        if client_gone:
            return
        self._forwarded(
            request, response, forwarded,
            *(["stored"] if download.caching or download.published else []),
            *(["collapsed"] if joined else []),
        )
        self._stream(request, download, response)

    def _cache_status(
        self, request: Request, *parameters: str, upstream: Optional[bytes] = None
    ) -> None:
        """
        Say what this node did, as RFC 9211 ``Cache-Status`` does, under its
        name: after the entries of the caches the answer came through
        (``upstream``: those of a source that is a cache itself, a tier
        nearer the origin), so that a client sees which tier answered.
        """
        own = entry(self._status_name, *parameters)
        request.setHeader(b"cache-status", upstream + b", " + own if upstream else own)

    def _forwarded(
        self, request: Request, response: UpstreamResponse, forwarded: str, *details: str
    ) -> None:
        """
        Say where a forwarded answer came through: the source's own
        ``Via`` and ``Cache-Status`` entries (a tier nearer the origin),
        then ours.
        """
        request.setHeader(b"via", extended(response.header_line(b"via"), self.node))
        self._cache_status(
            request, forwarded, f"fwd-status={response.code}", *details,
            upstream=response.header_line(b"cache-status"),
        )

    def _peer_path(
        self, request: Request, key: CacheKey, volatile: bool,
        revalidation: Optional["_Revalidation"],
    ) -> Optional[bytes]:
        """
        The path to ask the peers for, if they are to be asked: for a new
        immutable file served as it is stored.  What changes in place is
        asked of its source, and a peer would answer a rewritten document
        with its own links.
        """
        if revalidation is not None or volatile or not self.upstream.peers or self._rewrites(key):
            return None
        return request.path

    def _rewrites(self, key: CacheKey) -> bool:
        """``key`` is a document served rewritten (see ``rewriter``)."""
        return self._rewriter is not None and self._rewriter.applies(key)

    def _stream(self, request: Request, download: Download, response: UpstreamResponse) -> None:
        entity = Entity(
            download.length,
            download.last_modified,
            response.content_type or DEFAULT_CONTENT_TYPE,
            response.header(b"etag"),
        )
        producer = send_entity(
            request, entity, download, clock=self._reactor, stall_timeout=self._client_stall_timeout
        )
        if producer is not None:
            producer.start()

    def _answer_from_store(self, request: Request, key: CacheKey) -> None:
        """Serve the copy in the cache now (just confirmed or replaced)."""
        try:
            cached = self.store.open_file(key)
        except IsADirectoryError:
            cached = None
        if cached is None:
            return send_error(request, http.BAD_GATEWAY, "the file could not be stored")
        self._serve_copy(request, key, cached)

    def _serve_stale(
        self, request: Request, key: CacheKey, cached: CachedFile, record: _RequestRecord
    ) -> None:
        """Serve a stale copy that no source could revalidate (--stale-if-error)."""
        log.warn("serving a stale copy of {path}: no source could revalidate it",
                 path=request.path.decode("utf-8", "replace"))
        record.outcome = Outcome.STALE
        self.metrics.stale_answer(self.name)
        self._cache_status(request, "hit", "detail=stale-if-error")
        self._serve_copy(request, key, cached)

    def _sources_failed(
        self, key: CacheKey, failed: AllSourcesFailed, *, revalidation: bool, counted: bool
    ) -> None:
        """Remember a 404 from every source; count a failed revalidation once."""
        if failed.not_found:
            self.freshness.negative.remember(key)
        elif revalidation:
            self.freshness.unreachable.remember(key)
        if revalidation and counted:
            self.metrics.revalidated(self.name, "failed")

    def _revalidate_now(self, key: CacheKey) -> None:
        """Revalidate a cached copy with no client waiting (it is known stale)."""
        if self.downloads.in_flight(key) is not None or not self.store.running:
            return
        try:
            cached = self.store.open_file(key)
        except OSError:
            return
        if cached is not None:
            log.info("refetching {path}: it no longer matches its index", path=str(key))
            self.downloads.join_or_start(
                key, revalidating=cached, conditional=False, volatile=True, via=self._served_via
            )

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
                response = await self.upstream.fetch(
                    key, method=b"HEAD", via=extended(_incoming_via(request), self.node)
                )
            except AllSourcesFailed as failed:
                self._sources_failed(key, failed, revalidation=False, counted=False)
                record.outcome = Outcome.ERROR
                self._cache_status(request, "fwd=miss", *_failure_detail(failed))
                return send_error(request, *failure_response(failed))
            last_modified = response.last_modified or self._reactor.seconds()
        record.source = str(response.source)
        if client_gone:
            return
        self._forwarded(request, response, "fwd=miss")
        entity = Entity(
            response.total_length, last_modified,
            response.content_type or DEFAULT_CONTENT_TYPE, response.header(b"etag"),
        )
        send_entity(
            request, entity, download, clock=self._reactor, stall_timeout=self._client_stall_timeout
        )

    def _unexpected(self, failure: Failure, request: Request, record: _RequestRecord) -> None:
        log.failure("error answering {path}", failure, path=request.path)
        record.outcome = Outcome.ERROR
        if request.finished or request.channel is None:
            return  # answered already, or the client is gone
        if request.producer is not None:
            request.unregisterProducer()
        if not request.startedWriting:
            send_error(request, http.INTERNAL_SERVER_ERROR, "internal error")
        else:
            request.transport.abortConnection()

    def _request_done(self, result, request: Request, record: _RequestRecord) -> None:
        dropped = isinstance(result, Failure)
        if request.code >= 500 and not record.status_asked_for:
            # However it began, a request answered 5xx (a download that
            # failed before its first byte) is an error.
            record.outcome = Outcome.ERROR
        if self._log_requests:
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
        self.metrics.request_finished(self.name, record.outcome, request.sentLength)
        if self._access_log is not None:
            self._access_log.record(request, record.outcome, dropped)


def tree_url(request: Request, public_url: Optional[str]) -> Optional[str]:
    """
    The URL of the resource answering ``request`` as the client reached
    it (below ``public_url`` if given, else from its ``Host``), ending in
    ``/``; ``None`` without a ``Host`` that can go into a link.
    """
    if public_url is not None:
        root = public_url.rstrip("/")
    else:
        host = request.getHeader(b"host")
        if host is None or not _HOST.match(host):
            return None
        scheme = "https" if request.isSecure() else "http"
        root = f"{scheme}://{host.decode('ascii')}"
    mounted = (quote(part.decode("utf-8", "replace")) for part in request.prepath if part)
    return root + "".join("/" + segment for segment in mounted) + "/"


def _failure_detail(failed: AllSourcesFailed) -> list[str]:
    if failed.not_found:
        return ["fwd-status=404"]
    if failed.status == LOOP_DETECTED:
        # Passed on as a loop, so that the tier that asked says so too.
        return [LOOP_DETAIL]
    return ["detail=no-source"]


def _incoming_via(request: Request) -> Optional[bytes]:
    """The request's ``Via``, every line of it."""
    lines = request.requestHeaders.getRawHeaders(b"via")
    return b", ".join(lines) if lines else None


def _watch_disconnect(request: Request) -> list:
    """
    A list that becomes non-empty (so, true) once the client disconnects:
    ``notifyFinish`` must be asked before the disconnect to hear of it.
    """
    gone: list = []
    request.notifyFinish().addErrback(lambda failure: gone.append(failure))
    return gone

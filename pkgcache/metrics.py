"""
Prometheus metrics, served on their own endpoint (``--metrics-listen``) so
that they never share the mirror's URL space.
"""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

from pkgcache.outcomes import Outcome


class Metrics:
    """
    Every metric pkgcache keeps, in a registry of its own (so that two
    caches in one process, or tests, do not collide).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: The children a finished request counts in, by mirror and
        #: outcome: looked up once, not by label on every request.
        self._finished: dict[tuple[str, Outcome], tuple[Counter, Optional[Counter]]] = {}
        self.requests = Counter(
            "pkgcache_requests",
            "Requests answered, by outcome: hit, miss, coalesced (joined a "
            "download in progress), revalidated (a stale copy its source "
            "confirmed), stale (served when no source could revalidate it), "
            "negative (a remembered 404) or error.",
            ["mirror", "outcome"],
            registry=self.registry,
        )
        self.served_bytes = Counter(
            "pkgcache_served_bytes",
            "Body bytes sent to clients, by where they came from: cache or source.",
            ["mirror", "origin"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "pkgcache_upstream_requests",
            "Requests sent to sources (and peers), by source and status (or 'error', 'timeout').",
            ["source", "status"],
            registry=self.registry,
        )
        self.peer_requests = Counter(
            "pkgcache_peer_requests",
            "Misses asked of a peer (--peer) before the sources, by peer and "
            "result: hit (it sent the file), miss (not in its cache) or error "
            "(it failed, and sits out its back-off).",
            ["peer", "result"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "pkgcache_failovers",
            "Times a source failed and the next one was tried (or a body resumed from it).",
            registry=self.registry,
        )
        self.revalidations = Counter(
            "pkgcache_revalidations",
            "Revalidations of stale volatile files with their source, by result: "
            "not-modified (304), modified (a new copy) or failed (no source answered).",
            ["mirror", "result"],
            registry=self.registry,
        )
        self.stale_answers = Counter(
            "pkgcache_stale_answers",
            "Stale copies served because no source could revalidate them (--stale-if-error).",
            ["mirror"],
            registry=self.registry,
        )
        self.negative_hits = Counter(
            "pkgcache_negative_hits",
            "404s answered from memory: every source said 404 less than "
            "--negative-max-age ago.",
            ["mirror"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "pkgcache_downloads_in_flight",
            "Downloads from sources in progress.",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "pkgcache_downloads_waiting",
            "Downloads waiting for a slot under --max-downloads.",
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "pkgcache_cache_size_bytes",
            "Bytes of published files in the cache.",
            registry=self.registry,
        )
        self.cache_files = Gauge(
            "pkgcache_cache_files",
            "Published files in the cache.",
            registry=self.registry,
        )
        self.evictions = Counter(
            "pkgcache_evictions",
            "Files removed from the cache to keep it under --max-cache-size.",
            registry=self.registry,
        )
        self.evicted_bytes = Counter(
            "pkgcache_evicted_bytes",
            "Bytes removed from the cache to keep it under --max-cache-size.",
            registry=self.registry,
        )

    def count_downloads(self, in_flight: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read the numbers of downloads in progress and waiting on scrape."""
        self.in_flight.set_function(in_flight)
        self.waiting.set_function(waiting)

    # Each of these is by mirror: its name under --config, "" for the one
    # tree of --source.

    def request_finished(self, mirror: str, outcome: Outcome, body_bytes: int) -> None:
        children = self._finished.get((mirror, outcome))
        if children is None:
            origin = outcome.body_origin
            children = self._finished[(mirror, outcome)] = (
                self.requests.labels(mirror, outcome.value),
                None if origin is None else self.served_bytes.labels(mirror, origin),
            )
        requests, served_bytes = children
        requests.inc()
        if served_bytes is not None and body_bytes:
            served_bytes.inc(body_bytes)

    def revalidated(self, mirror: str, result: str) -> None:
        self.revalidations.labels(mirror, result).inc()

    def stale_answer(self, mirror: str) -> None:
        self.stale_answers.labels(mirror).inc()

    def negative_hit(self, mirror: str) -> None:
        self.negative_hits.labels(mirror).inc()

    def upstream_answered(self, source: str, status: str) -> None:
        self.upstream_requests.labels(source, status).inc()

    def peer_answered(self, peer: str, result: str) -> None:
        self.peer_requests.labels(peer, result).inc()

    def resource(self) -> Resource:
        """A site root with the metrics at ``/metrics``."""
        root = Resource()
        root.putChild(b"metrics", _MetricsPage(self.registry))
        return root


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)

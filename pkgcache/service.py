"""
The services behind ``twist pkgcache``: :class:`CacheService` owns the
life of one :class:`~pkgcache.resource.PackageCacheResource` (its store, its
cache limit), and :class:`PackageCacheService` puts listeners in front.
"""

from __future__ import annotations

import signal
from typing import Optional, Sequence

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from pkgcache.accesslog import AccessLog
from pkgcache.cache_limit import CacheLimit
from pkgcache.health import HealthResource, HealthRoot
from pkgcache.resource import PackageCacheResource
from pkgcache.transports import ServingEndpoint


def cannot_listen(error: CannotListenError) -> SystemExit:
    """A failed bind, said in one line (rather than as a traceback) by twist."""
    return SystemExit(
        f"pkgcache: cannot listen on port {error.port}"
        f"{' of ' + error.interface if error.interface else ''}: {error.socketError}"
    )


def cannot_use_cache(store, error: OSError) -> SystemExit:
    """A cache directory that cannot be opened, said in one line."""
    return SystemExit(
        f"pkgcache: cannot use {store.cache_dir.path} as the cache directory: "
        f"{error.strerror or error}"
    )


class OneWriteHeadersChannel(HTTPChannel):
    """
    An HTTP channel that hands the transport a response's status line and
    headers in one write.  Twisted's gives it some forty pieces, which the
    transport buffers one by one: about a tenth of the instructions of a
    small hit.  (Twisted's default channel wraps this one to negotiate
    HTTP/2 over TLS, which needs the h2 package: pkgcache serves HTTP/1.1.)
    """

    def writeHeaders(self, version, code, reason, headers) -> None:
        lines = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.extend((name, b": ", value, b"\r\n"))
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))


class QuietSite(Site):
    """
    A site that leaves request logging to :class:`PackageCacheResource`,
    which knows each request's cache outcome (Twisted's own line would say
    the same thing again without it), on :class:`OneWriteHeadersChannel`.
    """

    protocol = OneWriteHeadersChannel

    def log(self, request) -> None:
        pass


def serving_site(resource: PackageCacheResource) -> tuple[QuietSite, HealthResource]:
    """
    The site of a serving port: ``resource`` at its root, and the health
    URL a balancer polls (:mod:`pkgcache.health`), to be told when the
    node stops.
    """
    health = HealthResource(resource.store)
    return QuietSite(HealthRoot(resource, health)), health


class CacheService(MultiService):
    """
    Starts and stops what ``resource`` needs besides requests: at start,
    its cache directory is made, spools a crash left are swept and the disk
    threads start, then the cache limit (with ``max_cache_size``); at stop,
    the cache limit stops (never waiting for a walk) and the resource is
    closed for good.

    Embedders add it to their application, or call ``startService`` and
    ``stopService`` themselves.
    """

    def __init__(
        self, resource: PackageCacheResource, max_cache_size: Optional[int] = None, reactor=None
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.resource = resource
        self.cache_limit: Optional[CacheLimit] = None
        if max_cache_size is not None:
            self.cache_limit = CacheLimit(
                resource.store, max_cache_size, resource.metrics, reactor
            )
            self.cache_limit.setServiceParent(self)

    def startService(self) -> None:
        self.resource.store.open()
        super().startService()

    def stopService(self) -> "Deferred[None]":
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        await self.resource.close()


class PackageCacheService(MultiService):
    """
    Serves ``resource`` on every endpoint in ``listen``, and its metrics on
    ``metrics_listen``, with a :class:`CacheService` for its life.

    The listeners start first, so that a port in use stops start-up before
    any work has begun; stopping stops listening first, then writes the
    lines ``access_log`` (the resource's) holds, then gives up the
    downloads in progress (their clients are cut off; nothing partial is
    published) and closes the store and the connections to the sources.
    """

    def __init__(
        self,
        resource: PackageCacheResource,
        listen: Sequence[str],
        reactor,
        metrics_listen: Optional[str] = None,
        max_cache_size: Optional[int] = None,
        access_log: Optional[AccessLog] = None,
    ) -> None:
        super().__init__()
        self.resource = resource
        self._access_log = access_log
        self._reactor = reactor
        self._previous_sighup = None
        self.site, self._health = serving_site(resource)
        for description in listen:
            self._listen(description, self.site, reactor)
        if metrics_listen is not None:
            self._listen(metrics_listen, QuietSite(resource.metrics.resource()), reactor)
        self.cache = CacheService(resource, max_cache_size, reactor)

    def _listen(self, description: str, site: Site, reactor) -> None:
        # strports.service, unlike a bare StreamServerEndpointService,
        # makes a failed bind stop start-up with an error.
        service = strports.service(description, site, reactor=reactor)
        service.endpoint = ServingEndpoint(service.endpoint)
        service.setServiceParent(self)

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as error:
            raise cannot_listen(error) from None
        try:
            self.cache.startService()
        except OSError as error:
            raise cannot_use_cache(self.resource.store, error) from None
        if self._access_log is not None:
            # After a rotation (logrotate without copytruncate).
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, signum, frame) -> None:
        self._reactor.callFromThread(self._access_log.reopen)

    def stopService(self) -> "Deferred[None]":
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._health.stopping = True
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        await super().stopService()
        if self._access_log is not None:
            self._access_log.close()
        if self.cache.running:
            await self.cache.stopService()

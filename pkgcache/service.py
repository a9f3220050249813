"""
The service behind ``twist pkgcache``: listeners in front of one
:class:`~pkgcache.resource.PackageCacheResource`, and its shutdown.
"""

from __future__ import annotations

from typing import Optional, Sequence

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.web.server import Site

from pkgcache.cache_limit import CacheLimit
from pkgcache.resource import PackageCacheResource


class QuietSite(Site):
    """
    A site that leaves request logging to :class:`PackageCacheResource`,
    which knows each request's cache outcome (Twisted's own line would say
    the same thing again without it).
    """

    def log(self, request) -> None:
        pass


class PackageCacheService(MultiService):
    """
    Serves ``resource`` on every endpoint in ``listen``, and its metrics on
    ``metrics_listen``; keeps its cache under ``max_cache_size`` bytes.

    Stopping it stops listening, then gives up the downloads in progress
    (their clients are cut off; nothing partial is published) and closes
    the connections to the sources.
    """

    def __init__(
        self,
        resource: PackageCacheResource,
        listen: Sequence[str],
        reactor,
        metrics_listen: Optional[str] = None,
        max_cache_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.resource = resource
        self.site = QuietSite(resource)
        for description in listen:
            self._listen(description, self.site, reactor)
        if metrics_listen is not None:
            self._listen(metrics_listen, QuietSite(resource.metrics.resource()), reactor)
        # Started after the listeners: if one cannot bind, no walk of the
        # cache has begun in a thread that would keep the process alive.
        self.cache_limit = CacheLimit(resource.store, max_cache_size, resource.metrics, reactor)
        self.cache_limit.setServiceParent(self)

    def _listen(self, description: str, site: Site, reactor) -> None:
        # strports.service, unlike a bare StreamServerEndpointService,
        # makes a failed bind stop start-up with an error.
        strports.service(description, site, reactor=reactor).setServiceParent(self)

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as error:
            # Said in one line, rather than as a traceback, by twist.
            raise SystemExit(
                f"pkgcache: cannot listen on port {error.port}"
                f"{' of ' + error.interface if error.interface else ''}: {error.socketError}"
            ) from None

    def stopService(self) -> "Deferred[None]":
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        await self.resource.close()

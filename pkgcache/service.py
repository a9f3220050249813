"""
The service behind ``twist pkgcache``: listeners in front of one
:class:`~pkgcache.resource.PackageCacheResource`, and its shutdown.
"""

from __future__ import annotations

from typing import Sequence

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.web.server import Site

from pkgcache.resource import PackageCacheResource


class PackageCacheService(MultiService):
    """
    Serves ``resource`` on every endpoint in ``listen``.

    Stopping it stops listening, then gives up the downloads in progress
    (their clients are cut off; nothing partial is published) and closes
    the connections to the sources.
    """

    def __init__(
        self, resource: PackageCacheResource, listen: Sequence[str], reactor, site: Site
    ) -> None:
        super().__init__()
        self.resource = resource
        self.site = site
        for description in listen:
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

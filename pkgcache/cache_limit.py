"""
Keeping the cache under ``--max-cache-size``, and its size in the metrics.

The cache's size is learnt by a walk of the whole directory (at start-up and
then every hour, in a disk thread, since a big cache takes a while) and kept
up to date in between by adding each file pkgcache publishes.  Once it
passes the limit, a cull runs in a disk thread and removes the least
recently used files until the cache is at 90% of the limit
(:func:`pkgcache.cull.cull`): the reactor never waits for it, and downloads
in progress are never touched.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pkgcache.cull import CullReport, cull
from pkgcache.sizes import format_size
from pkgcache.metrics import Metrics
from pkgcache.store import CacheStore

#: How often the whole cache is walked again, to notice what others
#: (``pkgcache-cull``, an administrator) removed.
RESCAN_SECONDS = 3600.0

log = Logger()


class CacheLimit(Service):
    """
    Tracks the size of ``store``'s cache and culls it when it passes
    ``max_size`` bytes (``None``: only track the size, for the metrics).
    """

    def __init__(
        self,
        store: CacheStore,
        max_size: Optional[int],
        metrics: Metrics,
        clock,
        rescan_seconds: float = RESCAN_SECONDS,
    ) -> None:
        self._store = store
        self.max_size = max_size
        self._metrics = metrics
        self._rescans = LoopingCall(self._cull_or_scan)
        self._rescans.clock = clock
        self._rescan_seconds = rescan_seconds
        self.size_bytes = 0
        self.files = 0
        self._running: Optional[Deferred[None]] = None
        self._again = False

    def startService(self) -> None:
        super().startService()
        self._store.on_published.append(self._published)
        self._rescans.start(self._rescan_seconds, now=True)

    def stopService(self) -> Deferred[None]:
        """Stop culling; fires once a walk under way is over."""
        super().stopService()
        self._store.on_published.remove(self._published)
        if self._rescans.running:
            self._rescans.stop()
        walk_over: Deferred[None] = Deferred()
        if self._running is None:
            walk_over.callback(None)
        else:
            self._running.addBoth(lambda _: walk_over.callback(None))
        return walk_over

    def _published(self, size: int) -> None:
        self.size_bytes += size
        self.files += 1
        self._show()
        if self.max_size is not None and self.size_bytes > self.max_size:
            self._cull_or_scan()

    def _cull_or_scan(self) -> Optional[Deferred[None]]:
        """Walk the cache (culling if over the limit), unless a walk is under way."""
        if self._running is not None:
            self._again = True
            return None
        self._running = Deferred.fromCoroutine(self._walk())
        return None

    async def _walk(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    report = await self._store.in_disk_thread(
                        cull, self._store.cache_dir.path, self.max_size
                    )
                except OSError as error:
                    log.error("could not walk the cache: {error}", error=error)
                    return
                self._account(report)
                if not self._again:
                    return
        finally:
            self._running = None

    def _account(self, report: CullReport) -> None:
        # Files published during the walk may or may not have been seen:
        # the next walk settles it.
        self.size_bytes, self.files = report.left_bytes, report.left_files
        self._show()
        if report.removed_files:
            self._metrics.evictions.inc(report.removed_files)
            self._metrics.evicted_bytes.inc(report.removed_bytes)
            log.info(
                "culled {files} files ({freed}) to stay under {limit}; "
                "{left} in {left_files} files left",
                files=report.removed_files,
                freed=format_size(report.removed_bytes),
                limit=format_size(self.max_size or 0),
                left=format_size(report.left_bytes),
                left_files=report.left_files,
            )

    def _show(self) -> None:
        self._metrics.cache_bytes.set(self.size_bytes)
        self._metrics.cache_files.set(self.files)

"""
Keeping the cache under ``--max-cache-size``, and its size in the metrics.

The cache's size is learnt by a walk of the whole directory (at start-up and
then every hour, in a disk thread, since a big cache takes a while) and kept
up to date in between by adding each file pkgcache publishes.  Once it
passes the limit, a cull runs in a disk thread and removes the least
recently used files until the cache is at 90% of the limit
(:func:`pkgcache.cull.cull`): the reactor never waits for it, and downloads
in progress are never touched.

Stopping never waits for a walk either: the walk is told to stop between
two files, and whatever it finds after that is ignored.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import TYPE_CHECKING, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pkgcache.metrics import Metrics
from pkgcache.sizes import format_size
from pkgcache.store import CacheStore

if TYPE_CHECKING:
    # pkgcache.cull is imported when a limit is set, not by every process
    # that could have one.
    from pkgcache.cull import CullReport

#: How often the whole cache is walked again, to notice what others
#: (``pkgcache-cull``, an administrator) removed.
RESCAN_SECONDS = 3600.0

#: :func:`pkgcache.cull.cull`'s signature, as far as it is used here.
CullFunction = Callable[..., "CullReport"]

log = Logger()


class CacheLimit(Service):
    """
    Tracks the size of ``store``'s cache and culls it when it passes
    ``max_size`` bytes.

    It is made only when there is a limit (``--max-cache-size``): without
    one, nothing walks the cache.

    :param clock: schedules the walks every ``rescan_seconds``.
    :param cull_function: :func:`pkgcache.cull.cull` (the default), or a
        stand-in for tests; it runs in a disk thread.
    """

    def __init__(
        self,
        store: CacheStore,
        max_size: int,
        metrics: Metrics,
        clock: IReactorTime,
        rescan_seconds: float = RESCAN_SECONDS,
        cull_function: Optional[CullFunction] = None,
    ) -> None:
        if cull_function is None:
            from pkgcache.cull import cull as cull_function
        self._store = store
        self.max_size = max_size
        self._metrics = metrics
        self._rescans = LoopingCall(self._cull_or_scan)
        self._rescans.clock = clock
        self._rescan_seconds = rescan_seconds
        self._cull = cull_function
        self.size_bytes = 0
        self.files = 0
        #: Set to stop the walk under way, ``None`` when there is none.
        self._walk_stop: Optional[threading.Event] = None
        self._again = False

    def startService(self) -> None:
        super().startService()
        self._store.on_published.append(self._published)
        self._rescans.start(self._rescan_seconds, now=True).addErrback(
            self._failed, "the hourly walks of the cache stopped"
        )

    def stopService(self) -> None:
        """
        Stop culling, at once: a walk under way is told to stop, and what
        it finds is ignored.
        """
        super().stopService()
        self._store.on_published.remove(self._published)
        if self._rescans.running:
            self._rescans.stop()
        if self._walk_stop is not None:
            self._walk_stop.set()
            self._walk_stop = None

    def _published(self, size: int) -> None:
        self.size_bytes += size
        self.files += 1
        self._show()
        if self.size_bytes > self.max_size:
            self._cull_or_scan()

    def _cull_or_scan(self) -> None:
        """Walk the cache (culling if over the limit), unless a walk is under way."""
        if self._walk_stop is not None:
            self._again = True
            return
        stop = self._walk_stop = threading.Event()
        Deferred.fromCoroutine(self._walk(stop)).addErrback(
            self._failed, "walking the cache failed"
        ).addBoth(lambda _: self._walk_done(stop))

    async def _walk(self, stop: threading.Event) -> None:
        from pkgcache.cull import CullStopped

        while True:
            self._again = False
            try:
                report = await self._store.in_disk_thread(
                    partial(self._cull, stop=stop), self._store.cache_dir.path, self.max_size
                )
            except CullStopped:
                return
            except OSError as error:
                log.error("could not walk the cache: {error}", error=error)
                return
            if stop.is_set():
                # Stopped while the walk finished: what it found is stale
                # for whoever starts this service again.
                return
            self._account(report)
            if not self._again:
                return

    def _walk_done(self, stop: threading.Event) -> None:
        # Only this walk's own state: after a stop and a new start, another
        # walk may be under way.
        if self._walk_stop is stop:
            self._walk_stop = None

    def _failed(self, failure: Failure, what: str) -> None:
        log.failure("{what}", failure, what=what)

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
                limit=format_size(self.max_size),
                left=format_size(report.left_bytes),
                left_files=report.left_files,
            )

    def _show(self) -> None:
        self._metrics.cache_bytes.set(self.size_bytes)
        self._metrics.cache_files.set(self.files)

"""
One download of one file, shared by every client that asks for it meanwhile.

A :class:`Download` fetches the file from the sources once, hands each chunk
to its :class:`~pkgcache.spool.SpoolWriter` (which writes it in a disk
thread) and keeps it in memory until it is on disk.  Clients are never
pushed chunks: each one is a follower (:class:`IFollower`) that the download
tells when there is more, and that pulls bytes with :meth:`Download.read`
at its own pace, from wherever it is: from the spool what is on disk, the
newest bytes from memory.  So a slow client holds back nobody, a late
joiner gets what is spooled and then what comes, and memory holds no body,
whatever the file's size or the clients' speeds: if the disk falls more
than a few megabytes behind the source, the source is paused.

Two things can go wrong after the headers:

- The body breaks off.  If the file's length is known, the download resumes
  from the next source with ``Range: bytes=N-``; failing that, it fails,
  and its followers cut their clients off (so no client takes a short file
  for a whole one) and nothing is published.
- The spool cannot be written (disk full, I/O error).  The download stops
  caching and carries on for the followers already attached, keeping what
  they have not read yet in memory (within a bound: the source is paused
  while the slowest catches up).  New clients start a download of their own.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Callable, Optional

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.logger import Logger
from zope.interface import implementer

from pkgcache.chunks import ChunkBuffer
from pkgcache.interfaces import IByteSource, IFollower, IPublicationCheck
from pkgcache.metadata import EntryMetadata
from pkgcache.paths import CacheKey
from pkgcache.spool import SpoolWriter
from pkgcache.sources import AllSourcesFailed
from pkgcache.store import CachedFile, CacheStore, StoreClosed
from pkgcache.upstream import BodyFailed, BodyTooLarge, UpstreamClient, UpstreamResponse

#: The source is paused when this much of its body waits in memory (for the
#: disk or, once the spool is lost, for the slowest follower), and resumed
#: when that is back under the low mark.
MEMORY_HIGH_WATER = 8 * 1024 * 1024
MEMORY_LOW_WATER = 2 * 1024 * 1024
#: A body that breaks off is resumed from another source, this many times
#: at most, so that a file no source delivers whole fails instead of looping.
MAX_RESUMES = 10

log = Logger()


class DownloadState(enum.Enum):
    #: waiting for a source to answer (or for a free download slot)
    ASKING = "asking"
    #: the body is arriving and being spooled; new clients may join
    RECEIVING = "receiving"
    #: the body is arriving but cannot be cached: only followers already
    #: attached get it, new clients start a download of their own
    UNCACHED = "uncached"
    #: every byte arrived (and was published, if it could be)
    COMPLETE = "complete"
    #: a revalidation: the source said the cached copy is still its file,
    #: so clients are answered from that copy
    NOT_MODIFIED = "not modified"
    #: no source provided it, it broke off, or it was cancelled
    FAILED = "failed"


@implementer(IByteSource)
class Download:
    """
    A fetch of ``key`` in progress: of a file not in the cache, or, when
    ``revalidating`` a stale copy, a conditional fetch that either confirms
    the copy (304) or brings its replacement exactly as a miss does.

    :ivar state: where it stands (:class:`DownloadState`).
    :ivar response: the first source's response, once it answered: its
        headers are what every follower's client is sent.
    :ivar length: the file's length, if the source said.
    :ivar last_modified: when the file was last modified: the source's
        ``Last-Modified``, or the time its answer came.  Hits of the
        published file say the same (it is the file's mtime).
    :ivar received: how many bytes of the file have arrived so far.
    :ivar failure: why it failed, once it has.
    :ivar finished: fires once it is over and its spool published or gone.
    """

    def __init__(
        self,
        key: CacheKey,
        store: CacheStore,
        upstream: UpstreamClient,
        slots: DeferredSemaphore,
        on_retired: Callable[["Download"], None],
        *,
        clock,
        revalidating: Optional[CachedFile] = None,
        conditional: bool = True,
        volatile: bool = False,
        check: Optional[IPublicationCheck] = None,
    ) -> None:
        self.key = key
        self._clock = clock
        self._stale = revalidating
        self.revalidating = revalidating is not None
        self._conditional = conditional
        self._volatile = volatile
        self._digest = hashlib.sha256() if volatile else None
        self._check = check
        self.checked_at = 0.0
        #: the body was stored in the cache (for a revalidation: it
        #: replaced the stale copy)
        self.published = False
        self._store = store
        self._upstream = upstream
        self._slots = slots
        self._on_retired: Optional[Callable[["Download"], None]] = on_retired
        self.state = DownloadState.ASKING
        self.response: Optional[UpstreamResponse] = None
        self._current: Optional[UpstreamResponse] = None
        self.length: Optional[int] = None
        self.last_modified = 0.0
        self.received = 0
        self.failure: Optional[BaseException] = None
        self.followers: set = set()
        self._spool: Optional[SpoolWriter] = None
        self._buffer = ChunkBuffer()
        self._paused_for_memory = False
        self._headers_waiters: list[Deferred[UpstreamResponse]] = []
        self._fetching: Optional[Deferred[None]] = None
        #: holds one of the download slots (so it is fetching)
        self.has_slot = False
        self.finished: Deferred[None] = Deferred()

    def start(self) -> None:
        Deferred.fromCoroutine(self._run()).addErrback(
            lambda failure: log.failure("download of {path} broke", failure, path=str(self.key))
        )

    @property
    def caching(self) -> bool:
        """The body is being spooled, to be published once complete."""
        return self.state is DownloadState.RECEIVING and self._spool is not None

    def cancel(self) -> None:
        """Give up (on shutdown): followers are cut off, nothing is published."""
        if self._fetching is not None:
            self._fetching.cancel()

    def when_headers_known(self) -> "Deferred[UpstreamResponse]":
        """
        Fires with the source's response once there is one; fails with
        :class:`~pkgcache.sources.AllSourcesFailed` if no source provided
        the file, or with ``CancelledError`` on shutdown.
        """
        waiter: Deferred[UpstreamResponse] = Deferred()
        if self.response is not None:
            waiter.callback(self.response)
        elif self.failure is not None:
            waiter.errback(self.failure)
        else:
            self._headers_waiters.append(waiter)
        return waiter

    @property
    def complete(self) -> bool:
        """Every byte has arrived."""
        return self.state is DownloadState.COMPLETE

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the body held in memory, for the disk or for followers."""
        return len(self._buffer)

    # -- what followers use ---------------------------------------------------

    def attach(self, follower: IFollower) -> None:
        self.followers.add(follower)

    def detach(self, follower: IFollower) -> None:
        self.followers.discard(follower)
        self.follower_advanced()
        if not self.followers and self.state is DownloadState.UNCACHED:
            log.info("all clients of {path} left and it cannot be cached: stopping",
                     path=str(self.key))
            self.cancel()
        self._release_if_unused()

    def read(self, offset: int, length: int) -> bytes:
        """
        Up to ``length`` bytes of the file from ``offset``, of those received
        so far (``b""`` if none yet).
        """
        if self._spool is not None and offset < self._spool.written:
            return self._spool.read(offset, length)
        return self._buffer.read(offset, length)

    def follower_advanced(self) -> None:
        """A follower read on: memory nobody needs may go."""
        self._trim_buffer()

    # -- the fetch ------------------------------------------------------------

    async def _run(self) -> None:
        try:
            # Only the fetch can be cancelled: a publication once begun ends.
            self._fetching = Deferred.fromCoroutine(self._fetch())
            await self._fetching
        except CancelledError:
            self._fail(CancelledError("download cancelled"))
        except (AllSourcesFailed, BodyFailed) as failed:
            self._fail(failed)
        except Exception as error:
            log.failure("download of {path} failed unexpectedly", path=str(self.key))
            self._fail(error)
        else:
            await self._publish()
        finally:
            self._fetching = None
            if self._spool is not None:
                await self._spool.discard()
            if self._stale is not None:
                self._stale.close()
                self._stale = None
            self._retire()
            self.finished.callback(None)
            self._release_if_unused()

    async def _fetch(self) -> None:
        """Fetch and spool the whole body, holding one of the download slots."""
        await self._slots.acquire()
        self.has_slot = True
        try:
            validators = self._stale if self._conditional else None
            response = await self._upstream.fetch(
                self.key, revalidating=validators.metadata if validators is not None else None
            )
            self.checked_at = self._clock.seconds()
            if response.not_modified:
                await self._confirm_copy(response)
                return
            self._headers_known(response)
            await self._receive(response)
        finally:
            self.has_slot = False
            self._slots.release()
        self.state = DownloadState.COMPLETE
        self._notify_followers()

    async def _confirm_copy(self, response: UpstreamResponse) -> None:
        """
        The stale copy is current: record the check on it (so that it is
        fresh again, after a restart too), then let the clients read it.
        """
        assert self._stale is not None
        metadata = self._stale.metadata.checked_at(self.checked_at, response.header(b"etag"))
        try:
            await self._store.in_disk_thread(metadata.write, self._stale.fd)
        except StoreClosed:
            pass
        except OSError as error:
            log.error("could not record the check of {path}: {error}",
                      path=str(self.key), error=error)
        self.response = response
        self.state = DownloadState.NOT_MODIFIED
        self._retire()
        waiters, self._headers_waiters = self._headers_waiters, []
        for waiter in waiters:
            waiter.callback(response)

    def _headers_known(self, response: UpstreamResponse) -> None:
        self.response = response
        self.length = response.total_length
        last_modified = response.last_modified
        self.last_modified = (
            last_modified if last_modified is not None else self._upstream.clock.seconds()
        )
        self.state = DownloadState.RECEIVING
        self._spool = self._open_spool()
        waiters, self._headers_waiters = self._headers_waiters, []
        for waiter in waiters:
            waiter.callback(response)

    async def _receive(self, response: UpstreamResponse) -> None:
        """
        The whole body, from ``response`` and whichever sources resume it.

        :raises BodyFailed: if no source delivers the rest.
        """
        resumes = 0
        while True:
            self._current = response
            try:
                await response.stream(self._received_chunk)
                if self.length is not None and self.received != self.length:
                    # A resumed chunked body can stop short and end cleanly.
                    raise BodyFailed(f"the body ended at byte {self.received} of {self.length}")
            except BodyTooLarge:
                raise
            except BodyFailed as broken:
                self._upstream.report_body_failure(response.source, self.key, str(broken))
                resumes += 1
                if resumes > MAX_RESUMES:
                    raise
                response = await self._resume_after(response, broken)
            else:
                self._upstream.report_body_complete(response.source)
                return
            finally:
                self._current = None

    async def _resume_after(
        self, broken_response: UpstreamResponse, broken: BodyFailed
    ) -> UpstreamResponse:
        """
        Ask the other sources for the rest of the file.

        :raises BodyFailed: if the length is unknown (a resumed body could
            not be checked), the file is volatile (another mirror's rest
            may belong to another version of it) or no source can resume.
        """
        if self.length is None or self.received >= self.length or self._volatile:
            raise broken
        log.info(
            "resuming {path} at byte {offset} of {length}",
            path=str(self.key), offset=self.received, length=self.length,
        )
        try:
            return await self._upstream.fetch(
                self.key,
                offset=self.received,
                total_length=self.length,
                after=broken_response.source,
            )
        except AllSourcesFailed as failed:
            raise BodyFailed(f"{broken}; no source could resume: {failed}") from None

    def _open_spool(self) -> Optional[SpoolWriter]:
        try:
            spool = self._store.new_spool(self.key)
        except OSError as error:
            log.error(
                "cannot spool {path}, streaming it uncached: {error}",
                path=str(self.key), error=error,
            )
            self._stop_caching()
            return None
        spool.on_written = self._spool_progressed
        return spool

    def _received_chunk(self, data: bytes) -> None:
        self._buffer.append(data)
        self.received += len(data)
        if self._digest is not None:
            self._digest.update(data)
        if self._spool is not None:
            self._spool.append(data)
        self._notify_followers()
        if len(self._buffer) > MEMORY_HIGH_WATER and not self._paused_for_memory:
            if self._current is not None:
                self._paused_for_memory = True
                self._current.pause()

    def _spool_progressed(self) -> None:
        if self._spool is not None and self._spool.failure is not None:
            log.error("no longer caching {path}: its spool cannot be written",
                      path=str(self.key))
            self._stop_caching()
        self._trim_buffer()

    def _trim_buffer(self) -> None:
        """
        Drop from memory what is on disk (while caching) or what every
        follower has read (once not), and resume a source paused for memory.
        """
        spool = self._spool
        on_disk = spool.written if spool is not None else 0
        if spool is not None and spool.failure is None:
            needed_from = on_disk
        else:
            needed_from = max(on_disk, min(
                (follower.needed_from for follower in self.followers), default=self.received
            ))
        self._buffer.drop_before(needed_from)
        if self._paused_for_memory and len(self._buffer) <= MEMORY_LOW_WATER:
            self._paused_for_memory = False
            if self._current is not None:
                self._current.resume()

    def _stop_caching(self) -> None:
        """
        Carry on without a spool: keep unread bytes in memory and let new
        clients start afresh.  The spool's name is removed when the download
        ends; what is on disk stays readable for followers until then.
        """
        if self.state is DownloadState.RECEIVING:
            self.state = DownloadState.UNCACHED
        self._retire()
        self._trim_buffer()

    async def _publish(self) -> None:
        spool = self._spool
        response = self.response
        if spool is None or spool.failure is not None or response is None:
            return
        metadata = EntryMetadata(
            content_type=response.content_type,
            etag=response.header(b"etag"),
            last_modified=response.header(b"last-modified"),
            source=response.source.text,
            checked=self.checked_at,
            sha256=self._digest.hexdigest() if self._digest is not None else None,
        )
        if self._check is not None and not self._check.may_publish(self.key, metadata, self.read):
            return
        try:
            await spool.commit(self.last_modified, metadata)
        except StoreClosed:
            log.info("not caching {path}: shutting down", path=str(self.key))
        except OSError as error:
            log.error("could not publish {path}: {error}", path=str(self.key), error=error)
        else:
            log.info("cached {path} ({length} bytes)", path=str(self.key), length=self.received)
            self.published = True
            self._store.published(self.received)
            if self._check is not None:
                self._check.published(self.key, metadata, self.read)

    def _fail(self, reason: BaseException) -> None:
        self.failure = reason
        self.state = DownloadState.FAILED
        self._retire()
        if not isinstance(reason, (AllSourcesFailed, CancelledError)):
            log.error("download of {path} failed: {reason}", path=str(self.key), reason=reason)
        waiters, self._headers_waiters = self._headers_waiters, []
        for waiter in waiters:
            waiter.errback(reason)
        self._notify_followers()

    def _notify_followers(self) -> None:
        for follower in list(self.followers):
            follower.data_available()

    def _retire(self) -> None:
        """Stop being the download that new clients of this path join."""
        on_retired, self._on_retired = self._on_retired, None
        if on_retired is not None:
            on_retired(self)

    def _release_if_unused(self) -> None:
        if self.finished.called and not self.followers:
            if self._spool is not None:
                self._spool.close()
                self._spool = None
            self._buffer.drop_before(self.received)


class Downloads:
    """
    The downloads in progress, one per path: a client asking for a path
    that is being downloaded joins that download.

    :param max_downloads: how many may fetch from the sources at once;
        more wait for a slot, in the order they came (``None``: no limit).
    """

    def __init__(
        self,
        store: CacheStore,
        upstream: UpstreamClient,
        max_downloads: Optional[int] = None,
        *,
        clock=None,
        check: Optional[IPublicationCheck] = None,
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._clock = clock if clock is not None else upstream.clock
        self._check = check
        self.max_downloads = max_downloads
        self._slots = DeferredSemaphore(max_downloads if max_downloads else 2**31)
        self._by_key: dict[CacheKey, Download] = {}
        # Includes downloads no client can join any more (spool lost, or
        # failed and winding down): they still run until they end.
        self._running: set[Download] = set()

    def join_or_start(
        self,
        key: CacheKey,
        *,
        revalidating: Optional[CachedFile] = None,
        conditional: bool = True,
        volatile: bool = False,
    ) -> tuple[Download, bool]:
        """
        :param revalidating: the stale copy of ``key``, to revalidate; the
            download closes it once done (at once, if one was running).
        :param conditional: send the copy's validators (not for a copy
            known to be wrong: its source would confirm it with a 304).
        :param volatile: the file may change in place: its digest is kept,
            and the publication check is asked before it is published.
        :return: the download of ``key``, and whether it was already running.
        """
        download = self._by_key.get(key)
        if download is not None:
            if revalidating is not None:
                revalidating.close()
            return download, True
        download = Download(
            key, self._store, self._upstream, self._slots, self._retired,
            clock=self._clock,
            revalidating=revalidating,
            conditional=conditional,
            volatile=volatile,
            check=self._check if volatile else None,
        )
        self._by_key[key] = download
        self._running.add(download)
        download.finished.addBoth(lambda _: self._running.discard(download))
        download.start()
        return download, False

    def in_flight(self, key: CacheKey) -> Optional[Download]:
        """The download of ``key`` that a new client would join, if any."""
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Downloads waiting for a slot."""
        return len(self._slots.waiting)

    def cancel_all(self) -> None:
        # Those waiting for a slot first: cancelling a holder hands its slot
        # on at once, and a waiting download would then ask a source.
        for download in sorted(self._running, key=lambda download: download.has_slot):
            download.cancel()

    def _retired(self, download: Download) -> None:
        if self._by_key.get(download.key) is download:
            del self._by_key[download.key]

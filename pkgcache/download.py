"""
One download of one file, shared by every client that asks for it meanwhile.

A :class:`Download` fetches the file from the sources once, appends each chunk
to a spool file as it arrives, and publishes the spool into the cache when the
body is complete.  Clients never receive chunks from it directly: each one
reads the spool with its own :class:`~pkgcache.reader.DownloadReader`, at its
own pace, from wherever it joined.  So a slow client holds back nobody (the
source is read as fast as it sends), a late joiner gets the bytes already
spooled and then the new ones, and memory holds no body, whatever the file's
size or the clients' speeds.

Two things can go wrong after the headers:

- The body breaks off.  If the file's length is known, the download resumes
  from the next source with ``Range: bytes=N-``; failing that, every client's
  connection is dropped (so no client takes a short file for a whole one) and
  the spool is deleted.
- The spool cannot be written (disk full, I/O error).  The download stops
  caching, deletes the spool and carries on for the clients already attached,
  keeping what they have not yet read in memory: within a bound, since the
  source is paused while the slowest of them catches up.  New clients start a
  download of their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from pkgcache.paths import CacheKey
from pkgcache.store import CacheStore, Spool
from pkgcache.upstream import AllSourcesFailed, BodyFailed, UpstreamClient, UpstreamResponse

if TYPE_CHECKING:
    from pkgcache.reader import DownloadReader

#: Once the spool is lost, the source is paused when clients lag this far
#: behind it, and resumed when they are back within the low mark.
MEMORY_HIGH_WATER = 8 * 1024 * 1024
MEMORY_LOW_WATER = 2 * 1024 * 1024
#: A body that breaks off is resumed from another source; a source that
#: breaks off again before sending a byte counts against this limit, so a
#: file that no source can deliver fails instead of looping.
MAX_RESUMES_WITHOUT_PROGRESS = 3

log = Logger()


class Download:
    """
    A fetch of ``key`` in progress.

    :ivar response: the first source's response, once it has answered: its
        headers are what every client of this download is sent.
    :ivar length: the file's length, if the source said.
    :ivar received: how many bytes of the file have arrived so far.
    :ivar complete: the whole body arrived and checked out.
    :ivar failure: why the download failed, once it has.
    :ivar accepting_readers: new clients may join (false once the spool is
        lost: the bytes they would need are no longer anywhere).
    """

    def __init__(
        self,
        key: CacheKey,
        store: CacheStore,
        upstream: UpstreamClient,
        on_retired: Callable[["Download"], None],
    ) -> None:
        self.key = key
        self._store = store
        self._upstream = upstream
        self._on_retired = on_retired
        self.response: Optional[UpstreamResponse] = None
        self._current: Optional[UpstreamResponse] = None
        self.length: Optional[int] = None
        self.received = 0
        self.complete = False
        self.failure: Optional[BaseException] = None
        self.accepting_readers = True
        self.readers: set[DownloadReader] = set()
        self._spool: Optional[Spool] = None
        self._on_disk = 0
        self._memory: Optional[bytearray] = None
        self._memory_start = 0
        self._paused_for_memory = False
        self._headers_waiters: list[Deferred[UpstreamResponse]] = []
        self._running: Optional[Deferred[None]] = None
        #: Fires once the download has ended and its spool is published or gone.
        self.finished: Deferred[None] = Deferred()

    def start(self) -> None:
        self._running = Deferred.fromCoroutine(self._run())

    def cancel(self) -> None:
        """Give up (on shutdown): clients are cut off, nothing is published."""
        if self._running is not None:
            self._running.cancel()

    def when_headers_known(self) -> "Deferred[UpstreamResponse]":
        """
        Fires with the source's response once there is one; fails with
        :class:`AllSourcesFailed` if no source provided the file.
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
    def buffered_bytes(self) -> int:
        """Bytes held in memory for readers (only once the spool is lost)."""
        return len(self._memory) if self._memory is not None else 0

    @property
    def ended(self) -> bool:
        return self.complete or self.failure is not None

    # -- what readers use --------------------------------------------------

    def attach(self, reader: "DownloadReader") -> None:
        self.readers.add(reader)

    def detach(self, reader: "DownloadReader") -> None:
        self.readers.discard(reader)
        self.reader_advanced()
        if not self.readers and self._memory is not None and not self.ended:
            # Nobody is left to stream to and nothing is being cached.
            log.info("all clients of {path} left and it cannot be cached: stopping",
                     path=str(self.key))
            self.cancel()
        self._close_spool_if_unused()

    def read(self, offset: int, length: int) -> bytes:
        """
        Up to ``length`` bytes of the file from ``offset``, of those received
        so far (``b""`` if none yet).
        """
        if offset < self._on_disk:
            return self._readable_spool().read(offset, min(length, self._on_disk - offset))
        if self._memory is None:
            return b""
        start = offset - self._memory_start
        assert start >= 0, "a reader fell behind the memory buffer"
        return bytes(self._memory[start : start + length])

    def reader_advanced(self) -> None:
        """A reader consumed data: memory no reader needs can go."""
        if self._memory is None:
            return
        lowest = min((reader.offset for reader in self.readers), default=self.received)
        drop = lowest - self._memory_start
        if drop > 0:
            del self._memory[:drop]
            self._memory_start += drop
        if self._paused_for_memory and len(self._memory) <= MEMORY_LOW_WATER:
            self._paused_for_memory = False
            if self._current is not None:
                self._current.resume()

    # -- the fetch ----------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._fetch()
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
            self._retire()
            self.finished.callback(None)
            self._close_spool_if_unused()

    async def _fetch(self) -> None:
        response = await self._upstream.fetch(self.key)
        self.response = response
        self.length = response.total_length
        self._open_spool()
        for waiter in self._headers_waiters:
            waiter.callback(response)
        self._headers_waiters.clear()
        resumes_without_progress = 0
        while True:
            self._current = response
            started_at = self.received
            try:
                await response.stream(self._received_chunk)
            except BodyFailed as broken:
                self._upstream.report_body_failure(response.source, self.key, str(broken))
                if self.received > started_at:
                    resumes_without_progress = 0
                else:
                    resumes_without_progress += 1
                if resumes_without_progress >= MAX_RESUMES_WITHOUT_PROGRESS:
                    raise
                response = await self._resume_after(response, broken)
            else:
                break
            finally:
                self._current = None
        self.complete = True
        self._notify_readers()

    async def _resume_after(
        self, broken_response: UpstreamResponse, broken: BodyFailed
    ) -> UpstreamResponse:
        """
        Ask the other sources for the rest of the file.

        :raises BodyFailed: if the length is unknown (a resumed body could
            not be checked) or no source can resume.
        """
        if self.length is None:
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

    def _open_spool(self) -> None:
        try:
            self._spool = self._store.open_spool(self.key)
        except OSError as error:
            log.error(
                "cannot spool {path}, streaming it uncached: {error}",
                path=str(self.key), error=error,
            )
            self._stop_caching()

    def _received_chunk(self, data: bytes) -> None:
        if self._spool is not None and self._memory is None:
            try:
                self._spool.write(data)
            except OSError as error:
                log.error(
                    "writing the spool of {path} failed, no longer caching it: {error}",
                    path=str(self.key), error=error,
                )
                self._stop_caching()
            else:
                self._on_disk = self._spool.size
        if self._memory is not None:
            self._memory += data
        self.received += len(data)
        self._notify_readers()
        if self._memory is not None and len(self._memory) > MEMORY_HIGH_WATER:
            if not self._paused_for_memory and self._current is not None:
                self._paused_for_memory = True
                self._current.pause()

    def _stop_caching(self) -> None:
        """
        Carry on without a spool: keep unread bytes in memory, delete the
        spool's name (what was written stays readable for attached readers)
        and let new clients start afresh.
        """
        self._memory = bytearray()
        self._memory_start = self._on_disk
        if self._spool is not None:
            self._spool.discard()
        self.accepting_readers = False
        self._retire()
        if self._spool is not None and self._on_disk == 0:
            self._spool.close()
            self._spool = None

    async def _publish(self) -> None:
        if self._spool is None or self._memory is not None:
            return
        try:
            await self._spool.publish(self.response.last_modified_timestamp)
        except Exception as error:
            log.error("could not publish {path}: {error}", path=str(self.key), error=error)
        else:
            log.info("cached {path} ({length} bytes)", path=str(self.key), length=self.received)

    def _fail(self, reason: BaseException) -> None:
        self.failure = reason
        if not isinstance(reason, (AllSourcesFailed, CancelledError)):
            log.error("download of {path} failed: {reason}", path=str(self.key), reason=reason)
        for waiter in self._headers_waiters:
            waiter.errback(reason)
        self._headers_waiters.clear()
        if self._spool is not None:
            self._spool.discard()
        self._notify_readers()

    def _notify_readers(self) -> None:
        for reader in list(self.readers):
            reader.data_available()

    def _retire(self) -> None:
        """Stop being the download that new clients of this path join."""
        self.accepting_readers = False
        on_retired, self._on_retired = self._on_retired, None
        if on_retired is not None:
            on_retired(self)

    def _readable_spool(self) -> Spool:
        assert self._spool is not None
        return self._spool

    def _close_spool_if_unused(self) -> None:
        if self._spool is not None and self.finished.called and not self.readers:
            self._spool.close()
            self._spool = None
            self._memory = None


class Downloads:
    """
    The downloads in progress, one per path: a client asking for a path
    that is being downloaded joins that download.
    """

    def __init__(self, store: CacheStore, upstream: UpstreamClient) -> None:
        self._store = store
        self._upstream = upstream
        self._by_key: dict[CacheKey, Download] = {}

    def join_or_start(self, key: CacheKey) -> tuple[Download, bool]:
        """
        :return: the download of ``key``, and whether it was already running.
        """
        download = self._by_key.get(key)
        if download is not None and download.accepting_readers:
            return download, True
        download = Download(key, self._store, self._upstream, self._retired)
        self._by_key[key] = download
        download.start()
        return download, False

    def in_flight(self, key: CacheKey) -> Optional[Download]:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_key)

    def cancel_all(self) -> None:
        for download in list(self._by_key.values()):
            download.cancel()

    def _retired(self, download: Download) -> None:
        if self._by_key.get(download.key) is download:
            del self._by_key[download.key]

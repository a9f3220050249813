"""
One download of one file, shared by every client that asks for it meanwhile.

A :class:`Download` fetches the file from the sources once, keeps each chunk
in memory until a worker thread has appended it to a spool file, and
publishes the spool into the cache when the body is complete.  Clients never
receive chunks pushed at them: each one pulls from the download with its own
:class:`~pkgcache.reader.DownloadReader`, at its own pace, from wherever it
joined: bytes already on disk from the spool, the newest ones from memory.
So a slow client holds back nobody (the source is read as fast as it sends
and the disk takes it), a late joiner gets the bytes already spooled and
then the new ones, and memory holds no body, whatever the file's size or
the clients' speeds: if the disk falls more than a few megabytes behind the
source, the source is paused.

Two things can go wrong after the headers:

- The body breaks off.  If the file's length is known, the download resumes
  from the next source with ``Range: bytes=N-``; failing that, every client's
  connection is cut (so no client takes a short file for a whole one) and
  the spool is deleted.
- The spool cannot be written (disk full, I/O error).  The download stops
  caching, deletes the spool and carries on for the clients already
  attached, keeping what they have not yet read in memory: within a bound,
  since the source is paused while the slowest of them catches up.  New
  clients start a download of their own.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from pkgcache.paths import CacheKey
from pkgcache.store import CacheStore, Spool
from pkgcache.upstream import AllSourcesFailed, BodyFailed, UpstreamClient, UpstreamResponse

if TYPE_CHECKING:
    from pkgcache.reader import DownloadReader

#: The source is paused when this much of its body waits in memory (for the
#: disk or, once the spool is lost, for the slowest client), and resumed
#: when that is back under the low mark.
MEMORY_HIGH_WATER = 8 * 1024 * 1024
MEMORY_LOW_WATER = 2 * 1024 * 1024
#: A body that breaks off is resumed from another source, this many times
#: at most, so that a file no source delivers whole fails instead of looping.
MAX_RESUMES = 10

log = Logger()


class ChunkBuffer:
    """
    The bytes of a file from some offset up to what has been received, as
    the chunks they arrived in (so that nothing is copied to append, trim or
    hand to a writer).
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._chunks: list[bytes] = []
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, data: bytes) -> None:
        self._starts.append(self.end)
        self._chunks.append(data)
        self.end += len(data)

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (within one chunk)."""
        assert self.start <= offset <= self.end, "read outside the buffer"
        if offset == self.end:
            return b""
        index = bisect_right(self._starts, offset) - 1
        within = offset - self._starts[index]
        return self._chunks[index][within : within + length]

    def chunks_from(self, offset: int) -> list[bytes]:
        """Everything from ``offset`` on."""
        if offset >= self.end:
            return []
        index = bisect_right(self._starts, offset) - 1
        within = offset - self._starts[index]
        return [self._chunks[index][within:], *self._chunks[index + 1 :]]

    def drop_before(self, offset: int) -> None:
        """Forget the chunks that end at or before ``offset``."""
        if offset >= self.end:
            self._starts.clear()
            self._chunks.clear()
            self.start = self.end
            return
        first_kept = bisect_right(self._starts, offset) - 1
        if first_kept > 0:
            del self._starts[:first_kept]
            del self._chunks[:first_kept]
            self.start = self._starts[0]


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
        self._caching = False
        self._on_disk = 0
        self._writing = False
        self._buffer = ChunkBuffer()
        self._paused_for_memory = False
        self._headers_waiters: list[Deferred[UpstreamResponse]] = []
        self._settled_waiters: list[Deferred[None]] = []
        self._fetching: Optional[Deferred[None]] = None
        #: Fires once the download has ended and its spool is published or gone.
        self.finished: Deferred[None] = Deferred()

    def start(self) -> None:
        Deferred.fromCoroutine(self._run())

    def cancel(self) -> None:
        """Give up (on shutdown): clients are cut off, nothing is published."""
        if self._fetching is not None:
            self._fetching.cancel()

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
        """Bytes of the body held in memory, for the disk or for readers."""
        return len(self._buffer)

    @property
    def ended(self) -> bool:
        return self.complete or self.failure is not None

    # -- what readers use --------------------------------------------------

    def attach(self, reader: "DownloadReader") -> None:
        self.readers.add(reader)

    def detach(self, reader: "DownloadReader") -> None:
        self.readers.discard(reader)
        self.reader_advanced()
        if not self.readers and not self._caching and not self.ended:
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
            assert self._spool is not None
            return self._spool.read(offset, min(length, self._on_disk - offset))
        return self._buffer.read(offset, length)

    def reader_advanced(self) -> None:
        """A reader consumed data: memory no reader needs may go."""
        self._trim_buffer()

    # -- the fetch ----------------------------------------------------------

    async def _run(self) -> None:
        self._fetching = Deferred.fromCoroutine(self._fetch())
        try:
            await self._fetching
            await self._writes_settled()
        except CancelledError:
            failure: Optional[BaseException] = CancelledError("download cancelled")
        except (AllSourcesFailed, BodyFailed) as failed:
            failure = failed
        except Exception as error:
            log.failure("download of {path} failed unexpectedly", path=str(self.key))
            failure = error
        else:
            failure = None
        self._fetching = None
        if failure is None:
            await self._publish()
        else:
            self._fail(failure)
            await self._writes_settled()
            if self._spool is not None:
                self._spool.discard()
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
        resumes = 0
        while True:
            self._current = response
            try:
                await response.stream(self._received_chunk)
                self._check_length()
            except BodyFailed as broken:
                self._upstream.report_body_failure(response.source, self.key, str(broken))
                resumes += 1
                if resumes > MAX_RESUMES:
                    raise
                response = await self._resume_after(response, broken)
            else:
                self._upstream.report_body_complete(response.source)
                break
            finally:
                self._current = None
        self.complete = True
        self._notify_readers()

    def _check_length(self) -> None:
        """
        :raises BodyFailed: if a body ended without the whole file (a
            resumed chunked body can stop short and still end cleanly).
        """
        if self.length is not None and self.received != self.length:
            raise BodyFailed(f"the body ended at byte {self.received} of {self.length}")

    async def _resume_after(
        self, broken_response: UpstreamResponse, broken: BodyFailed
    ) -> UpstreamResponse:
        """
        Ask the other sources for the rest of the file.

        :raises BodyFailed: if the length is unknown (a resumed body could
            not be checked) or no source can resume.
        """
        if self.length is None or self.received >= self.length:
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
        else:
            self._caching = True

    def _received_chunk(self, data: bytes) -> None:
        self._buffer.append(data)
        self.received += len(data)
        self._notify_readers()
        self._write_pending()
        if len(self._buffer) > MEMORY_HIGH_WATER and not self._paused_for_memory:
            if self._current is not None:
                self._paused_for_memory = True
                self._current.pause()

    # -- the spool ------------------------------------------------------------

    def _write_pending(self) -> None:
        """
        Hand what the disk has not got yet to the disk thread, unless a
        write is under way (its completion calls us again).
        """
        if self._writing or not self._caching:
            return
        chunks = self._buffer.chunks_from(self._on_disk)
        if not chunks:
            return
        self._writing = True
        assert self._spool is not None
        written = self._store.in_disk_thread(self._spool.write_all, chunks)
        written.addCallbacks(self._written, self._write_failed)

    def _written(self, count: int) -> None:
        self._writing = False
        self._on_disk += count
        self._trim_buffer()
        self._write_pending()
        self._check_settled()

    def _write_failed(self, failure) -> None:
        self._writing = False
        log.error(
            "writing the spool of {path} failed, no longer caching it: {error}",
            path=str(self.key), error=failure.getErrorMessage(),
        )
        self._stop_caching()
        self._check_settled()

    def _writes_settled(self) -> "Deferred[None]":
        """Fires once every byte received is on disk, or caching stopped."""
        waiter: Deferred[None] = Deferred()
        self._settled_waiters.append(waiter)
        self._check_settled()
        return waiter

    def _check_settled(self) -> None:
        if self._writing or (self._caching and self._on_disk < self.received):
            return
        waiters, self._settled_waiters = self._settled_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _trim_buffer(self) -> None:
        """
        Drop from memory what is on disk (while caching) or what every
        reader has read (once not), and resume a source paused for memory.
        """
        if self._caching:
            needed_from = self._on_disk
        else:
            needed_from = min((reader.offset for reader in self.readers), default=self.received)
        self._buffer.drop_before(needed_from)
        if self._paused_for_memory and len(self._buffer) <= MEMORY_LOW_WATER:
            self._paused_for_memory = False
            if self._current is not None:
                self._current.resume()

    def _stop_caching(self) -> None:
        """
        Carry on without a spool: keep unread bytes in memory, delete the
        spool's name (what was written stays readable for attached readers)
        and let new clients start afresh.
        """
        self._caching = False
        if self._spool is not None:
            self._spool.discard()
        self._retire()

    async def _publish(self) -> None:
        if not self._caching:
            return
        assert self._spool is not None and self.response is not None
        try:
            await self._spool.publish(self.response.last_modified_timestamp)
        except Exception as error:
            log.error("could not publish {path}: {error}", path=str(self.key), error=error)
        else:
            log.info("cached {path} ({length} bytes)", path=str(self.key), length=self.received)
            self._store.published(self.received)

    def _fail(self, reason: BaseException) -> None:
        self.failure = reason
        self._caching = False
        self._retire()
        if not isinstance(reason, (AllSourcesFailed, CancelledError)):
            log.error("download of {path} failed: {reason}", path=str(self.key), reason=reason)
        for waiter in self._headers_waiters:
            waiter.errback(reason)
        self._headers_waiters.clear()
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

    def _close_spool_if_unused(self) -> None:
        if self.finished.called and not self.readers:
            if self._spool is not None:
                self._spool.close()
                self._spool = None
            self._buffer.drop_before(self.received)


class Downloads:
    """
    The downloads in progress, one per path: a client asking for a path
    that is being downloaded joins that download.
    """

    def __init__(self, store: CacheStore, upstream: UpstreamClient) -> None:
        self._store = store
        self._upstream = upstream
        self._by_key: dict[CacheKey, Download] = {}
        # Includes downloads no client can join any more (spool lost, or
        # failed and winding down): they still run until they end.
        self._running: set[Download] = set()

    def join_or_start(self, key: CacheKey) -> tuple[Download, bool]:
        """
        :return: the download of ``key``, and whether it was already running.
        """
        download = self._by_key.get(key)
        if download is not None and download.accepting_readers:
            return download, True
        download = Download(key, self._store, self._upstream, self._retired)
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

    def cancel_all(self) -> None:
        for download in list(self._running):
            download.cancel()

    def _retired(self, download: Download) -> None:
        if self._by_key.get(download.key) is download:
            del self._by_key[download.key]

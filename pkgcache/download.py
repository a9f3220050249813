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

A miss of an immutable file is shared with the other processes on the
cache directory (:mod:`pkgcache.shared_spool`): its download claims the
spool named by its key before it asks any source.  If another process
holds it, the download *follows* that process's download instead of
fetching: its clients get the headers that process recorded and the bytes
as they reach its spool, read back with ``pread`` (nothing is held in
memory), learning of new ones by looking at the spool every few
milliseconds while a client waits for them.  Its downloader gone before
the headers (given up at its shutdown, taken over after a crash), it
claims the file again; gone after them, without the whole file, its
followers cut their clients off, as for a body that breaks off here.
Revalidations and volatile files stay with the process that asked: their
publication depends on what that process knows (validators, the suite a
Debian index belongs to).
"""

from __future__ import annotations

import enum
import hashlib
from typing import Callable, Optional

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

from pkgcache.chunks import ChunkBuffer
from pkgcache.interfaces import IByteSource, IFollower, IPublicationCheck
from pkgcache.metadata import EntryMetadata
from pkgcache.paths import CacheKey
from pkgcache.shared_spool import (
    FollowedHeaders, FollowedResponse, SpoolFollower, SpoolRecord, SpoolUnshared, failure_record,
)
from pkgcache.spool import SpoolWriter
from pkgcache.sources import AllSourcesFailed
from pkgcache.store import CachedFile, CacheStore, StoreClosed
from pkgcache.upstream import BodyFailed, BodyTooLarge, UpstreamClient, UpstreamResponse

#: The source is paused when this much of its body waits in memory (for the
#: disk or, once the spool is lost, for the slowest follower), and resumed
#: when that is back under the low mark.
MEMORY_HIGH_WATER = 4 * 1024 * 1024
MEMORY_LOW_WATER = 1024 * 1024
#: A body that breaks off is resumed from another source, this many times
#: at most, so that a file no source delivers whole fails instead of looping.
MAX_RESUMES = 10
#: How often a download that follows another process's looks at its spool,
#: while a client waits (for the headers, or for bytes it has not got yet).
FOLLOW_POLL_INTERVAL = 0.005
#: How often a shared download's record is rewritten while nothing else
#: changes, so that its followers know it is alive (at most a quarter of
#: the idle timeout, which is how long they wait for a sign of life).
HEARTBEAT_INTERVAL = 1.0
#: A download claims the file again at most this many times after the one
#: it followed vanished before its headers; then it fetches on its own.
MAX_CLAIMS = 10

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


class _Followed(enum.Enum):
    """How following another process's download ended."""

    #: followed to its end: the whole file was read (and maybe published)
    DONE = "done"
    #: it vanished before its headers: claim the file again
    CLAIM = "claim"
    #: it cannot be followed (or hangs): fetch the file here, unshared
    FETCH = "fetch"


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

    With ``shared``, it claims the file's shared spool when started, and
    follows the process that holds it if another does (:attr:`following`).
    """

    #: (Its followers read it: a spool is not sent with ``sendfile``.)
    fd = None

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
        shared: bool = False,
        on_finished: Optional[Callable[["Download"], None]] = None,
        via: Optional[bytes] = None,
        peer_path: Optional[bytes] = None,
    ) -> None:
        self.key = key
        self._peer_path = peer_path
        self._clock = clock
        self._stale = revalidating
        self.revalidating = revalidating is not None
        self._conditional = conditional
        self._via = via
        self._cancel_asked = False
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
        self._shared = shared
        self._on_finished = on_finished
        self._ended = False
        self._finished_waiters: list[Deferred[None]] = []
        # Owning the shared spool: what it says to followers, and its beat.
        self._record: Optional[SpoolRecord] = None
        self._heartbeat: Optional[LoopingCall] = None
        # Following: another process's spool, or the copy it published.
        self._remote: Optional[SpoolFollower] = None
        self._copy: Optional[CachedFile] = None
        self._asleep: Optional[Deferred[None]] = None

    def start(self) -> None:
        if self._shared:
            self._claim()
        Deferred.fromCoroutine(self._run()).addErrback(
            lambda failure: log.failure("download of {path} broke", failure, path=str(self.key))
        )

    @property
    def finished(self) -> "Deferred[None]":
        """
        Fires once it is over and its spool published or gone (a Deferred
        of the caller's own: a download that follows another process's
        looks at its spool only while someone waits).
        """
        if self._ended:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._finished_waiters.append(waiter)
        self._wake()
        return waiter

    @property
    def following(self) -> bool:
        """It follows another process's download (or serves what that published)."""
        return self._remote is not None or self._copy is not None

    @property
    def holds_shared_spool(self) -> bool:
        """It still holds the shared spool of its key (until published or removed)."""
        return self._record is not None and self._spool is not None and self._spool.locked

    @property
    def caching(self) -> bool:
        """The body is being spooled (or is, whole), to be published."""
        return self.state in (DownloadState.RECEIVING, DownloadState.COMPLETE) and (
            self._spool is not None or self._remote is not None
        )

    def cancel(self) -> None:
        """Give up (on shutdown): followers are cut off, nothing is published."""
        # Asked from within the fetch itself (a follower's client served
        # whole as it is told of new bytes), cancelling the fetch's
        # Deferred does nothing: the fetch sees this at its next wait.
        self._cancel_asked = True
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
            self._wake()
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
        self._wake()

    def detach(self, follower: IFollower) -> None:
        self.followers.discard(follower)
        self.follower_advanced()
        if not self.followers and self.state is DownloadState.UNCACHED and not (
            # Every byte is in (the last client took the last one): the
            # source is ending the body, and cutting it now would only
            # spoil a connection that is going back to the pool.
            self.length is not None and self.received >= self.length
        ):
            log.info("all clients of {path} left and it cannot be cached: stopping",
                     path=str(self.key))
            self.cancel()
        if self.following and not self._ended and not (
            self.followers or self._headers_waiters or self._finished_waiters
        ):
            # Another process downloads it: nobody here needs to watch.
            self.cancel()
        self._release_if_unused()

    def read(self, offset: int, length: int) -> bytes:
        """
        Up to ``length`` bytes of the file from ``offset``, of those received
        so far (``b""`` if none yet).
        """
        reader = self._remote if self._remote is not None else self._copy
        if reader is not None:
            available = min(length, self.received - offset)
            return reader.read(offset, available) if available > 0 else b""
        if self._spool is not None and offset < self._spool.written:
            return self._spool.read(offset, length)
        return self._buffer.read(offset, length)

    def follower_advanced(self) -> None:
        """A follower read on: memory nobody needs may go."""
        self._trim_buffer()
        self._wake()

    # -- the fetch ------------------------------------------------------------

    async def _run(self) -> None:
        try:
            # Only the fetch can be cancelled: a publication once begun ends.
            self._fetching = Deferred.fromCoroutine(self._obtain())
            await self._fetching
        except CancelledError:
            # (A follower nobody needs any more may be cancelled once complete.)
            if self.state is not DownloadState.COMPLETE:
                self._fail(CancelledError("download cancelled"))
        except (AllSourcesFailed, BodyFailed) as failed:
            self._fail(failed)
        except Exception as error:
            log.failure("download of {path} failed unexpectedly", path=str(self.key))
            self._fail(error)
        else:
            if not self.following:
                await self._publish()
        finally:
            self._fetching = None
            self._stop_heartbeat()
            if self._spool is not None:
                await self._spool.discard(self._last_record())
            if self._stale is not None:
                self._stale.close()
                self._stale = None
            self._retire()
            self._ended = True
            waiters, self._finished_waiters = self._finished_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            on_finished, self._on_finished = self._on_finished, None
            if on_finished is not None:
                on_finished(self)
            self._release_if_unused()

    async def _obtain(self) -> None:
        """
        Get the file: from the sources, or by following the process that
        is downloading it (or serving the copy it has just published).
        """
        claims = 1
        while self._remote is not None:
            followed = await self._follow()
            if followed is _Followed.DONE:
                return
            self._remote.close()
            self._remote = None
            if followed is _Followed.CLAIM and claims < MAX_CLAIMS:
                claims += 1
                self._claim()
        if self._record is not None:
            # Claimed: unless the file was published since it was missed.
            try:
                copy = self._store.open_file(self.key)
            except OSError:
                copy = None
            if copy is not None:
                await self._give_up_claim()
                self._serve_copy(copy)
                return
        await self._fetch()

    async def _fetch(self) -> None:
        """Fetch and spool the whole body, holding one of the download slots."""
        await self._slots.acquire()
        self.has_slot = True
        try:
            validators = self._stale if self._conditional else None
            response = await self._upstream.fetch(
                self.key, revalidating=validators.metadata if validators is not None else None,
                via=self._via, peer_path=self._peer_path,
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
        if self._spool is None:
            self._spool = self._open_spool()
        elif self._record is not None:
            self._record.headers = FollowedHeaders.of(
                response,
                length=self.length,
                last_modified=self.last_modified,
                checked=self.checked_at,
            )
            self._mark()
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
                via=self._via,
            )
        except AllSourcesFailed as failed:
            raise BodyFailed(f"{broken}; no source could resume: {failed}") from None

    # -- one download per file across processes ---------------------------------

    def _claim(self) -> None:
        """Claim the shared spool of the key, or follow the process that holds it."""
        try:
            claimed = self._store.new_spool(self.key, shared=True)
        except OSError as error:
            # Then fetched unshared, spooled (or not) as any other download.
            log.warn("cannot share the download of {path} with other processes: {error}",
                     path=str(self.key), error=error)
            return
        if isinstance(claimed, SpoolFollower):
            self._remote = claimed
            return
        self._spool = claimed
        claimed.on_written = self._spool_progressed
        # Nothing to mark yet: followers read a spool with no record as
        # this one (no headers, no beat), and a disk job now would delay
        # the request to the source.
        self._record = SpoolRecord()
        interval = max(0.01, min(HEARTBEAT_INTERVAL, self._upstream.idle_timeout / 4))
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self._clock
        self._heartbeat.start(interval, now=False).addErrback(
            lambda failure: log.failure("heartbeat of {path} broke", failure, path=str(self.key))
        )

    def _mark(self) -> None:
        """Tell followers in other processes where the download stands."""
        if self._record is not None and self._spool is not None:
            self._spool.mark(self._record.encode())

    def _beat(self) -> None:
        assert self._record is not None
        self._record.beat += 1
        self._mark()

    def _stop_heartbeat(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and heartbeat.running:
            heartbeat.stop()

    def _last_record(self) -> Optional[bytes]:
        """What followers are told as the shared spool goes: complete, or why not."""
        record = self._record
        if record is None:
            return None
        assert self._spool is not None
        if self.state is DownloadState.COMPLETE and self._spool.failure is None:
            record.end, record.received = "complete", self.received
        else:
            record.end = "failed"
            record.failure = failure_record(
                self.failure if self.failure is not None else CancelledError("given up")
            )
        return record.encode()

    async def _give_up_claim(self) -> None:
        """Let the shared spool go unused (the file is in the cache already)."""
        self._stop_heartbeat()
        spool, record = self._spool, self._record
        self._spool = self._record = None
        assert spool is not None and record is not None
        record.end, record.failure = "failed", {"reason": "published meanwhile"}
        await spool.discard(record.encode())
        spool.close()

    def _serve_copy(self, copy: CachedFile) -> None:
        """Answer from a copy that another process published just now."""
        self._copy = copy
        self.received = copy.size
        self._follow_headers(FollowedHeaders.of_published(copy.metadata, copy.size, copy.mtime))
        self.state = DownloadState.COMPLETE
        self.published = True
        self._notify_followers()

    async def _follow(self) -> _Followed:
        """
        Follow another process's download of the file, through its spool,
        until it ends (or until nobody here waits for it: see :meth:`detach`).

        :raises AllSourcesFailed: if no source provided it (the other
            process's sources are ours).
        :raises BodyFailed: if it ended, after its headers, without the
            whole file: its process failed, gave it up or died, or stopped
            showing any sign of life for the idle timeout.
        """
        remote = self._remote
        assert remote is not None
        stall_limit = self._upstream.idle_timeout
        quiet_since = self._clock.seconds()
        while True:
            try:
                changed = remote.poll()
            except (SpoolUnshared, OSError) as error:
                if self.response is not None:
                    raise BodyFailed(f"the spool of another pkgcache process broke: {error}")
                log.info("fetching {path} here: the download in another process cannot be "
                         "followed ({error})", path=str(self.key), error=error)
                return _Followed.FETCH
            if remote.headers is not None and self.response is None:
                self._follow_headers(remote.headers)
            if self.response is not None:
                arrived = remote.size if self.length is None else min(remote.size, self.length)
                if arrived > self.received:
                    self.received = arrived
                    self._notify_followers()
            if remote.complete and self.state is DownloadState.RECEIVING:
                self.state = DownloadState.COMPLETE
                self._notify_followers()
            if remote.ended:
                if self.state is DownloadState.COMPLETE:
                    self.published = remote.published
                    return _Followed.DONE
                if self.response is None:
                    if remote.sources_failure is not None:
                        raise remote.sources_failure
                    return _Followed.CLAIM
                raise BodyFailed(f"the pkgcache process downloading it {remote.reason}")
            now = self._clock.seconds()
            if changed:
                quiet_since = now
            elif self.state is not DownloadState.COMPLETE and now - quiet_since >= stall_limit:
                if self.response is None:
                    log.warn("fetching {path} here: the process downloading it showed no sign "
                             "of life for {seconds:g}s", path=str(self.key), seconds=stall_limit)
                    return _Followed.FETCH
                raise BodyFailed(
                    f"the pkgcache process downloading it stopped for {stall_limit:g}s"
                )
            if await self._next_poll():
                # Nobody waited, so nobody looked: that silence was ours.
                quiet_since = self._clock.seconds()

    def _follow_headers(self, headers: FollowedHeaders) -> None:
        self.response = FollowedResponse(headers)  # type: ignore[assignment]
        self.length = headers.length
        self.last_modified = headers.last_modified
        self.checked_at = headers.checked
        self.state = DownloadState.RECEIVING
        waiters, self._headers_waiters = self._headers_waiters, []
        for waiter in waiters:
            waiter.callback(self.response)

    def _waiting_here(self) -> bool:
        """Someone here waits for what a followed download does next."""
        return bool(self._headers_waiters or self._finished_waiters) or any(
            follower.needed_from >= self.received for follower in self.followers
        )

    async def _next_poll(self) -> bool:
        """
        Wait until the spool is worth another look: soon while someone
        waits, else until someone does.

        :return: whether it waited for someone (rather than for the clock).
        """
        if self._cancel_asked:
            raise CancelledError("given up")
        if self._waiting_here():
            await deferLater(self._clock, FOLLOW_POLL_INTERVAL, lambda: None)
            return False
        self._asleep = Deferred()
        try:
            await self._asleep
        finally:
            self._asleep = None
        return True

    def _wake(self) -> None:
        if self._asleep is not None and self._waiting_here():
            asleep, self._asleep = self._asleep, None
            asleep.callback(None)

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
        if self.holds_shared_spool:
            # Let the file go now: other processes' clients start afresh
            # (their own download, if they have nothing yet).
            assert self._spool is not None and self._record is not None
            self._stop_heartbeat()
            self._record.end = "failed"
            self._record.failure = {"reason": "the spool could not be written"}
            releasing = Deferred.fromCoroutine(self._spool.discard(self._record.encode()))
            releasing.addErrback(lambda failure: log.failure(
                "could not release the spool of {path}", failure, path=str(self.key)))
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
        if self._record is not None:
            # Followers may finish their clients now, as ours did.
            self._stop_heartbeat()
            self._record.end = "complete"
            self._record.received = self.received
            self._mark()
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
        if self._ended and not self.followers:
            if self._spool is not None:
                self._spool.close()
                self._spool = None
            if self._remote is not None:
                self._remote.close()
                self._remote = None
            if self._copy is not None:
                self._copy.close()
                self._copy = None
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
        via: Optional[bytes] = None,
        peer_path: Optional[bytes] = None,
    ) -> tuple[Download, bool]:
        """
        :param revalidating: the stale copy of ``key``, to revalidate; the
            download closes it once done (at once, if one was running).
        :param conditional: send the copy's validators (not for a copy
            known to be wrong: its source would confirm it with a 304).
        :param volatile: the file may change in place: its digest is kept,
            and the publication check is asked before it is published.
        :param via: the ``Via`` of its requests to the sources (that of the
            client request that starts it, with this node: pkgcache.via).
        :param peer_path: the path to ask the peers for, if they are to be
            asked (see :meth:`UpstreamClient.fetch`).
        :return: the download of ``key``, and whether it was already running
            (here, or in another process that it follows).
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
            # One of ours that failed may still hold the key's spool for
            # a moment: this one is not to follow it.
            shared=revalidating is None and not volatile and not any(
                running.key == key and running.holds_shared_spool for running in self._running
            ),
            on_finished=self._running.discard,
            via=via,
            peer_path=peer_path,
        )
        self._by_key[key] = download
        self._running.add(download)
        download.start()
        return download, download.following

    def in_flight(self, key: CacheKey) -> Optional[Download]:
        """The download of ``key`` that a new client would join, if any."""
        return self._by_key.get(key)

    def __len__(self) -> int:
        """Downloads from the sources (not those following another process's)."""
        return sum(1 for download in self._running if not download.following)

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

"""
One client's view of a download: a producer that follows the spool as it grows.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from pkgcache.download import Download

#: How much one write to the client takes from the spool, like static.File.
CHUNK_SIZE = 64 * 1024

log = Logger()


@implementer(IPushProducer)
class DownloadReader:
    """
    Streams bytes ``start`` to ``end`` (exclusive; the whole file if
    ``None``) of a download to one client, as they arrive and as fast as the
    client takes them.

    The client's transport pauses and resumes us; the download tells us when
    there is more to read.  So a slow client only falls behind in the spool
    file, never in memory, and never slows the download or anyone else.

    If the download fails, the response is never finished: the connection
    is closed after fewer bytes than ``Content-Length`` announced, or with
    no last chunk, so that the client's download tool reports an error
    (curl: exit 18, partial file) instead of taking a short body for a
    whole file; where neither would show (HTTP/1.0 without a length), the
    connection is reset.

    A client that takes nothing for ``stall_timeout`` seconds is dropped:
    Twisted suspends a connection's idle timeout while a request is being
    answered, so a client that stops reading would otherwise hold its
    connection and a descriptor of the spool for ever.

    :ivar offset: the next byte to send.
    """

    def __init__(
        self,
        download: Download,
        request: Request,
        start: int = 0,
        end: Optional[int] = None,
        *,
        clock: IReactorTime,
        stall_timeout: float,
    ) -> None:
        self._download = download
        self._request = request
        self.offset = start
        self._end = end
        self._paused = False
        self._pumping = False
        self._done = False
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._stalled: Optional[IDelayedCall] = None

    def begin(self) -> None:
        """Start streaming; the request's headers must be set already."""
        self._request.notifyFinish().addErrback(lambda _: self._client_gone())
        self._download.attach(self)
        self._request.registerProducer(self, True)
        self._pump()

    def data_available(self) -> None:
        """The download has more bytes, or has ended."""
        if not self._paused:
            self._pump()

    # IPushProducer, driven by the client's transport

    def pauseProducing(self) -> None:
        self._paused = True
        if self._stalled is None:
            self._stalled = self._clock.callLater(self._stall_timeout, self._drop_stalled)

    def resumeProducing(self) -> None:
        self._paused = False
        self._stop_stall_timer()
        self._pump()

    def stopProducing(self) -> None:
        self._client_gone()

    # internals

    def _stop_at(self) -> Optional[int]:
        return self._end if self._end is not None else self._download.length

    def _pump(self) -> None:
        if self._pumping or self._done:
            return
        self._pumping = True
        try:
            while not self._paused and not self._done:
                if not self._send_some():
                    break
        finally:
            self._pumping = False
        self._download.reader_advanced()

    def _send_some(self) -> bool:
        """
        Send what is available, or end the response if nothing more will be.

        :return: whether there may be more to send right away.
        """
        download = self._download
        stop = self._stop_at()
        if stop is not None and self.offset >= stop:
            self._finish()
            return False
        wanted = CHUNK_SIZE if stop is None else min(CHUNK_SIZE, stop - self.offset)
        available = min(wanted, download.received - self.offset)
        if available > 0:
            data = download.read(self.offset, available)
            self.offset += len(data)
            self._request.write(data)
            return True
        if download.failure is not None:
            self._abort()
        elif download.complete:
            self._finish()
        return False

    def _finish(self) -> None:
        self._done = True
        self._stop_stall_timer()
        self._request.unregisterProducer()
        self._request.finish()
        self._download.detach(self)

    def _abort(self) -> None:
        self._done = True
        self._request.unregisterProducer()
        request = self._request
        if request.responseHeaders.hasHeader(b"content-length") or request.chunked:
            # The client can tell this close from a complete response.  The
            # stall timer still drops it if it never reads what is buffered.
            request.transport.loseConnection()
            if self._stalled is None:
                self._stalled = self._clock.callLater(self._stall_timeout, self._drop_stalled)
        else:
            request.transport.abortConnection()
        self._download.detach(self)

    def _drop_stalled(self) -> None:
        self._stalled = None
        log.info(
            "dropping a client of {path} that took nothing for {seconds:g}s",
            path=str(self._download.key), seconds=self._stall_timeout,
        )
        # Not loseConnection: that would wait for the client to read what
        # is buffered, which it will not.
        self._request.transport.abortConnection()

    def _stop_stall_timer(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _client_gone(self) -> None:
        self._stop_stall_timer()
        if not self._done:
            self._done = True
            self._download.detach(self)

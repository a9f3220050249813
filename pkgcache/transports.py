"""
The transport of a connection a serving port accepted: Twisted's TCP or
unix transport, with two changes that make a hit cheaper.

- It sends a file's bytes itself (:meth:`ISendsFiles.send_file`) with
  ``os.sendfile``: from the page cache to the socket, with no read into
  Python and no write out of it.  Twisted's transports have no way to.
- Writes wait for the end of the reactor turn, and go out then in one
  ``send`` (:class:`_TurnEndWrites`), without registering the socket with
  the poller unless it cannot take them all.

The serving ports make their connections with these
(:func:`serving_transports_on`).  A body producer that finds a transport
whose class has no ``send_file`` reads and writes as before: an
embedder's own port, and TLS (Twisted's TLS wrapper of one of these
provides ``ISendsFiles`` too, and would forward ``send_file`` to it: past
the encryption).
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Optional

from twisted.internet import main, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import Interface, implementer

log = Logger()

#: What ``sendfile`` says when the file cannot be sent from (a file system
#: without it): the bytes are read and written instead.
_UNSUPPORTED = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))

#: What ``sendfile`` says when the client is gone (anything else is the
#: file's fault, and logged).
_CLIENT_GONE = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ETIMEDOUT))


class IFileSender(Interface):
    """Who asked for a file to be sent: told how it goes."""

    def file_progressed(count: int) -> None:
        """``count`` more bytes went to the socket."""

    def file_sent() -> None:
        """All of them went."""

    def file_unsendable() -> None:
        """None went, and none can this way: read and write them instead."""


class ISendsFiles(Interface):
    """A transport that can send a file's bytes itself."""

    def send_file(fd: int, offset: int, count: int, sender: IFileSender) -> None:
        """
        Send ``count`` bytes of the open file ``fd`` from ``offset``, after
        whatever was written before.  If the connection is lost first, the
        sender hears nothing more (its protocol is told as ever).
        """


class _FileJob:
    """A part of a file still to send."""

    __slots__ = ("fd", "start", "offset", "end", "sender")

    def __init__(self, fd: int, offset: int, end: int, sender: IFileSender) -> None:
        self.fd = fd
        self.start = self.offset = offset
        self.end = end
        self.sender = sender


class _TurnEndWrites:
    """
    Writes what connections were given during a reactor turn at the end of
    that turn: most answers go out in one ``send`` then, and a connection
    is registered with the poller for writing only if the socket cannot
    take all of it (Twisted registers on every write and unregisters once
    sent: two ``epoll_ctl`` calls per answer).
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._waiting: list = []
        self._call = None

    def add(self, transport: "ServingTransport") -> None:
        self._waiting.append(transport)
        if self._call is None:
            self._call = self._reactor.callLater(0, self._write)

    def _write(self) -> None:
        self._call = None
        waiting, self._waiting = self._waiting, []
        for transport in waiting:
            transport._write_at_turn_end()


_turn_end_writes: dict = {}


@implementer(ISendsFiles)
class ServingTransport:
    """
    Mixed into a Twisted stream transport (a subclass of
    :class:`twisted.internet.abstract.FileDescriptor`): :meth:`send_file`,
    whose job waits until the transport's own buffer is written, then each
    time the socket can take more, sends what it can with one
    ``sendfile``; and writes at the end of the reactor turn.
    """

    _file_job: Optional[_FileJob] = None
    #: A close asked for while a file is being sent, done once it is.
    _close_after_file: Optional[Callable[[], None]] = None
    _write_registered = False
    _write_waiting = False

    def send_file(self, fd: int, offset: int, count: int, sender: IFileSender) -> None:
        if self._file_job is not None:
            raise RuntimeError("a file is being sent on this connection already")
        self._file_job = _FileJob(fd, offset, offset + count, sender)
        self.startWriting()

    def startWriting(self) -> None:
        if not self._write_registered and not self._write_waiting:
            self._write_waiting = True
            writes = _turn_end_writes.get(self.reactor)
            if writes is None:
                writes = _turn_end_writes[self.reactor] = _TurnEndWrites(self.reactor)
            writes.add(self)

    def stopWriting(self) -> None:
        if self._write_registered:
            self._write_registered = False
            super().stopWriting()

    def _register_writing(self) -> None:
        if not self._write_registered:
            self._write_registered = True
            super().startWriting()

    def _write_at_turn_end(self) -> None:
        self._write_waiting = False
        if self._write_registered or not self.connected:
            return
        try:
            result = self.doWrite()
        except Exception:
            # (From a producer the drained buffer resumed.)  As the reactor
            # does for a writer that raises: logged, and the connection
            # dropped; the other connections of the turn still write.
            log.failure("writing to a client failed")
            self.abortConnection()
            return
        # Whatever the write leaves (bytes the socket did not take, a file
        # still to send, a close or an error to act on), the poller's turn
        # does, as for any registered writer.
        if result is not None or self._pending():
            self._register_writing()

    def _pending(self) -> bool:
        return (self.offset < len(self.dataBuffer) or bool(self._tempDataLen)
                or self._file_job is not None)

    def doWrite(self):
        while self._file_job is not None:
            job = self._file_job
            if self.offset < len(self.dataBuffer) or self._tempDataLen:
                # What was written before the file goes first.
                result = super().doWrite()
                if result or self.offset < len(self.dataBuffer) or self._tempDataLen:
                    return result
            try:
                sent = os.sendfile(self.fileno(), job.fd, job.offset, job.end - job.offset)
            except BlockingIOError:
                self._register_writing()
                return None
            except OSError as error:
                if error.errno in _UNSUPPORTED and job.offset == job.start:
                    self._file_job = None
                    job.sender.file_unsendable()
                    continue
                if error.errno not in _CLIENT_GONE:
                    log.error("sending a cached file failed: {error}", error=error)
                return main.CONNECTION_LOST
            if sent == 0:
                log.error("a cached file ended {missing} bytes before its size",
                          missing=job.end - job.offset)
                return main.CONNECTION_LOST
            job.offset += sent
            job.sender.file_progressed(sent)
            if job.offset < job.end:
                self._register_writing()
                return None
            self._file_job = None
            job.sender.file_sent()  # (which may send the next part of a file)
            if self._file_job is None and self._close_after_file is not None:
                close, self._close_after_file = self._close_after_file, None
                close()
        # Whatever the sender wrote after its file, or a close it asked for.
        return super().doWrite()

    def loseConnection(self, *args, **kwargs) -> None:
        """Close once what was written, and the file being sent, are out."""
        if self._file_job is not None:
            self._close_after_file = lambda: self.loseConnection(*args, **kwargs)
            return
        super().loseConnection(*args, **kwargs)
        # Registered at once: a connection that reads no more must be
        # among the reactor's writers, so that a shutdown now closes it.
        if self.disconnecting:
            self._register_writing()

    def loseWriteConnection(self) -> None:
        if self._file_job is not None:
            self._close_after_file = self.loseWriteConnection
            return
        super().loseWriteConnection()

    def connectionLost(self, reason) -> None:
        self._file_job = self._close_after_file = None
        super().connectionLost(reason)


class ServingTCPTransport(ServingTransport, tcp.Server):
    """A TCP connection a serving port accepted."""


class ServingUNIXTransport(ServingTransport, unix.Server):
    """A unix socket connection a serving port accepted."""


_SERVING = {tcp.Server: ServingTCPTransport, unix.Server: ServingUNIXTransport}


def serving_transports_on(port: IListeningPort) -> IListeningPort:
    """
    Make the connections ``port`` accepts from now on
    :class:`ServingTransport` s, if it is a TCP or unix port of Twisted's
    (an ``ssl:`` one is TCP: its connections write at the turn's end, but
    cannot send files past TLS).

    :return: ``port``
    """
    transport = getattr(port, "transport", None)
    if transport in _SERVING:
        port.transport = _SERVING[transport]
    return port


@implementer(IStreamServerEndpoint)
class ServingEndpoint:
    """An endpoint whose ports make :class:`ServingTransport` s."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint

    def listen(self, factory) -> "Deferred[IListeningPort]":
        return self._endpoint.listen(factory).addCallback(serving_transports_on)

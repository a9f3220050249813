"""
Sending a cached file to a client with ``os.sendfile``: the kernel moves
the bytes from the page cache to the socket, with no read into Python and
no write out of it.

Twisted's transports have no way to do this, so the serving ports make
their connections with :class:`FileSendingTCPServer` and
:class:`FileSendingUNIXServer` (:func:`send_files_on`), which add
:meth:`~ISendsFiles.send_file` to the transport.  A body producer that
finds a transport without it (TLS, or an embedder's own port) reads and
writes as before.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

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


@implementer(ISendsFiles)
class FileSendingMixin:
    """
    :meth:`send_file` for a Twisted stream transport (a subclass of
    :class:`twisted.internet.abstract.FileDescriptor`): the job waits until
    the transport's own buffer is written, then each time the socket can
    take more, one ``sendfile`` sends what it can.
    """

    _file_job: Optional[_FileJob] = None

    def send_file(self, fd: int, offset: int, count: int, sender: IFileSender) -> None:
        if self._file_job is not None:
            raise RuntimeError("a file is being sent on this connection already")
        self._file_job = _FileJob(fd, offset, offset + count, sender)
        self.startWriting()

    def doWrite(self):
        while self._file_job is not None:
            job = self._file_job
            if self.offset < len(self.dataBuffer) or self._tempDataLen:
                # What was written before the file goes first.
                result = super().doWrite()
                if result or self.offset < len(self.dataBuffer) or self._tempDataLen:
                    return result
                self.startWriting()  # (the write above stopped, its buffer empty)
            try:
                sent = os.sendfile(self.fileno(), job.fd, job.offset, job.end - job.offset)
            except BlockingIOError:
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
                return None
            self._file_job = None
            job.sender.file_sent()  # (which may send the next part of a file)
        # Whatever the sender wrote after its file, or a close it asked for.
        return super().doWrite()

    def connectionLost(self, reason) -> None:
        self._file_job = None
        super().connectionLost(reason)


class FileSendingTCPServer(FileSendingMixin, tcp.Server):
    """A TCP connection a serving port accepted, that can send files."""


class FileSendingUNIXServer(FileSendingMixin, unix.Server):
    """A unix socket connection a serving port accepted, that can send files."""


_FILE_SENDING = {tcp.Server: FileSendingTCPServer, unix.Server: FileSendingUNIXServer}


def send_files_on(port: IListeningPort) -> IListeningPort:
    """
    Make the connections ``port`` accepts from now on able to send files,
    if it is a TCP or unix port of Twisted's (an ``ssl:`` one is TCP, but
    its connections' protocol is TLS, which this cannot bypass).

    :return: ``port``
    """
    transport = getattr(port, "transport", None)
    if transport in _FILE_SENDING:
        port.transport = _FILE_SENDING[transport]
    return port


@implementer(IStreamServerEndpoint)
class FileSendingEndpoint:
    """An endpoint whose ports' connections can send files (:func:`send_files_on`)."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint

    def listen(self, factory) -> "Deferred[IListeningPort]":
        return self._endpoint.listen(factory).addCallback(send_files_on)

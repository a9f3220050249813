"""
An access log in the combined log format, with the cache outcome appended::

    10.0.0.7 - - [25/Nov/2026:05:49:10 +0000] "GET /distfiles/x HTTP/1.1" 200 5000000 "-" "Wget/1.21" miss

The last field is ``hit``, ``miss``, ``coalesced`` or ``error``, followed by
``dropped`` when the connection was cut before the response was complete.

Lines are kept in memory and written together, whole, in one ``write``
call: at most :data:`FLUSH_INTERVAL` seconds after the first of them, at
once when :data:`FLUSH_BYTES` are waiting, and at :meth:`AccessLog.close`.
So a request costs no system call for its line, and on a file opened with
``O_APPEND`` the lines of several processes sharing it (workers) never
mix; on standard output (a pipe, the journal) each write is cut at line
ends to at most ``PIPE_BUF`` bytes, which a pipe keeps whole.
:meth:`AccessLog.reopen` opens the file again by its name, after a
rotation (on SIGHUP).
"""

from __future__ import annotations

import os
import re
import select
from typing import BinaryIO, Iterable, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.http import datetimeToLogString
from twisted.web.server import Request

from pkgcache.forwarded import TrustedProxies
from pkgcache.outcomes import Outcome

#: The longest a line waits in memory, in seconds.
FLUSH_INTERVAL = 1.0
#: Write at once when this many bytes of lines are waiting (a burst of
#: requests keeps memory bounded, and each write well under a pipe's buffer).
FLUSH_BYTES = 32 * 1024

#: A byte a quoted field cannot hold as it is.
_UNSAFE = re.compile(rb'[^\x20-\x7e]|["\\]')

log = Logger()


def _escape(match: "re.Match[bytes]") -> bytes:
    byte = match.group()
    return b"\\" + byte if byte in b'"\\' else b"\\x%02x" % byte[0]


def _quoted(value: Optional[bytes]) -> str:
    """
    A request line or header for a quoted field, escaped as Apache does, so
    that nothing a client sends can break the line into other fields.
    """
    if not value:
        return "-"
    return _UNSAFE.sub(_escape, value).decode("ascii")


class _AppendingFile:
    """A file written by ``O_APPEND`` writes of whole batches, reopened by name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes) -> int:
        return os.write(self._fd, data)

    def flush(self) -> None:
        pass

    def reopen(self) -> None:
        """:raises OSError: if it cannot be opened again (the old file is then kept)."""
        old, self._fd = self._fd, self._open()
        os.close(old)


def whole_lines(data: bytes, size: int) -> Iterable[bytes]:
    """``data`` in pieces of whole lines, of ``size`` bytes at most unless one line is longer."""
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + size) + 1
        if end <= start:
            end = data.find(b"\n", start) + 1 or len(data)
        yield data[start:end]
        start = end


class _StandardOutput:
    """
    Standard output, maybe shared with other processes: a pipe keeps a
    ``write`` whole only up to ``PIPE_BUF`` bytes, so a batch is written in
    pieces that size at most, each of whole lines (a longer line alone).
    """

    def write(self, data: bytes) -> int:
        for piece in whole_lines(data, select.PIPE_BUF):
            while piece:
                piece = piece[os.write(1, piece):]
        return len(data)

    def flush(self) -> None:
        pass


class AccessLog:
    """
    Appends one line per request to a binary stream (a file opened for
    appending, or standard output), in batches (see the module).

    :param stream: what lines are written to: each batch is one call of
        its ``write`` (then of its ``flush``).
    :param clock: gives the time each line is stamped with, and runs the
        flush that follows the first line of a batch.
    :param trusted_proxies: peers whose ``Forwarded``/``X-Forwarded-For``
        says who the client is (see :mod:`pkgcache.forwarded`).
    """

    def __init__(
        self, stream: BinaryIO, clock, trusted_proxies: TrustedProxies = TrustedProxies()
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._trusted_proxies = trusted_proxies
        self._lines: list[bytes] = []
        self._waiting = 0
        self._flush_call: Optional[IDelayedCall] = None
        self._buffering = True
        # The time stamp, made once a second.
        self._second: Optional[int] = None
        self._stamp = ""

    @classmethod
    def open(
        cls, path: str, clock, trusted_proxies: TrustedProxies = TrustedProxies()
    ) -> "AccessLog":
        """
        ``path``, opened for appending (``O_APPEND``, no buffer of its own);
        ``-`` is standard output.

        :raises OSError: if the file cannot be opened.
        """
        stream = _StandardOutput() if path == "-" else _AppendingFile(path)
        return cls(stream, clock, trusted_proxies)

    def reopen(self) -> None:
        """
        Write the lines waiting, then open the file again by its name (after
        a rotation moved it away); standard output stays as it is.  If it
        cannot be opened, the lines go on to the old file, and this is logged.
        """
        self.flush()
        if not isinstance(self._stream, _AppendingFile):
            return
        try:
            self._stream.reopen()
        except OSError as error:
            log.error("could not reopen the access log {path}: {error}; it goes on writing "
                      "to the old file", path=self._stream.path, error=error)
        else:
            log.info("reopened the access log {path}", path=self._stream.path)

    def record(self, request: Request, outcome: Outcome, dropped: bool) -> None:
        address = request.getClientAddress()
        host = address.host if isinstance(address, (IPv4Address, IPv6Address)) else "-"
        if self._trusted_proxies:
            headers = request.requestHeaders
            host = self._trusted_proxies.client(
                host,
                headers.getRawHeaders(b"forwarded", ()),
                headers.getRawHeaders(b"x-forwarded-for", ()),
            )
        request_line = b"%s %s %s" % (request.method, request.uri, request.clientproto)
        line = '%s - - %s "%s" %d %s "%s" "%s" %s%s\n' % (
            host,
            self._time_stamp(),
            _quoted(request_line),
            request.code,
            request.sentLength or "-",
            _quoted(request.getHeader(b"referer")),
            _quoted(request.getHeader(b"user-agent")),
            outcome.value,
            " dropped" if dropped else "",
        )
        data = line.encode("utf-8")
        self._lines.append(data)
        self._waiting += len(data)
        if not self._buffering or self._waiting >= FLUSH_BYTES:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(FLUSH_INTERVAL, self._flush_due)

    def flush(self) -> None:
        """Write the lines waiting, in one ``write``."""
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines = []
        self._waiting = 0
        try:
            written = self._stream.write(data)
            # A raw file's write may take less than it was given (a full
            # disk, a signal): the rest follows, or the error says why.
            while written is not None and written < len(data):
                data = data[written:]
                written = self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError) as error:
            log.error("could not write the access log: {error}", error=error)

    def close(self) -> None:
        """
        Flush, and stop buffering: the reactor is stopping, so no timer
        would write later lines (of requests cut off as it stops), which
        are written at once instead.  The stream stays open: it may be
        standard output, and it is the process's until it exits.
        """
        self._buffering = False
        self.flush()

    def _flush_due(self) -> None:
        self._flush_call = None
        self.flush()

    def _time_stamp(self) -> str:
        second = int(self._clock.seconds())
        if second != self._second:
            self._second = second
            self._stamp = datetimeToLogString(second)
        return self._stamp

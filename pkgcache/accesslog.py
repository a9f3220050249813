"""
An access log in the combined log format, with the cache outcome appended::

    10.0.0.7 - - [25/Nov/2026:05:49:10 +0000] "GET /distfiles/x HTTP/1.1" 200 5000000 "-" "Wget/1.21" miss

The last field is ``hit``, ``miss``, ``coalesced`` or ``error``, followed by
``dropped`` when the connection was cut before the response was complete.
"""

from __future__ import annotations

from typing import BinaryIO, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.web.http import datetimeToLogString
from twisted.web.server import Request

from pkgcache.outcomes import Outcome

log = Logger()


def _quoted(value: Optional[bytes]) -> str:
    """
    A request line or header for a quoted field, escaped as Apache does, so
    that nothing a client sends can break the line into other fields.
    """
    if not value:
        return "-"
    escaped = []
    for byte in value:
        if byte in b'"\\':
            escaped.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            escaped.append(chr(byte))
        else:
            escaped.append("\\x%02x" % byte)
    return "".join(escaped)


class AccessLog:
    """
    Appends one line per request to a binary stream (a file opened for
    appending, or standard output).

    :param clock: gives the time each line is stamped with.
    """

    def __init__(self, stream: BinaryIO, clock) -> None:
        self._stream = stream
        self._clock = clock

    @classmethod
    def open(cls, path: str, clock) -> "AccessLog":
        """
        ``path``, opened for appending; ``-`` is standard output.

        :raises OSError: if the file cannot be opened.
        """
        import sys

        if path == "-":
            return cls(sys.stdout.buffer, clock)
        return cls(open(path, "ab", buffering=0), clock)

    def record(self, request: Request, outcome: Outcome, dropped: bool) -> None:
        address = request.getClientAddress()
        host = address.host if isinstance(address, (IPv4Address, IPv6Address)) else "-"
        request_line = b"%s %s %s" % (request.method, request.uri, request.clientproto)
        line = '%s - - %s "%s" %d %s "%s" "%s" %s%s\n' % (
            host,
            datetimeToLogString(self._clock.seconds()),
            _quoted(request_line),
            request.code,
            request.sentLength or "-",
            _quoted(request.getHeader(b"referer")),
            _quoted(request.getHeader(b"user-agent")),
            outcome.value,
            " dropped" if dropped else "",
        )
        try:
            self._stream.write(line.encode("utf-8"))
            self._stream.flush()
        except (OSError, ValueError) as error:
            log.error("could not write the access log: {error}", error=error)

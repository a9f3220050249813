"""
Test clients that read a response body in particular ways.
"""

from __future__ import annotations

import hashlib
from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone


class BodyReader(Protocol):
    """
    Collects a body, optionally at no more than ``rate`` bytes per second
    (by pausing the connection, so the server sees a slow reader), and
    records when its first byte came.

    :ivar done: fires with the whole body, fails if it was cut short.
    """

    def __init__(self, rate: Optional[float] = None) -> None:
        self.rate = rate
        self.received = 0
        self._chunks: list[bytes] = []
        self.first_byte: Deferred[None] = Deferred()
        self.done: Deferred[bytes] = Deferred()
        self._resume_call = None

    def dataReceived(self, data: bytes) -> None:
        if not self.first_byte.called:
            self.first_byte.callback(None)
        self.received += len(data)
        self._chunks.append(data)
        if self.rate:
            self.transport.pauseProducing()
            self._resume_call = reactor.callLater(len(data) / self.rate, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        self.transport.resumeProducing()

    def full_speed(self) -> None:
        """Stop throttling."""
        self.rate = None
        if self._resume_call is not None:
            self._resume_call.cancel()
            self._resume()

    def hang_up(self) -> None:
        self.done.addErrback(lambda _: None)
        self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        if not self.first_byte.called:
            self.first_byte.callback(None)
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


async def start_reading(http, url: str, rate: Optional[float] = None, headers=None):
    """Send a GET and start reading its body: ``(response, reader)``."""
    response = await http.request("GET", url, headers=headers)
    reader = BodyReader(rate)
    response.deliverBody(reader)
    return response, reader


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

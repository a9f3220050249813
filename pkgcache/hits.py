"""
Serving a cached file: opened once by the store (so a cull racing the hit
makes it a miss, never an error page), answered with the same headers as a
miss, and sent in one write when small or by a producer when large.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request
from zope.interface import implementer

from pkgcache.interfaces import IByteSource, IFollower
from pkgcache.responses import Entity, send_entity
from pkgcache.store import CachedFile


@implementer(IByteSource)
class _FileBytes:
    """A cached file as a byte source: all there, and closed once read."""

    complete = True
    failure = None

    def __init__(self, cached: CachedFile) -> None:
        self._cached = cached
        self.received = cached.size

    def read(self, offset: int, length: int) -> bytes:
        return self._cached.read(offset, length)

    def attach(self, follower: IFollower) -> None:
        pass

    def detach(self, follower: IFollower) -> None:
        self._cached.close()

    def follower_advanced(self) -> None:
        pass


@implementer(IByteSource)
class _DocumentBytes:
    """A document made in memory (a rewritten page) as a byte source."""

    complete = True
    failure = None

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.received = len(body)

    def read(self, offset: int, length: int) -> bytes:
        return self._body[offset : offset + length]

    def attach(self, follower: IFollower) -> None:
        pass

    def detach(self, follower: IFollower) -> None:
        pass

    def follower_advanced(self) -> None:
        pass


def serve_document(
    request: Request,
    body: bytes,
    last_modified: float,
    content_type: bytes,
    *,
    clock: IReactorTime,
    stall_timeout: float,
) -> None:
    """
    Answer ``request`` with ``body``, a document made for it (with no ETag:
    it is not the source's entity).
    """
    entity = Entity(len(body), last_modified, content_type)
    producer = send_entity(
        request, entity, _DocumentBytes(body),
        clock=clock, stall_timeout=stall_timeout, label=request.path.decode("utf-8", "replace"),
    )
    if producer is not None:
        producer.start()


def serve_hit(
    request: Request, cached: CachedFile, *, clock: IReactorTime, stall_timeout: float
) -> None:
    """Answer ``request`` from ``cached``, and close it once done."""
    entity = Entity(
        cached.size, cached.mtime, cached.metadata.served_content_type, cached.metadata.etag
    )
    source = _FileBytes(cached)
    producer = send_entity(
        request, entity, source,
        clock=clock, stall_timeout=stall_timeout, label=request.path.decode("utf-8", "replace"),
    )
    if producer is None:
        cached.close()
    else:
        producer.start()

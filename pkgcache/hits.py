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
class _CompleteBytes:
    """Bytes that are all there, read by ``read(offset, length)``."""

    complete = True
    failure = None
    fd = None

    def __init__(self, size: int, read) -> None:
        self.received = size
        self.read = read

    def attach(self, follower: IFollower) -> None:
        pass

    def detach(self, follower: IFollower) -> None:
        pass

    def follower_advanced(self) -> None:
        pass


class _FileBytes(_CompleteBytes):
    """A cached file as a byte source, closed once read."""

    def __init__(self, cached: CachedFile) -> None:
        # (Not through super().__init__: one is made for every hit.)
        self.received = cached.size
        self.read = cached.read
        self.fd = cached.fd
        self._cached = cached

    def detach(self, follower: IFollower) -> None:
        self._cached.close()


def _document_bytes(body: bytes) -> _CompleteBytes:
    """A document made in memory (a rewritten page) as a byte source."""
    return _CompleteBytes(len(body), lambda offset, length: body[offset : offset + length])


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
        request, entity, _document_bytes(body), clock=clock, stall_timeout=stall_timeout
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
    try:
        producer = send_entity(request, entity, source, clock=clock, stall_timeout=stall_timeout)
    except BaseException:
        cached.close()  # (a kept file would otherwise stay in use for good)
        raise
    if producer is None:
        cached.close()
    else:
        producer.start()

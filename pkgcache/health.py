"""
The health URL a load balancer polls: ``/.pkgcache-health`` on the serving
port.  No request path can collide with it (a segment that starts with
``.pkgcache-`` is never a cache path or a mirror name), and it never
touches a source: it says whether this node can serve and store files.

- 200 ``ok`` while it serves and its cache directory takes a new file;
- 503 with the reason once it is shutting down, or when the cache
  directory cannot take a file (read-only, gone, not ours) or has less
  than ``min_free_bytes`` free.

The disk is looked at in a disk thread (``statvfs``, then a file made and
removed in the spool directory), so a slow disk slows the answer, never
the reactor; a balancer's timeout then takes the node out, as it should.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet.defer import Deferred
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pkgcache.responses import send_error
from pkgcache.store import CacheStore

#: Its path segment, at the root of the serving port.
HEALTH_SEGMENT = b".pkgcache-health"
#: Below this much free space a node cannot store the files it would fetch.
MIN_FREE_BYTES = 64 * 1024 * 1024


class NotWritable(Exception):
    """Why the cache directory cannot take a file."""


def check_writable(cache_dir: str, spool_dir: str, min_free_bytes: int) -> None:
    """
    Blocking: the cache directory has room and takes a file.

    :raises NotWritable: with the reason.
    """
    try:
        stats = os.statvfs(cache_dir)
        free = stats.f_bavail * stats.f_frsize
        if free < min_free_bytes:
            raise NotWritable(f"{free} bytes free in {cache_dir}")
        fd, name = tempfile.mkstemp(prefix=".health-", dir=spool_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as error:
        raise NotWritable(f"{cache_dir}: {error.strerror or error}") from None


class HealthResource(Resource):
    """The answer at ``/.pkgcache-health`` (see the module)."""

    isLeaf = True

    def __init__(self, store: CacheStore, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        super().__init__()
        self._store = store
        self._min_free_bytes = min_free_bytes
        self.stopping = False

    def render_GET(self, request: Request):
        request.setHeader(b"cache-control", b"no-store")
        if self.stopping:
            send_error(request, http.SERVICE_UNAVAILABLE, "shutting down")
            return NOT_DONE_YET
        checked: Deferred = self._store.in_disk_thread(
            check_writable, self._store.cache_dir.path, self._store.spool_dir.path,
            self._min_free_bytes,
        )
        checked.addCallbacks(
            lambda _: self._answer(request, http.OK, "ok"),
            lambda failure: self._answer(
                request, http.SERVICE_UNAVAILABLE,
                f"the cache directory cannot take files: {failure.value}",
            ),
        )
        return NOT_DONE_YET

    render_HEAD = render_GET

    def _answer(self, request: Request, status: int, message: str) -> None:
        if request.finished or request.channel is None:
            return
        if self.stopping:
            status, message = http.SERVICE_UNAVAILABLE, "shutting down"
        if status == http.OK:
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            body = b"ok\n"
            request.setHeader(b"content-length", b"%d" % len(body))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()
        else:
            send_error(request, status, message)


class HealthRoot(Resource):
    """
    The root of a serving port: ``/.pkgcache-health``, and every other
    path to ``resource`` exactly as if it were the root itself.
    """

    def __init__(self, resource: Resource, health: HealthResource) -> None:
        super().__init__()
        self.resource = resource
        self.health = health

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path == HEALTH_SEGMENT and not request.postpath:
            return self.health
        # Not ours: the segment goes back, for the resource to read.
        request.postpath.insert(0, request.prepath.pop())
        return self.resource

    def render(self, request: Request):
        return self.resource.render(request)

"""
The site root when several mirrors share one port (``--config`` with
``[mirrors.NAME]`` tables): ``/NAME/...`` goes to that mirror's
:class:`~pkgcache.resource.PackageCacheResource`, and ``/`` says what
mirrors there are and how a client uses each.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.filepath import FilePath
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pkgcache.accesslog import AccessLog
from pkgcache.interfaces import IDocumentRewriter
from pkgcache.kinds import FILES_PREFIX
from pkgcache.kinds.npm import PackageDocumentRewriter
from pkgcache.kinds.pypi import SimpleIndexRewriter
from pkgcache.metrics import Metrics
from pkgcache.mirrors import Mirror
from pkgcache.resource import PackageCacheResource, tree_url
from pkgcache.responses import send_error
from pkgcache.store import CacheStore, StoreArea

#: What a client needs to use a mirror of each kind; ``{url}`` is the mirror's.
_CLIENT_LINES = {
    "debian": "in sources.list: deb {url} SUITE main",
    "ubuntu": "in sources.list: deb {url} SUITE main",
    "gentoo": 'in make.conf: GENTOO_MIRRORS="{url}"',
    "rpm": "in a .repo file: baseurl={url}...",
    "pypi": "pip install --index-url {url}simple/ ...",
    "npm": "npm install --registry {url} ...",
    "generic": "files at {url}PATH",
}


class MirrorsResource(Resource):
    """
    Every mirror of a configuration, each under ``/NAME/`` and in
    ``CACHE_DIR/NAME/`` of one shared store.

    :param options: passed to every mirror's resource (timeouts, limits,
        freshness, ``public_url``); a mirror's own ``volatile`` patterns
        add to ``volatile``, and its ``volatile_max_age`` wins.
    """

    def __init__(
        self,
        mirrors: Sequence[Mirror],
        cache_dir: Union[str, FilePath] = "",
        *,
        reactor=None,
        metrics: Optional[Metrics] = None,
        access_log: Optional[AccessLog] = None,
        store: Optional[CacheStore] = None,
        volatile: Sequence[str] = (),
        public_url: Optional[str] = None,
        **options,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        if store is None:
            path = cache_dir if isinstance(cache_dir, FilePath) else FilePath(cache_dir)
            store = CacheStore(path, reactor)
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self.mirrors: dict[str, PackageCacheResource] = {}
        #: A pypi mirror's files, fetched from its ``files`` sources.
        self.files: dict[str, PackageCacheResource] = {}
        self._public_url = public_url
        shared = dict(
            options, reactor=reactor, metrics=self.metrics, access_log=access_log,
            public_url=public_url,
        )
        for mirror in mirrors:
            own = dict(shared)
            if mirror.volatile_max_age is not None:
                own["volatile_max_age"] = mirror.volatile_max_age
            rewriter = _rewriter(mirror)
            self.mirrors[mirror.name] = PackageCacheResource(
                mirror.sources,
                store=StoreArea(store, mirror.name),
                kind=mirror.kind,
                name=mirror.name,
                volatile=tuple(volatile) + mirror.volatile,
                rewriter=rewriter,
                **own,
            )
            if mirror.files:
                self.files[mirror.name] = PackageCacheResource(
                    mirror.files,
                    store=StoreArea(store, mirror.name, FILES_PREFIX),
                    name=mirror.name,
                    volatile=tuple(volatile),
                    **own,
                )
        self._kinds = {mirror.name: mirror.kind for mirror in mirrors}
        resources = list(self.mirrors.values()) + list(self.files.values())
        self.metrics.count_downloads(
            lambda: sum(len(resource.downloads) for resource in resources),
            lambda: sum(resource.downloads.waiting for resource in resources),
        )

    def close(self) -> "Deferred[None]":
        """Close every mirror (their downloads, then the shared store)."""
        resources = list(self.mirrors.values()) + list(self.files.values())
        closing = DeferredList([resource.close() for resource in resources])
        return closing.addCallback(lambda _: None)

    def getChild(self, name: bytes, request: Request) -> Resource:
        if name == b"" and not request.postpath:
            return self  # "/" itself: the list of mirrors
        mirror = self.mirrors.get(name.decode("utf-8", "replace"))
        if mirror is None:
            return _UnknownMirror()
        if not request.postpath:
            return _ToMirrorRoot()  # /NAME: its tree is /NAME/
        files = self.files.get(name.decode("utf-8", "replace"))
        if files is not None and request.postpath[0] == FILES_PREFIX.encode("ascii"):
            request.prepath.append(request.postpath.pop(0))
            return files
        return mirror

    def render_GET(self, request: Request) -> bytes:
        root = tree_url(request, self._public_url) or "http://CACHE-HOST/"
        lines = ["pkgcache mirrors:", ""]
        for name, kind in self._kinds.items():
            url = f"{root}{name}/"
            lines.append(f"/{name}/ ({kind}): " + _CLIENT_LINES[kind].format(url=url))
        body = ("\n".join(lines) + "\n").encode("utf-8")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return body

    render_HEAD = render_GET


def _rewriter(mirror: Mirror) -> Optional[IDocumentRewriter]:
    """What rewrites the links of a mirror's documents, for the kinds that need it."""
    if mirror.kind == "pypi":
        return SimpleIndexRewriter(mirror.files)
    if mirror.kind == "npm":
        return PackageDocumentRewriter(mirror.sources, mirror.files)
    return None


class _UnknownMirror(Resource):
    isLeaf = True

    def render(self, request: Request):
        send_error(request, http.NOT_FOUND, "no such mirror: see / for the mirrors there are")
        return NOT_DONE_YET


class _ToMirrorRoot(Resource):
    isLeaf = True

    def render(self, request: Request):
        request.setResponseCode(http.MOVED_PERMANENTLY)
        request.setHeader(b"location", request.path + b"/")
        request.setHeader(b"content-length", b"0")
        return b""

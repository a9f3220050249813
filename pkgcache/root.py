"""
Mirrors as resources: :class:`MirrorResource` serves one mirror's tree
(its own and, for kinds that link to a files host, ``files/``), mountable
anywhere; :class:`MirrorsResource` is the site root when several share one
port (``--config`` with ``[mirrors.NAME]`` tables): ``/NAME/...`` goes to
that mirror, and ``/`` says what mirrors there are and how a client uses
each.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.filepath import FilePath
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pkgcache.interfaces import IDocumentRewriter
from pkgcache.kinds import FILES_PREFIX
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


class MirrorResource(Resource):
    """
    One mirror's tree: its sources' files at the top, and those of its
    ``files`` hosts (a PyPI or npm mirror's) under ``files/``, each a
    :class:`~pkgcache.resource.PackageCacheResource`.

    :param store: where its files are kept (a mirror of several shares
        one store: :meth:`~pkgcache.store.CacheStore.area`); else a store
        for ``cache_dir``.
    :param options: passed to both resources (timeouts, limits, freshness,
        ``public_url``); the mirror's own ``volatile`` patterns add to
        ``volatile``, and its ``volatile_max_age`` wins.
    """

    def __init__(
        self,
        mirror: Mirror,
        cache_dir: Union[str, FilePath] = "",
        *,
        reactor=None,
        metrics: Optional[Metrics] = None,
        store: Union[CacheStore, StoreArea, None] = None,
        volatile: Sequence[str] = (),
        **options,
    ) -> None:
        super().__init__()
        if store is None:
            store = _store(cache_dir, reactor)
        self.mirror = mirror
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        options.update(reactor=reactor, metrics=self.metrics, name=mirror.name)
        if mirror.volatile_max_age is not None:
            options["volatile_max_age"] = mirror.volatile_max_age
        self.tree = PackageCacheResource(
            mirror.sources,
            store=store,
            kind=mirror.kind,
            volatile=tuple(volatile) + mirror.volatile,
            rewriter=_rewriter(mirror),
            **options,
        )
        #: Its ``files`` hosts' files (immutable; kind ``generic``).
        self.files: Optional[PackageCacheResource] = None
        if mirror.files:
            self.files = PackageCacheResource(
                mirror.files, store=store.area(FILES_PREFIX), volatile=tuple(volatile), **options
            )
        self.resources = [self.tree] + ([self.files] if self.files else [])
        _count_downloads(self.metrics, self.resources)

    def close(self) -> "Deferred[None]":
        """Close both trees (their downloads, then the store)."""
        return _close(self.resources)

    def getChild(self, name: bytes, request: Request) -> Resource:
        if self.files is not None and name == FILES_PREFIX.encode("ascii"):
            return self.files
        # The tree takes the whole path, this segment included.
        request.postpath.insert(0, request.prepath.pop())
        return self.tree

    def render(self, request: Request):
        # Mounted at /NAME and asked for /NAME: its tree is /NAME/.
        request.setResponseCode(http.MOVED_PERMANENTLY)
        request.setHeader(b"location", request.path + b"/")
        request.setHeader(b"content-length", b"0")
        return b""


class MirrorsResource(Resource):
    """
    Every mirror of a configuration, each a :class:`MirrorResource` under
    ``/NAME/``, kept in ``CACHE_DIR/NAME/`` of one shared store.

    :param options: passed to every mirror's resource (timeouts, limits,
        freshness, ``public_url``).
    """

    def __init__(
        self,
        mirrors: Sequence[Mirror],
        cache_dir: Union[str, FilePath] = "",
        *,
        reactor=None,
        metrics: Optional[Metrics] = None,
        store: Optional[CacheStore] = None,
        public_url: Optional[str] = None,
        **options,
    ) -> None:
        super().__init__()
        self.store = store if store is not None else _store(cache_dir, reactor)
        self.metrics = metrics if metrics is not None else Metrics()
        self._public_url = public_url
        self.mirrors: dict[str, MirrorResource] = {
            mirror.name: MirrorResource(
                mirror,
                reactor=reactor,
                metrics=self.metrics,
                store=self.store.area(mirror.name),
                public_url=public_url,
                **options,
            )
            for mirror in mirrors
        }
        self._resources = [r for mirror in self.mirrors.values() for r in mirror.resources]
        _count_downloads(self.metrics, self._resources)

    def close(self) -> "Deferred[None]":
        """Close every mirror (their downloads, then the shared store)."""
        return _close(self._resources)

    def getChild(self, name: bytes, request: Request) -> Resource:
        if name == b"" and not request.postpath:
            return self  # "/" itself: the list of mirrors
        mirror = self.mirrors.get(name.decode("utf-8", "replace"))
        return mirror if mirror is not None else _UnknownMirror()

    def render_GET(self, request: Request) -> bytes:
        root = tree_url(request, self._public_url) or "http://CACHE-HOST/"
        lines = ["pkgcache mirrors:", ""]
        for name, mirror in self.mirrors.items():
            kind = mirror.mirror.kind
            lines.append(f"/{name}/ ({kind}): " + _CLIENT_LINES[kind].format(url=f"{root}{name}/"))
        body = ("\n".join(lines) + "\n").encode("utf-8")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return body

    render_HEAD = render_GET


def _store(cache_dir: Union[str, FilePath], reactor) -> CacheStore:
    if reactor is None:
        from twisted.internet import reactor
    return CacheStore(cache_dir if isinstance(cache_dir, FilePath) else FilePath(cache_dir), reactor)


def _count_downloads(metrics: Metrics, resources: Sequence[PackageCacheResource]) -> None:
    """The downloads gauges, summed over the trees that share ``metrics``."""
    metrics.count_downloads(
        lambda: sum(len(resource.downloads) for resource in resources),
        lambda: sum(resource.downloads.waiting for resource in resources),
    )


def _close(resources: Sequence[PackageCacheResource]) -> "Deferred[None]":
    closing = DeferredList([resource.close() for resource in resources])
    return closing.addCallback(lambda _: None)


def _rewriter(mirror: Mirror) -> Optional[IDocumentRewriter]:
    """What rewrites the links of a mirror's documents, for the kinds that need it."""
    # Each kind's module is imported only when a mirror of that kind is
    # configured: a process serves what it was given, and no more.
    if mirror.kind == "pypi":
        from pkgcache.kinds.pypi import SimpleIndexRewriter

        return SimpleIndexRewriter(mirror.files)
    if mirror.kind == "npm":
        from pkgcache.kinds.npm import PackageDocumentRewriter

        return PackageDocumentRewriter(mirror.sources, mirror.files)
    return None


class _UnknownMirror(Resource):
    isLeaf = True

    def render(self, request: Request):
        send_error(request, http.NOT_FOUND, "no such mirror: see / for the mirrors there are")
        return NOT_DONE_YET

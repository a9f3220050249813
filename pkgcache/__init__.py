"""
pkgcache: a caching reverse proxy for package downloads.

Embed :class:`PackageCacheResource` (one tree of sources),
:class:`MirrorResource` (one :class:`Mirror`, with its kind's rewriting and
files host) or :class:`MirrorsResource` (several, from :func:`load_config`
or :class:`Mirror` values) in any
``twisted.web`` site, with a :class:`CacheService` for its start and stop,
or run ``twist pkgcache --source URL`` or ``twist pkgcache --config FILE``.
"""

__version__ = "0.3.0"

__all__ = [
    "CacheService", "Mirror", "MirrorResource", "MirrorsResource", "PackageCacheResource", "load_config",
    "__version__",
]


def __getattr__(name: str):
    # Imported on first use, so that pkgcache-cull does not load the server.
    if name == "PackageCacheResource":
        from pkgcache.resource import PackageCacheResource

        return PackageCacheResource
    if name == "CacheService":
        from pkgcache.service import CacheService

        return CacheService
    if name in ("MirrorResource", "MirrorsResource"):
        from pkgcache import root

        return getattr(root, name)
    if name in ("Mirror", "load_config"):
        from pkgcache import mirrors

        return getattr(mirrors, name)
    raise AttributeError(f"module 'pkgcache' has no attribute {name!r}")

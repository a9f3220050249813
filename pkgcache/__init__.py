"""
pkgcache: a caching reverse proxy for package downloads.

Embed :class:`PackageCacheResource` in any ``twisted.web`` site (with a
:class:`CacheService` for its start and stop), or run
``twist pkgcache --source URL``.
"""

__version__ = "0.3.0"

__all__ = ["CacheService", "PackageCacheResource", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that pkgcache-cull does not load the server.
    if name == "PackageCacheResource":
        from pkgcache.resource import PackageCacheResource

        return PackageCacheResource
    if name == "CacheService":
        from pkgcache.service import CacheService

        return CacheService
    raise AttributeError(f"module 'pkgcache' has no attribute {name!r}")

"""
pkgcache: a caching reverse proxy for package downloads.

Embed :class:`PackageCacheResource` in any ``twisted.web`` site, or run
``twist pkgcache --source URL``.
"""

__version__ = "0.3.0"

__all__ = ["PackageCacheResource", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that pkgcache-cull does not load the server.
    if name == "PackageCacheResource":
        from pkgcache.resource import PackageCacheResource

        return PackageCacheResource
    raise AttributeError(f"module 'pkgcache' has no attribute {name!r}")

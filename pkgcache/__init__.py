"""
pkgcache: a caching reverse proxy for package downloads.

Embed :class:`PackageCacheResource` in any ``twisted.web`` site, or run
``twist pkgcache --source URL``.
"""

__version__ = "0.3.0"

from pkgcache.resource import PackageCacheResource  # noqa: E402

__all__ = ["PackageCacheResource", "__version__"]

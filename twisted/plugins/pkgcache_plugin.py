"""
The ``twist pkgcache`` plugin.

It names the service and nothing more: ``pkgcache.tap`` is imported only when
the plugin is used, so plugin discovery stays cheap.
"""

from twisted.application.service import ServiceMaker

pkgcache = ServiceMaker(
    "pkgcache",
    "pkgcache.tap",
    "A caching reverse proxy for package downloads.",
    "pkgcache",
)

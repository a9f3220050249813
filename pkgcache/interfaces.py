"""
The two sides of a body on its way to a client: a byte source (a cached
file, or a download still arriving) and a follower reading it (one client's
body producer).  A download knows its followers only through
:class:`IFollower`, and a producer its source only through
:class:`IByteSource`, so neither imports the other.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IFollower(Interface):
    """A client following a download: what the download knows of it."""

    needed_from = Attribute(
        "The first byte it may still read: memory before it may be dropped."
    )

    def data_available() -> None:
        """The download has more bytes, or has ended (complete or failed)."""


class IByteSource(Interface):
    """The bytes of one file, complete or still arriving."""

    received = Attribute("How many bytes, from the start, can be read now.")
    complete = Attribute("Whether ``received`` is the whole file.")
    failure = Attribute("Why no more bytes will come before the end, if so.")

    def read(offset: int, length: int) -> bytes:
        """Up to ``length`` of the bytes received, from ``offset``."""

    def attach(follower: IFollower) -> None:
        """A reader starts reading (and wants ``data_available`` calls)."""

    def detach(follower: IFollower) -> None:
        """A reader will read no more (sent, failed, or its client left)."""

    def follower_advanced() -> None:
        """A reader read on (so memory it no longer needs may go)."""


class IPublicationCheck(Interface):
    """
    What an ecosystem knows about whether a downloaded file belongs in the
    cache: Debian's indexes must match the ``InRelease`` that lists them
    (:mod:`pkgcache.kinds.debian`).  A download asks before it publishes,
    and says so after.
    """

    def may_publish(key, metadata, read) -> bool:
        """
        Whether the complete body of ``key`` (``metadata`` has its SHA-256;
        ``read(offset, length)`` reads it) may replace the cached copy.
        """

    def published(key, metadata, read) -> None:
        """``key`` was just published with ``metadata``."""

    def is_consistent(key, metadata) -> bool:
        """Whether a cached copy of ``key`` may still be served as fresh."""

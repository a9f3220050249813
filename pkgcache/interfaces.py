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
    fd = Attribute(
        "A descriptor of the whole file that ``sendfile`` may send from, or ``None``."
    )

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


class IDocumentRewriter(Interface):
    """
    What a kind whose documents link to its files knows of them (PyPI's
    simple pages, npm's package documents): which requests name documents,
    under which key each form of one is cached, and how their links are
    rewritten into the cache as they are served (the cache keeps them as
    the source sent them, so a change of the rule needs no refetch).
    """

    accept_by_representation = Attribute(
        "The Accept header to send a source for a key of each representation."
    )

    def key_for(postpath):
        """
        The :class:`~pkgcache.paths.CacheKey` of a request path.

        :raises pkgcache.paths.UnsafePath: as ``cache_key_from_postpath``.
        """

    def applies(key) -> bool:
        """Whether ``key`` is a document whose links are rewritten."""

    def redirect(key):
        """The relative ``Location`` of ``key``'s canonical spelling, or ``None``."""

    def representation(key, accept):
        """``key`` for the form of the document the client's ``Accept`` prefers."""

    def rewrite(key, document, content_type, base) -> bytes:
        """
        ``document`` with its links pointing into the cache; ``base`` is
        the URL of the mirror's tree as the client reaches it (ending in
        ``/``), for links that must be absolute.
        """

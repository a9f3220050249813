"""
npm's registry: a package's document (``/NAME``, ``/@SCOPE/NAME``, which
npm asks for as ``/@SCOPE%2fNAME``) lists its versions, each with a
``dist.tarball`` link, an absolute URL on the registry (or on a host of
its own).  :class:`PackageDocumentRewriter` rewrites those links to point
back at pkgcache, absolute as npm needs them, so that the tarballs come
through the cache, where they are immutable files
(``/NAME/-/NAME-1.0.0.tgz``).

A document comes in two forms, each cached apart: the full one, and the
abbreviated one npm asks for when installing (``Accept:
application/vnd.npm.install-v1+json``).  A document is stored inside its
package's directory (``NAME/.pkgcache-index``), next to the package's
tarballs (``NAME/-/``).  The cache keeps documents as the registry sent
them; links are rewritten as each is served, so only the ``tarball``
values change and every other byte (``integrity`` hashes included) stays.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Optional, Sequence
from urllib.parse import quote

from zope.interface import implementer

from pkgcache.interfaces import IDocumentRewriter
from pkgcache.kinds import FILES_PREFIX, link_bases
from pkgcache.kinds.negotiation import media_type_qualities
from pkgcache.paths import CacheKey, cache_key_from_postpath
from pkgcache.sources import Source

#: The abbreviated document, which npm asks for when it installs.
ABBREVIATED = b"application/vnd.npm.install-v1+json"

#: A ``"tarball": "..."`` member: its start, and the string's content
#: (escapes and all).  Found by a literal prefix, so that a document of
#: thousands of versions is rewritten in milliseconds.
_TARBALL = re.compile(rb'("tarball"\s*:\s*")([^"\\]*(?:\\.[^"\\]*)*)"')


@implementer(IDocumentRewriter)
class PackageDocumentRewriter:
    """
    :param sources: the registry's base URLs: a tarball link below one is
        served from the mirror's own tree (the path below it kept).
    :param files: other hosts tarball links may point at, served from the
        mirror's ``files/`` tree.
    """

    accept_by_representation = {"abbreviated": ABBREVIATED}

    def __init__(self, sources: Sequence[Source], files: Sequence[Source] = ()) -> None:
        self._links = tuple((base, "") for base in link_bases(sources)) + tuple(
            (base, FILES_PREFIX + "/") for base in link_bases(files)
        )

    def key_for(self, postpath: Sequence[bytes]) -> CacheKey:
        """
        A scoped name asked for as one segment (``@scope%2fname``) is two,
        as ``/@scope/name`` is; a package's document is a key of its own,
        fetched from the registry as npm asks for it.
        """
        if postpath and postpath[0].startswith(b"@") and postpath[0].count(b"/") == 1:
            postpath = postpath[0].split(b"/") + list(postpath[1:])
        key = cache_key_from_postpath(postpath)
        if _is_document(key.segments):
            remote = "%2f".join(quote(segment, safe="@") for segment in key.segments)
            return CacheKey(key.segments, directory=True, remote=remote)
        return key

    def applies(self, key: CacheKey) -> bool:
        """A package document, or one version's (``/NAME/1.0.0``, ``/NAME/latest``)."""
        if key.directory:
            return bool(key.remote)
        package = 2 if key.segments[0].startswith("@") else 1
        return (
            len(key.segments) == package + 1
            and key.segments[-1] != "-"
            and _is_document(key.segments[:package])
        )

    def redirect(self, key: CacheKey) -> Optional[bytes]:
        return None

    def representation(self, key: CacheKey, accept: Optional[bytes]) -> CacheKey:
        """The abbreviated document for a client that names it first."""
        if not (key.directory and key.remote) or accept is None:
            return key
        qualities = media_type_qualities(accept)
        abbreviated = qualities.get(ABBREVIATED, 0.0)
        if abbreviated > 0 and abbreviated >= qualities.get(b"application/json", 0.0):
            return replace(key, representation="abbreviated")
        return key

    def rewrite(
        self, key: CacheKey, document: bytes, content_type: Optional[bytes], base: str = ""
    ) -> bytes:
        """Every ``tarball`` link below a known host, moved below ``base``."""
        links = [(_json_text(prefix), _json_text(base + into)) for prefix, into in self._links]

        def relinked(match: "re.Match[bytes]") -> bytes:
            value = match.group(2)
            if b"\\" in value:
                # Escaped (say "\/"): compared and written as JSON text.
                try:
                    value = _json_text(json.loads(b'"' + value + b'"'))
                except ValueError:
                    return match.group(0)
            for prefix, local in links:
                if value.startswith(prefix):
                    return match.group(1) + local + value[len(prefix):] + b'"'
            return match.group(0)

        return _TARBALL.sub(relinked, document)


def _json_text(text: str) -> bytes:
    """``text`` as the inside of a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8")


def _is_document(segments: tuple[str, ...]) -> bool:
    """``/NAME`` or ``/@SCOPE/NAME``: what npm asks for a package's versions."""
    *scope, name = segments
    if name.startswith(("@", "-", ".")):
        return False
    return not scope or (len(scope) == 1 and scope[0].startswith("@") and len(scope[0]) > 1)

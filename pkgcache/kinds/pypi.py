"""
PyPI's simple index (PEP 503 HTML, PEP 691 JSON): its project pages link
to the files on another host, so that a client would fetch them around the
cache.  :class:`SimpleIndexRewriter` rewrites every link into the files
host as a relative link under the mirror's ``files/`` tree, which pkgcache
then fetches from the mirror's ``files`` sources and caches.

The cache keeps each page as the index sent it; links are rewritten as a
page is served, so that a change of the rule never needs a refetch.  Hash
fragments (``#sha256=...``) and every attribute (``data-requires-python``,
``data-yanked``, ``data-dist-info-metadata``, ``data-core-metadata``) are
kept as they are.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import replace
from typing import Optional, Sequence
from urllib.parse import quote

from zope.interface import implementer

from pkgcache.kinds.negotiation import media_type_qualities
from pkgcache.interfaces import IDocumentRewriter
from pkgcache.kinds import FILES_PREFIX, link_bases
from pkgcache.paths import CacheKey, cache_key_from_postpath
from pkgcache.sources import Source


_SEPARATORS = re.compile(r"[-_.]+")
_HREF = re.compile(rb"""(\bhref\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
PEP691_JSON = b"application/vnd.pypi.simple.v1+json"
_JSON_TYPES = (PEP691_JSON, b"application/json")
_JSON_PAGE_TYPES = (PEP691_JSON, b"application/vnd.pypi.simple.latest+json")
_HTML_TYPES = (b"application/vnd.pypi.simple.v1+html", b"text/html", b"application/vnd.pypi.simple.latest+html")


@implementer(IDocumentRewriter)
class SimpleIndexRewriter:
    """
    :param files: the files host's base URLs (a link below any of them is
        rewritten; the path below it is kept).
    """

    accept_by_representation = {"json": PEP691_JSON}

    def __init__(self, files: Sequence[Source]) -> None:
        self._bases = link_bases(files)

    def key_for(self, postpath: Sequence[bytes]) -> CacheKey:
        return cache_key_from_postpath(postpath)

    def applies(self, key: CacheKey) -> bool:
        """Whether ``key`` is a page of the simple index."""
        return bool(key.segments) and key.segments[0] == "simple"

    def representation(self, key: CacheKey, accept: Optional[bytes]) -> CacheKey:
        """
        ``key`` for the representation the client's ``Accept`` prefers: a
        page is fetched and cached as PEP 691 JSON for a client that
        prefers it (pip does), as HTML otherwise.
        """
        if not (self.applies(key) and key.directory) or accept is None:
            return key
        qualities = media_type_qualities(accept)
        json_q = max(qualities.get(t, 0.0) for t in _JSON_PAGE_TYPES)
        html_q = max(qualities.get(t, 0.0) for t in _HTML_TYPES + (b"*/*", b"text/*"))
        if json_q > 0 and json_q >= html_q:
            return replace(key, representation="json")
        return key

    def redirect(self, key: CacheKey) -> Optional[bytes]:
        """
        Where a project page is under its PEP 503 normalised name
        (``/simple/Foo_Bar/`` -> ``../foo-bar/``), if ``key`` is one under
        another spelling (one cached page per project, as the index itself
        redirects); else ``None``.
        """
        if len(key.segments) != 2 or not key.directory or key.segments[0] != "simple":
            return None
        normalised = _SEPARATORS.sub("-", key.segments[1]).lower()
        if normalised == key.segments[1]:
            return None
        return b"../" + quote(normalised).encode("ascii") + b"/"

    def rewrite(
        self, key: CacheKey, page: bytes, content_type: Optional[bytes], base: str = ""
    ) -> bytes:
        """``page`` with its file links relative links into the cache."""
        up = "../" * (len(key.segments) if key.directory else len(key.segments) - 1)
        if content_type is not None and content_type.split(b";")[0].strip() in _JSON_TYPES:
            return self._rewrite_json(page, up)

        def relinked(match: "re.Match[bytes]") -> bytes:
            url = html.unescape(match.group(3).decode("utf-8", "surrogateescape"))
            local = self._local(url, up)
            if local is None:
                return match.group(0)
            value = html.escape(local, quote=True).encode("utf-8", "surrogateescape")
            return match.group(1) + match.group(2) + value + match.group(2)

        return _HREF.sub(relinked, page)

    def _rewrite_json(self, page: bytes, up: str) -> bytes:
        try:
            document = json.loads(page)
        except ValueError:
            return page
        files = document.get("files") if isinstance(document, dict) else None
        for entry in files if isinstance(files, list) else ():
            url = entry.get("url") if isinstance(entry, dict) else None
            local = self._local(url, up) if isinstance(url, str) else None
            if local is not None:
                entry["url"] = local
        return json.dumps(document).encode("utf-8")

    def _local(self, url: str, up: str) -> Optional[str]:
        for base in self._bases:
            if url.startswith(base):
                return up + FILES_PREFIX + "/" + url[len(base):]
        return None

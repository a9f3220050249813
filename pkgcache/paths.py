"""
Turning a request path into a safe cache key.

A request path arrives as ``request.postpath``: a list of byte segments, each
already percent-decoded on its own, so ``..%2F..`` is *one* segment that holds
slashes.  Every segment is checked here, once, and the result, a
:class:`CacheKey`, is the only thing the rest of pkgcache accepts: the store
maps it under the cache directory and the upstream client appends it to a
source URL, so neither can be steered outside its base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

#: The longest single name most filesystems accept (``NAME_MAX``), in bytes.
MAX_SEGMENT_BYTES = 255
#: The longest whole path we accept, in bytes (``PATH_MAX`` is 4096; leave room
#: for the cache directory itself).
MAX_PATH_BYTES = 2048
#: Names the store keeps for itself at the top of the cache directory.
RESERVED_TOP_LEVEL_NAMES = frozenset({".pkgcache-spool"})
#: The name a directory URL's document (``/simple/pkg/``) is stored under,
#: inside that directory (``.pkgcache-index.json`` for its JSON
#: representation): names that start with ``.pkgcache-`` are refused in
#: requests, so that no file of a mirror tree can be stored there too.
DIRECTORY_DOCUMENT = ".pkgcache-index"
_RESERVED_PREFIX = ".pkgcache-"

_FORBIDDEN_CHARACTERS = ("/", "\\", "\0")
#: A joined path with an empty, ``.`` or ``..`` part, or a NUL: one that
#: may not stay below the directory it is joined to.
_ESCAPING = re.compile(r"(?:^|/)\.{0,2}(?:/|$)|\x00")


class UnsafePath(ValueError):
    """
    A request path that must not be served.

    :ivar status: the HTTP status to answer with: 400 for malformed paths,
        404 for directories and names reserved by the store.
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class CacheKey:
    """
    A validated relative path, as a tuple of text segments.

    Segments are non-empty, are not ``.`` or ``..``, and hold no slash,
    backslash or NUL: joining them under any base directory stays under it.

    :ivar directory: the path ended with a slash (``/simple/pkg/``): it
        names the document a source serves for that directory.
    :ivar representation: for a document served in more than one format
        by ``Accept`` (PyPI's ``json``), which one; each is cached apart.
    :ivar remote: the path on a source, percent-encoded, when it is not
        ``segments`` (npm asks for a scoped package's document as
        ``@scope%2fname``, which is stored as ``@scope/name/``); made by a
        kind from checked segments only.
    """

    segments: tuple[str, ...]
    directory: bool = False
    representation: str = ""
    remote: str = ""

    def __str__(self) -> str:
        return "/" + "/".join(self.segments) + ("/" if self.directory else "")


def relative_path(key: CacheKey) -> str:
    """
    Where ``key`` is below a cache directory: its segments joined, and a
    directory URL's document (a name no request can ask for) inside.

    Checked again, as one string (cheaper than a ``FilePath.child`` per
    segment, on every hit): a key made by hand, not by
    :func:`cache_key_from_postpath`, cannot name a file outside either.

    :raises UnsafePath: for a key no request could have made.
    """
    path = "/".join(key.segments)
    if key.directory:
        suffix = "." + key.representation if key.representation else ""
        path += "/" + DIRECTORY_DOCUMENT + suffix
    if _ESCAPING.search(path):
        raise UnsafePath(f"not a path below the cache: {path!r}")
    return path


def cache_key_from_postpath(postpath: Sequence[bytes]) -> CacheKey:
    """
    Validate the segments of a request path.

    :raises UnsafePath: with the status to answer.
    """
    return _cache_key(tuple(postpath))


#: The keys of this many paths (the hot ones) are checked once, not on
#: every hit.
CHECKED_PATHS = 4096


@lru_cache(maxsize=CHECKED_PATHS)
def _cache_key(postpath: tuple[bytes, ...]) -> CacheKey:
    if not postpath or postpath == (b"",):
        raise UnsafePath("no file named", status=404)
    if len(b"/".join(postpath)) > MAX_PATH_BYTES:
        raise UnsafePath("path too long")
    directory = postpath[-1] == b"" and len(postpath) > 1
    if directory:
        # A directory URL: its source's document, never a listing of ours.
        postpath = postpath[:-1]
    segments = tuple(_checked_segment(raw) for raw in postpath)
    if segments[0] in RESERVED_TOP_LEVEL_NAMES or any(
        segment.startswith(_RESERVED_PREFIX) for segment in segments
    ):
        raise UnsafePath("reserved name", status=404)
    return CacheKey(segments, directory)


def _checked_segment(raw: bytes) -> str:
    if raw in (b"", b".", b".."):
        raise UnsafePath("empty, '.' or '..' path segment")
    if len(raw) > MAX_SEGMENT_BYTES:
        raise UnsafePath("path segment too long")
    try:
        segment = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafePath("path is not UTF-8") from None
    if any(character in segment for character in _FORBIDDEN_CHARACTERS):
        raise UnsafePath("slash, backslash or NUL inside a path segment")
    if not segment.isprintable():
        raise UnsafePath("control character in path")
    return segment

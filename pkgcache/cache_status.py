"""
``Cache-Status`` (RFC 9211): what each cache an answer came through did
with it, one entry per cache, the one nearest the origin first.  pkgcache
writes its own entry under its node name, and reads a peer's or an upper
tier's: whether it was a hit (a peer's answer is taken only then), and
whether a 508 is a pkgcache refusing a loop (``detail=loop``) rather than
some server's own 508.
"""

from __future__ import annotations

import re
from typing import Optional

#: An RFC 8941 token, as an entry's cache name must be (else a string).
_SF_TOKEN = re.compile(rb"[A-Za-z*][A-Za-z0-9:/!#$%&'*+.^_`|~-]*\Z")


def cache_name(node: bytes) -> bytes:
    """``node`` as a cache name: a token if it is one, else quoted
    (a host name that starts with a digit, as a container's often does)."""
    if _SF_TOKEN.match(node):
        return node
    return b'"' + node.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def entry(name: bytes, *parameters: str) -> bytes:
    """One cache's entry: its name, then its parameters."""
    return b"; ".join((name, *(parameter.encode("ascii") for parameter in parameters)))


def _last_parameters(header: Optional[bytes]) -> list[bytes]:
    """The parameters of the last entry (the cache that answered last)."""
    if not header:
        return []
    return [part.strip() for part in header.rsplit(b",", 1)[-1].split(b";")[1:]]


def is_hit(header: Optional[bytes]) -> bool:
    """The last cache answered from its store."""
    return b"hit" in _last_parameters(header)


#: The parameter of a pkgcache's 508: the request came round to it.
LOOP_DETAIL = "detail=loop"


def says_loop(header: Optional[bytes]) -> bool:
    """The last cache refused the request as a loop."""
    return LOOP_DETAIL.encode("ascii") in _last_parameters(header)

"""
``Via`` (RFC 9110, 7.6.3): how a request and its answer say which caches
they passed through, so that tiers of pkgcache nodes (an office's in front
of a datacenter's) can be told apart and a loop (two caches that name each
other as sources) stops at once with 508 instead of going round.

A node adds ``1.1 NAME`` to the ``Via`` of each request it sends to a
source (after what the client's request already had) and of each answer
it serves, and refuses a request whose ``Via`` already names it.
"""

from __future__ import annotations

import re
import socket
from typing import Optional

#: The status of a request that already passed this node (RFC 5842).
LOOP_DETECTED = 508

#: A node name is an RFC 9110 token (``received-by`` as a pseudonym).
_TOKEN_CHARS = r"A-Za-z0-9!#$%&'*+.^_`|~-"
_TOKEN = re.compile(rf"[{_TOKEN_CHARS}]+\Z")


def is_node_name(text: str) -> bool:
    return bool(_TOKEN.match(text))


def default_node_name() -> str:
    """This host's name, made a token (a name with odd characters loses them)."""
    name = re.sub(rf"[^{_TOKEN_CHARS}]", "", socket.gethostname())
    return name or "pkgcache"


def names(via: Optional[bytes]) -> list[bytes]:
    """The ``received-by`` of each entry of a ``Via`` value, in order."""
    if not via:
        return []
    found = []
    for entry in via.split(b","):
        parts = entry.split()
        if len(parts) >= 2:
            found.append(parts[1])
    return found


def passed(via: Optional[bytes], node: bytes) -> bool:
    """``via`` says the message already went through ``node``."""
    return node in names(via)


def last_entry(via: Optional[bytes]) -> Optional[bytes]:
    """The last entry of a ``Via`` (the one :func:`extended` added)."""
    return via.rsplit(b",", 1)[-1].strip() if via else via


def extended(via: Optional[bytes], node: bytes) -> bytes:
    """The ``Via`` to send on: what came, then this node."""
    own = b"1.1 " + node
    return via + b", " + own if via else own

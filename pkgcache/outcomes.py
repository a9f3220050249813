"""
What became of a request, in one vocabulary for the log line, the metrics
and the access log.
"""

from __future__ import annotations

import enum
from typing import Optional


class Outcome(enum.Enum):
    #: served from the cache, no source contacted
    HIT = "hit"
    #: fetched from a source (and cached, if it could be)
    MISS = "miss"
    #: joined a download already in progress
    COALESCED = "coalesced"
    #: an error answer: bad request, no source had it, shutting down...
    ERROR = "error"

    @property
    def body_origin(self) -> Optional[str]:
        """Where the body came from, for the served-bytes metric."""
        if self is Outcome.HIT:
            return "cache"
        if self in (Outcome.MISS, Outcome.COALESCED):
            return "source"
        return None

    def __str__(self) -> str:
        return self.value

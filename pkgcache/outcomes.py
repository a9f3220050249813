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
    #: a stale copy, confirmed by its source (304), served from the cache
    REVALIDATED = "revalidated"
    #: a stale copy served because no source could revalidate it
    STALE = "stale"
    #: a 404 remembered from the sources, none of them asked again
    NEGATIVE = "negative"
    #: an error answer: bad request, no source had it, shutting down...
    ERROR = "error"

    @property
    def body_origin(self) -> Optional[str]:
        """Where the body came from, for the served-bytes metric."""
        if self in (Outcome.HIT, Outcome.REVALIDATED, Outcome.STALE):
            return "cache"
        if self in (Outcome.MISS, Outcome.COALESCED):
            return "source"
        return None

    def __str__(self) -> str:
        return self.value

"""
Which files change in place, and how long a cached copy of one may be
served before the source is asked again.

Package files carry their version in their name and never change: they are
*immutable*, cached until culled.  Indexes (Debian's ``InRelease`` and
``Packages``, PyPI's simple pages...) change under the same name: they are
*volatile*, served from the cache while *fresh* (checked with the source
less than ``max_age`` seconds ago), then revalidated.  When revalidation
fails (every source down, timing out or answering 5xx), a stale copy is
still served for ``stale_if_error`` seconds past its freshness.

When every source answered 404 or 410, that answer is remembered for
``negative_max_age`` seconds (:class:`NegativeCache`), in memory.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from functools import lru_cache
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from twisted.internet.interfaces import IReactorTime

from pkgcache.metadata import EntryMetadata
from pkgcache.paths import CacheKey

DEFAULT_MAX_AGE = 30.0
DEFAULT_NEGATIVE_MAX_AGE = 60.0
DEFAULT_STALE_IF_ERROR = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Rule:
    """A pattern matched (``re.search``) against the request path, and why."""

    pattern: str
    reason: str


_DEBIAN: tuple[Rule, ...] = (
    Rule(r"(^|/)dists/(.+/)?(InRelease|Release|Release\.gpg)$",
         "Debian/Ubuntu: the signed list of a suite's indexes, rewritten on every publish"),
    Rule(r"(^|/)dists/.+/(Packages|Sources|Contents-|Translation-|Components-|icons-)[^/]*$",
         "Debian/Ubuntu: the indexes of a suite, under their canonical names"),
    Rule(r"/Index$", "Debian/Ubuntu: the list of pdiffs of an index"),
)
_SUMS = (Rule(r"SUMS[^/]*$", "checksum lists (SHA256SUMS...) of releases and images"),)
_GENTOO: tuple[Rule, ...] = (
    Rule(r"(^|/)distfiles/layout\.conf$", "Gentoo: how a mirror lays out its distfiles"),
    Rule(r"(^|/)snapshots/[^/]*latest[^/]*$", "Gentoo: the newest tree snapshot"),
    Rule(r"(^|/)releases/.+/latest-[^/]*\.txt$", "Gentoo: pointers to the newest stage files"),
)
_PYPI = (Rule(r"(^|/)simple/", "PyPI: the simple index and its project pages"),)
_NPM = (
    Rule(r"^/(@[^/]+/)?[^/@][^/]*(/[^/-][^/]*)?$",
         "npm: package documents (/NAME, /@SCOPE/NAME) and their versions (/NAME/latest)"),
)
_RPM = (
    Rule(r"(^|/)repodata/repomd\.xml(\.asc)?$",
         "RPM: the repository's index of indexes, and its signature"),
)
_OTHERS: tuple[Rule, ...] = (
    Rule(r"(^|/)APKINDEX\.tar\.gz$", "Alpine: the repository index"),
    Rule(r"(^|/)repodata\.json[^/]*$", "conda: the channel index"),
)

#: Files that change in place, by the kind of repository a mirror is; a
#: ``generic`` tree (``--source``) may hold any of them.  The README lists
#: them with these reasons.
VOLATILE_BY_KIND: dict[str, tuple[Rule, ...]] = {
    "debian": _DEBIAN + _SUMS,
    "ubuntu": _DEBIAN + _SUMS,
    "gentoo": _GENTOO + _SUMS,
    "pypi": _PYPI,
    "rpm": _RPM + _SUMS,
    "npm": _NPM,
    "generic": _DEBIAN + _SUMS + _GENTOO + _PYPI + _RPM + _OTHERS,
}
VOLATILE_DEFAULTS = VOLATILE_BY_KIND["generic"]

#: Exceptions to the defaults: content-addressed or versioned files, which
#: never change even where a default pattern would match.
IMMUTABLE_DEFAULTS: tuple[Rule, ...] = (
    Rule(r"(^|/)by-hash/", "Debian/Ubuntu: indexes named by their own hash"),
    Rule(r"(^|/)pool/", "Debian/Ubuntu: the packages themselves"),
)


def _compiled(rules: Iterable[Rule]) -> "re.Pattern[str]":
    return re.compile("|".join(f"(?:{rule.pattern})" for rule in rules))


class Freshness:
    """
    The freshness rules of one cache.

    :param volatile: more patterns (regular expressions searched in the
        request path, such as ``/dists/x/InRelease``) of volatile files;
        these win over the immutable defaults.
    :param max_age: seconds a volatile file stays fresh after a check.
    :param negative_max_age: seconds a 404 from every source is remembered.
    :param stale_if_error: seconds past its freshness that a volatile copy
        is still served when no source can revalidate it (0: never).
    :param min_revalidation_interval: a client's ``no-cache`` or
        ``max-age`` forces a revalidation only of a copy checked at least
        this many seconds ago (apt, pip and uv send ``max-age=0`` with
        every index request; 0: always).
    :param clock: tells the time of checks and ages.
    :param kind: which defaults apply (a key of :data:`VOLATILE_BY_KIND`).
    :raises re.error: if a pattern is not a valid regular expression.
    """

    def __init__(
        self,
        volatile: Sequence[str] = (),
        *,
        kind: str = "generic",
        max_age: float = DEFAULT_MAX_AGE,
        negative_max_age: float = DEFAULT_NEGATIVE_MAX_AGE,
        stale_if_error: float = DEFAULT_STALE_IF_ERROR,
        min_revalidation_interval: float = 0.0,
        clock: IReactorTime,
    ) -> None:
        self.max_age = max_age
        self.min_revalidation_interval = min_revalidation_interval
        self.negative_max_age = negative_max_age
        self.stale_if_error = stale_if_error
        self.clock = clock
        # Each on its own: flags such as (?i) apply to one pattern only.
        self._extra = [re.compile(pattern) for pattern in volatile]
        self._defaults = _compiled(VOLATILE_BY_KIND[kind])
        self._immutable = _compiled(IMMUTABLE_DEFAULTS)
        self.negative = NegativeCache(negative_max_age, clock)
        #: Paths whose revalidation just failed: for ``max_age`` seconds
        #: their stale copies are served without waiting on the sources
        #: again (a mirror that times out would hold every client).
        self.unreachable = NegativeCache(max_age, clock)
        # Asked on every request: remembered for the paths asked most.
        self.is_volatile = lru_cache(maxsize=16384)(self._is_volatile)

    def _is_volatile(self, key: CacheKey) -> bool:
        """Whether the file at ``key`` may change under its name."""
        if key.directory:
            return True
        path = str(key)
        if any(pattern.search(path) for pattern in self._extra):
            return True
        return bool(self._defaults.search(path)) and not self._immutable.search(path)

    def age(self, metadata: EntryMetadata) -> float:
        """Seconds since the copy was last checked with its source."""
        if metadata.checked is None:
            return float("inf")
        return max(0.0, self.clock.seconds() - metadata.checked)

    def is_fresh(self, metadata: EntryMetadata, client_max_age: Optional[float] = None) -> bool:
        """
        Whether a volatile copy may be served without asking its source:
        checked within ``max_age`` (and within the client's own
        ``Cache-Control: max-age``, if it sent one, but never less than
        ``min_revalidation_interval``).
        """
        limit = self.max_age
        if client_max_age is not None:
            limit = min(limit, max(client_max_age, self.min_revalidation_interval))
        return self.age(metadata) < limit

    def ttl(self, metadata: EntryMetadata) -> int:
        """Whole seconds a fresh copy stays fresh, for ``Cache-Status``."""
        return max(0, int(self.max_age - self.age(metadata)))

    def may_serve_stale(self, metadata: EntryMetadata) -> bool:
        """Whether a copy that could not be revalidated may still be served."""
        return self.age(metadata) <= self.max_age + self.stale_if_error


class NegativeCache:
    """
    Paths that every source answered 404 or 410 for, until ``max_age``
    seconds have passed; at most ``max_entries``, the oldest forgotten
    first, so that a scan of made-up paths cannot fill memory.
    """

    def __init__(self, max_age: float, clock: IReactorTime, max_entries: int = 100_000) -> None:
        self.max_age = max_age
        self._clock = clock
        self._max_entries = max_entries
        self._until: OrderedDict[CacheKey, float] = OrderedDict()

    def remember(self, key: CacheKey) -> None:
        if self.max_age <= 0:
            return
        self._until.pop(key, None)
        self._until[key] = self._clock.seconds() + self.max_age
        while len(self._until) > self._max_entries:
            self._until.popitem(last=False)

    def __contains__(self, key: CacheKey) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if self._clock.seconds() < until:
            return True
        del self._until[key]
        return False

    def forget(self, key: CacheKey) -> None:
        self._until.pop(key, None)

    def __len__(self) -> int:
        return len(self._until)

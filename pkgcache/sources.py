"""
The mirrors files come from, why one of them failed, and which are in
back-off.

Nothing here talks to the network: :mod:`pkgcache.upstream` asks the
sources, in the order :meth:`SourceHealth.order` gives, and records here
what became of each.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence
from urllib.parse import quote

from hyperlink import DecodedURL
from twisted.internet.interfaces import IReactorTime
from twisted.web import http

from pkgcache.paths import CacheKey
from pkgcache.via import LOOP_DETECTED

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers


class Source:
    """
    A base URL that files are fetched below: ``Source("https://m/gentoo/")``
    serves ``/distfiles/x`` from ``https://m/gentoo/distfiles/x``.
    """

    def __init__(self, text: str) -> None:
        """
        :raises ValueError: if ``text`` is not an absolute http(s) URL.
        """
        try:
            url = DecodedURL.from_text(text)
        except Exception as exc:
            raise ValueError(f"not a URL: {text!r} ({exc})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http:// or https:// URL: {text!r}")
        if url.query or url.fragment:
            raise ValueError(f"a source URL has no query or fragment: {text!r}")
        self.url = url
        self.text = text
        base = url.to_uri().to_text()
        self._base = base if base.endswith("/") else base + "/"

    def url_for(self, key: CacheKey) -> str:
        """
        The URL of ``key`` on this source.

        Each segment is percent-encoded as one path segment (``@`` kept, as
        npm writes scoped names), so a key can never reach another host or
        climb out of the source's base path.
        """
        if key.remote:
            return self._base + key.remote
        path = "/".join(quote(segment, safe="@") for segment in key.segments)
        return self._base + path + ("/" if key.directory else "")

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Source({self.text!r})"


class Peer(Source):
    """
    A sibling pkgcache node (``--peer``), with the same mirrors as this
    one: asked for the path a client asked this node for, below the
    node's root URL, and only for what it has in its cache.
    """

    def url_for(self, key: CacheKey) -> str:
        raise TypeError("a peer is asked by the path a client asked for: see url_of_path")

    def url_of_path(self, path: bytes) -> str:
        """The URL of ``path`` (absolute, as a client sent it) on the peer."""
        # Escapes kept as sent; a byte no URL may hold is escaped.
        return self._base + quote(path.lstrip(b"/"), safe="/%!$&'()*+,;=:@-._~")

    def __repr__(self) -> str:
        return f"Peer({self.text!r})"


class FailureKind(enum.Enum):
    """
    Why a source did not give us the file; decides what we tell the client
    and whether the source is put in back-off.
    """

    NOT_FOUND = "not found"
    TIMEOUT = "timed out"
    CONNECTION = "connection failed"
    SERVER_ERROR = "server error"
    REDIRECT_REFUSED = "redirect refused"
    TOO_LARGE = "too large"
    UNUSABLE = "unusable answer"
    #: A pkgcache's 508: our request had passed through it already (a
    #: cache whose sources lead back to us, or, for a peer, this very
    #: node).  Not a sign of the source's health: a client's Via can
    #: name any node.
    LOOP = "loop detected"

    @property
    def marks_source_down(self) -> bool:
        return self in (FailureKind.TIMEOUT, FailureKind.CONNECTION, FailureKind.SERVER_ERROR)


@dataclass(frozen=True)
class Attempt:
    """One source's failure to provide a file."""

    source: Source
    kind: FailureKind
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.kind.value} ({self.detail})"


class AllSourcesFailed(Exception):
    """
    No source provided the file.

    :ivar attempts: every source's failure, in the order tried.
    :ivar configured: how many sources there are (so whether all were asked).
    """

    def __init__(self, attempts: Sequence[Attempt], configured: Optional[int] = None) -> None:
        super().__init__("; ".join(str(attempt) for attempt in attempts))
        self.attempts = list(attempts)
        self.configured = len(self.attempts) if configured is None else configured

    @property
    def not_found(self) -> bool:
        """
        Every configured source was asked and said 404 or 410: an answer
        worth remembering, unlike a failure of any other kind.
        """
        return len(self.attempts) >= self.configured and self.status == http.NOT_FOUND

    @property
    def status(self) -> int:
        """
        The HTTP status for the client: 404 only when every source said
        404/410 (sources in back-off included: they are asked last, so a
        file only they have is never denied), 504 when every source timed
        out, 508 when every source said the request came round to it
        (passed on, so that the client of a loop hears of the loop), else
        502.
        """
        kinds = {attempt.kind for attempt in self.attempts}
        if kinds == {FailureKind.NOT_FOUND}:
            return http.NOT_FOUND
        if kinds == {FailureKind.TIMEOUT}:
            return http.GATEWAY_TIMEOUT
        if kinds == {FailureKind.LOOP}:
            return LOOP_DETECTED
        return http.BAD_GATEWAY


class SourceHealth:
    """
    Which sources are in back-off, and until when.

    A source that fails in a way that :attr:`FailureKind.marks_source_down`
    goes to the end of the order for ``initial_backoff`` seconds, doubling
    on each further failure up to ``max_backoff``; a success forgets its
    history.  A 404 says nothing about health.  A failure while it is in
    back-off already (of requests that were under way when it went down,
    or of its last-resort tries) does not lengthen it: one outage, one
    doubling, however many requests met it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        initial_backoff: float = 10.0,
        max_backoff: float = 600.0,
    ) -> None:
        self._clock = clock
        self._initial = initial_backoff
        self._max = max_backoff
        self._failures: dict[Source, int] = {}
        self._down_until: dict[Source, float] = {}

    def is_down(self, source: Source) -> bool:
        return self._down_until.get(source, 0.0) > self._clock.seconds()

    def record_failure(self, source: Source) -> float:
        """
        Put ``source`` in back-off (or leave it there).

        :return: for how many seconds.
        """
        now = self._clock.seconds()
        if self.is_down(source):
            return self._down_until[source] - now
        failures = self._failures.get(source, 0) + 1
        self._failures[source] = failures
        backoff = min(self._initial * 2 ** min(failures - 1, 32), self._max)
        self._down_until[source] = now + backoff
        return backoff

    def record_success(self, source: Source) -> None:
        self._failures.pop(source, None)
        self._down_until.pop(source, None)

    def order(self, sources: Sequence[Source]) -> list[Source]:
        """
        Every source, in the order to ask them: those not in back-off first,
        then those in back-off, as a last resort (each group keeping the
        order given).  A dead mirror then costs nothing while another has
        the file, and a file that only it has is still fetched.
        """
        down = [source for source in sources if self.is_down(source)]
        return [source for source in sources if source not in down] + down


class SourceAnswer:
    """
    What the headers of a source's answer say, for whoever holds them as
    ``code`` and ``headers`` (a :class:`twisted.web.http_headers.Headers`):
    a response being received, or one another process received
    (:mod:`pkgcache.shared_spool`).
    """

    code: int
    headers: "Headers"

    @property
    def not_modified(self) -> bool:
        """The source said the copy we have is still its file (304)."""
        return self.code == http.NOT_MODIFIED

    def header(self, name: bytes) -> Optional[bytes]:
        return self.headers.getRawHeaders(name, [None])[0]

    def header_line(self, name: bytes) -> Optional[bytes]:
        """Every line of a list header (``Via``, ``Cache-Status``) as one."""
        lines = self.headers.getRawHeaders(name)
        return b", ".join(lines) if lines else None

    @property
    def content_type(self) -> Optional[bytes]:
        return self.header(b"content-type")

    @property
    def last_modified(self) -> Optional[float]:
        """``Last-Modified`` as seconds since the epoch, or ``None``."""
        value = self.header(b"last-modified")
        if value is None:
            return None
        try:
            return float(http.stringToDatetime(value))
        except (ValueError, IndexError, KeyError):
            return None

"""
Where a source may redirect us.

treq's own redirect agent follows a ``Location`` to any host and scheme, so a
mirror, or anyone who can answer for an ``http://`` source, could send pkgcache
to ``169.254.169.254`` or ``localhost``, or from https down to http, and have
the answer cached.  :class:`RedirectPolicyAgent` follows a redirect only to
the origin (scheme, host and port) of a configured source, never from https to
http, and at most ``max_hops`` times; anything else fails the request with
:class:`RedirectRefused`, which the upstream client counts as that source's
failure.  Use it with treq's ``allow_redirects=False``, so that treq adds no
redirect agent of its own::

    agent = RedirectPolicyAgent(Agent(reactor), allowed_origins(source_urls))
    HTTPClient(agent).get(url, allow_redirects=False, unbuffered=True)
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Union
from urllib.parse import urljoin

from hyperlink import URL, DecodedURL
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

_REDIRECTS = frozenset(
    {
        http.MOVED_PERMANENTLY,
        http.FOUND,
        http.SEE_OTHER,
        http.TEMPORARY_REDIRECT,
        http.PERMANENT_REDIRECT,
    }
)

# pkgcache sends nothing else, and these two can be repeated as they are
# (the same method, no body) whatever the redirect's status: 303 included.
_FOLLOWED_METHODS = frozenset({b"GET", b"HEAD"})


class RedirectRefused(Exception):
    """
    A redirect that must not be followed; the message says why, in a
    sentence fit for a log line and a 502 body.
    """


class Origin(NamedTuple):
    """
    Where a URL's requests go (RFC 6454): the scheme and host in lower
    case, and the port with the scheme's default filled in.
    """

    scheme: str
    host: str
    port: Optional[int]


def origin_of(url: Union[str, URL, DecodedURL]) -> Origin:
    """
    The origin of ``url``: ``HTTPS://Mirror.Example/x`` and
    ``https://mirror.example:443/`` have the same.

    :raises ValueError: if ``url`` is text that is not a URL.
    """
    if isinstance(url, DecodedURL):
        url = url.encoded_url
    elif isinstance(url, str):
        url = URL.from_text(url)
    return _origin(_to_uri(url))


def allowed_origins(urls: Iterable[Union[str, URL, DecodedURL]]) -> frozenset[Origin]:
    """
    The origins of the configured sources' URLs: where redirects may lead.

    :raises ValueError: for a URL that is not an absolute http(s) URL, since
        its origin could never be fetched from.
    """
    origins = set()
    for url in urls:
        origin = origin_of(url)
        if origin.scheme not in ("http", "https") or not origin.host:
            raise ValueError(f"not an http:// or https:// URL: {url}")
        origins.add(origin)
    return frozenset(origins)


@implementer(IAgent)
class RedirectPolicyAgent:
    """
    Follows redirects, but only to the allowed origins (see the module's
    docstring).  The final answer is the wrapped agent's own response; the
    redirects before it are its ``previousResponse`` chain, as Twisted's
    ``RedirectAgent`` sets it (treq's ``history()`` reads it), each with the
    URL it answered in ``request.absoluteURI``.

    Each hop repeats the method and every request header (``User-Agent``,
    ``Range``, conditional headers): the allowed origins are all sources we
    trust with them.  A redirect's own body is never read.

    :param agent: makes each hop's request.
    :param allowed: the origins redirects may lead to, usually
        :func:`allowed_origins` of the sources.
    :param max_hops: how many redirects one request may follow, so that no
        redirect loop runs for ever.
    """

    def __init__(self, agent: IAgent, allowed: Iterable[Origin], max_hops: int = 5) -> None:
        self._agent = agent
        self.allowed = frozenset(allowed)
        self.max_hops = max_hops

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> "Deferred[IResponse]":
        """
        See ``IAgent.request``; cancelling cancels the hop in progress, whose
        failure (``ResponseNeverReceived`` from Twisted's client) is passed on
        as it is.

        :raises RedirectRefused: (as the Deferred's failure) for a redirect
            that is not followed.
        """
        return Deferred.fromCoroutine(self._follow(method, uri, headers, bodyProducer))

    async def _follow(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers],
        body_producer: Optional[IBodyProducer],
    ) -> IResponse:
        hops = 0
        previous: Optional[IResponse] = None
        while True:
            response = await self._agent.request(method, uri, headers, body_producer)
            if previous is not None:
                response.setPreviousResponse(previous)
            if response.code not in _REDIRECTS:
                return response
            # Reading a redirect's body could take for ever; closing its
            # connection costs at most a new one.
            response.deliverBody(DiscardBody())
            if method not in _FOLLOWED_METHODS:
                raise RedirectRefused(
                    f"redirect of a {method.decode('ascii', 'replace')} request"
                )
            if hops == self.max_hops:
                raise RedirectRefused(f"more than {self.max_hops} redirects")
            uri = self._next_uri(uri, response.headers.getRawHeaders(b"location", []))
            hops += 1
            previous = response
            # A body cannot be sent twice; a GET or a HEAD has none anyway.
            body_producer = None

    def _next_uri(self, current: bytes, locations: list[bytes]) -> bytes:
        """
        Where a redirect from ``current`` to ``locations`` leads, if we may go.

        :raises RedirectRefused: if we may not.
        """
        if not locations:
            raise RedirectRefused("redirect with no Location")
        if len(set(locations)) > 1:
            raise RedirectRefused("redirect with several Locations")
        location = locations[0]
        try:
            # Not hyperlink's URL.click: it resolves "//host/x" with the
            # current URL's port, and "file:///x" with the current host.
            # urljoin follows RFC 3986 section 5.
            joined = urljoin(current.decode("ascii"), location.decode("utf-8"))
            # Twisted's client would take "user@host" for the host; the
            # fragment is never sent.
            target = _to_uri(URL.from_text(joined).replace(userinfo="", fragment=""))
            text = target.to_text()
        except ValueError:
            shown = location.decode("utf-8", "replace")
            raise RedirectRefused(f"redirect to {shown!r}, which is not a URL") from None
        origin = _origin(target)
        if origin.scheme not in ("http", "https"):
            raise RedirectRefused(f"redirect to a non-http(s) URL {text}")
        if current.lower().startswith(b"https:") and origin.scheme == "http":
            raise RedirectRefused(f"redirect from https to http ({text})")
        if origin not in self.allowed:
            raise RedirectRefused(f"redirect to {text} leaves the sources")
        return text.encode("ascii")


class DiscardBody(Protocol):
    """Closes an unwanted body's connection instead of reading it."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _to_uri(url: URL) -> URL:
    """
    ``url`` in ASCII, as requests need it.

    :raises ValueError: if its host cannot be IDNA-encoded.
    """
    if ":" in url.host:
        # An IPv6 literal: hyperlink would put it through IDNA, which
        # refuses colons.
        return url.replace(host="").to_uri().replace(host=url.host)
    return url.to_uri()


def _origin(url: URL) -> Origin:
    """The origin of ``url``, already in ASCII."""
    # Replacing the scheme makes hyperlink fill in its default port, which
    # it skips for "HTTP://".
    url = url.replace(scheme=url.scheme.lower())
    return Origin(url.scheme, url.host.lower(), url.port)

"""
The redirect policy: followed only to a configured source's origin, never
from https to http, at most five times; headers kept, redirect bodies never
read, cancellation passed through.

Most tests use real servers on loopback, 127.0.0.2 standing for "another
host"; https, and what the wrapped agent is asked exactly, use a fake agent.
"""

from __future__ import annotations

from typing import Optional

import pytest
import pytest_twisted
from hyperlink import URL, DecodedURL
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionClosed
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from pkgcache.redirects import (
    Origin,
    RedirectPolicyAgent,
    RedirectRefused,
    allowed_origins,
    origin_of,
)
from tests.conftest import wait_for
from tests.origin import Origin as OriginResource, OriginServer

# Long enough for any loopback exchange; only reached if a test is broken.
TIMEOUT = 10


# -- Real servers ------------------------------------------------------------


class HeaderOrigin(OriginResource):
    """An origin that also keeps each request's headers, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[Headers] = []

    def render(self, request: Request):
        self.headers.append(request.requestHeaders)
        return super().render(request)


class Server(OriginServer):
    """An origin server on any loopback address (127.0.0.2: another host)."""

    def __init__(self, interface: str = "127.0.0.1") -> None:
        self.origin = HeaderOrigin()
        self.site = Site(self.origin)
        self.site.log = lambda request: None
        self.port = reactor.listenTCP(0, self.site, interface=interface)
        self.url = f"http://{interface}:{self.port.getHost().port}/"


@pytest_twisted.async_yield_fixture
async def servers():
    """Make servers with ``servers(interface)``; all stop after the test."""
    started: list[Server] = []

    def make(interface: str = "127.0.0.1") -> Server:
        started.append(Server(interface))
        return started[-1]

    yield make
    for server in started:
        await server.stop()


@pytest_twisted.async_yield_fixture
async def agent():
    """A plain Agent over a persistent pool, as the upstream client has."""
    pool = HTTPConnectionPool(reactor)
    yield Agent(reactor, pool=pool)
    await pool.closeCachedConnections()


def redirect(server: Server, path: str, location: str, status: int = 302) -> None:
    server.add(path, status=status, headers={b"location": location.encode("ascii")})


async def get(
    agent: IAgent, sources: list[str], url: str, method: bytes = b"GET", headers=None
):
    """A request through the policy for ``sources``: ``(response, body)``."""
    policy = RedirectPolicyAgent(agent, allowed_origins(sources))
    requesting = policy.request(method, url.encode("ascii"), Headers(headers))
    response = await requesting.addTimeout(TIMEOUT, reactor)
    return response, await readBody(response).addTimeout(TIMEOUT, reactor)


async def refusal(agent: IAgent, sources: list[str], url: str) -> str:
    """The message of the :class:`RedirectRefused` a request fails with."""
    with pytest.raises(RedirectRefused) as refused:
        await get(agent, sources, url)
    return str(refused.value)


# -- A fake agent, for https and for what each hop asks ----------------------


class FakeResponse:
    """
    An answer with headers only; its body's transport records
    ``stopProducing``.
    """

    def __init__(self, code: int, headers: dict) -> None:
        self.code = code
        self.headers = Headers(headers)
        self.previousResponse: Optional[FakeResponse] = None
        self.stopped = False

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(self)

    def stopProducing(self) -> None:
        self.stopped = True

    def setPreviousResponse(self, response: "FakeResponse") -> None:
        self.previousResponse = response


@implementer(IAgent)
class FakeAgent:
    """
    Answers each URL from a table (404 when absent), and records every
    request as ``(method, uri, headers)`` and every response.

    :ivar hanging: URLs never answered; cancelling one fails it with
        :attr:`cancel_failure`.
    """

    def __init__(self, answers: dict[str, tuple[int, dict]]) -> None:
        self.answers = answers
        self.requests: list[tuple[bytes, bytes, Optional[Headers]]] = []
        self.responses: list[FakeResponse] = []
        self.hanging: set[str] = set()
        self.cancel_failure = Exception("cancelled in the wrapped agent")

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests.append((method, uri, headers))
        if uri.decode("ascii") in self.hanging:
            return Deferred(lambda d: d.errback(self.cancel_failure))
        code, response_headers = self.answers.get(uri.decode("ascii"), (404, {}))
        self.responses.append(FakeResponse(code, response_headers))
        return succeed(self.responses[-1])

    @property
    def uris(self) -> list[str]:
        return [uri.decode("ascii") for _, uri, _ in self.requests]


def moved(location: str, status: int = 302) -> tuple[int, dict]:
    return status, {b"location": [location.encode("ascii")]}


OK = (200, {})


async def fake_get(
    fake: FakeAgent, sources: list[str], url: str, method: bytes = b"GET"
) -> FakeResponse:
    policy = RedirectPolicyAgent(fake, allowed_origins(sources))
    return await policy.request(method, url.encode("ascii"))


async def fake_refusal(fake: FakeAgent, sources: list[str], url: str) -> str:
    with pytest.raises(RedirectRefused) as refused:
        await fake_get(fake, sources, url)
    return str(refused.value)


# -- Origins -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url, origin",
    [
        ("http://m.example/debian/", Origin("http", "m.example", 80)),
        ("HTTPS://M.Example/x", Origin("https", "m.example", 443)),
        ("https://m.example:443/", Origin("https", "m.example", 443)),
        ("http://m.example:8080", Origin("http", "m.example", 8080)),
        ("http://user:pw@m.example/", Origin("http", "m.example", 80)),
        ("http://ex\u00e4mple.com/", Origin("http", "xn--exmple-cua.com", 80)),
        ("http://[::1]:8080/", Origin("http", "::1", 8080)),
    ],
)
def test_origin_fills_default_ports_and_ignores_case(url, origin):
    assert origin_of(url) == origin


def test_allowed_origins_from_text_and_hyperlink_urls():
    allowed = allowed_origins(
        ["http://a.example/x/", URL.from_text("https://b.example/"),
         DecodedURL.from_text("http://A.example:80/y/")]
    )
    assert allowed == {Origin("http", "a.example", 80), Origin("https", "b.example", 443)}


@pytest.mark.parametrize("url", ["ftp://m.example/", "/relative", "http://[::1", "https:///x"])
def test_allowed_origins_refuses_what_cannot_be_a_source(url):
    with pytest.raises(ValueError):
        allowed_origins([url])


# -- Followed ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_relative_location_resolves_against_the_current_url(servers, agent):
    # Twisted's own RedirectAgent resolves every hop against the first URL.
    server = servers()
    redirect(server, "/a/x", "../b/y")
    redirect(server, "/b/y", "z?q=1")
    server.add("/b/z", b"here")
    response, body = await get(agent, [server.url], server.url + "a/x")
    assert (response.code, body) == (200, b"here")
    assert [path for _, path, _ in server.origin.requests] == ["/a/x", "/b/y", "/b/z"]


@pytest_twisted.ensureDeferred
async def test_absolute_location_on_the_same_origin(servers, agent):
    server = servers()
    redirect(server, "/old", server.url + "new", status=301)
    server.add("/new", b"moved")
    _, body = await get(agent, [server.url + "debian/"], server.url + "old")
    assert body == b"moved"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest_twisted.ensureDeferred
async def test_every_redirect_status_is_followed(servers, agent, status):
    server = servers()
    redirect(server, "/a", "/b", status=status)
    server.add("/b", b"b")
    response, body = await get(agent, [server.url], server.url + "a")
    assert (response.code, body) == (200, b"b")


@pytest_twisted.ensureDeferred
async def test_redirect_to_another_configured_source(servers, agent):
    first, second = servers("127.0.0.1"), servers("127.0.0.2")
    redirect(first, "/pool/x", second.url + "mirror/pool/x")
    second.add("/mirror/pool/x", b"from the second")
    _, body = await get(agent, [first.url, second.url + "mirror/"], first.url + "pool/x")
    assert body == b"from the second"


@pytest_twisted.ensureDeferred
async def test_five_hops_are_followed(servers, agent):
    server = servers()
    for hop in range(5):
        redirect(server, f"/{hop}", f"/{hop + 1}")
    server.add("/5", b"end")
    response, body = await get(agent, [server.url], server.url + "0")
    assert body == b"end"
    chain = []
    while response is not None:
        chain.append(response.request.absoluteURI.decode("ascii"))
        response = response.previousResponse
    assert chain == [server.url + str(hop) for hop in reversed(range(6))]


@pytest_twisted.ensureDeferred
async def test_headers_and_method_reach_the_final_server(servers, agent):
    first, second = servers("127.0.0.1"), servers("127.0.0.2")
    redirect(first, "/x", second.url + "x", status=303)
    second.add("/x", b"0123456789")
    headers = {b"User-Agent": [b"pkgcache/test"], b"Range": [b"bytes=4-"]}
    response, body = await get(agent, [first.url, second.url], first.url + "x", headers=headers)
    assert (response.code, body) == (206, b"456789")
    seen = second.origin.headers[0]
    assert seen.getRawHeaders(b"user-agent") == [b"pkgcache/test"]
    assert seen.getRawHeaders(b"range") == [b"bytes=4-"]
    response, _ = await get(agent, [first.url, second.url], first.url + "x", method=b"HEAD")
    assert response.code == 200
    assert second.origin.requests[-1][:2] == (b"HEAD", "/x")


@pytest_twisted.ensureDeferred
async def test_through_treq_without_its_redirects(servers, agent):
    server = servers()
    redirect(server, "/a", "/b")
    server.add("/b", b"b")
    client = HTTPClient(RedirectPolicyAgent(agent, allowed_origins([server.url])))
    response = await client.get(
        server.url + "a", allow_redirects=False, unbuffered=True,
        headers={b"User-Agent": [b"pkgcache/test"]},
    ).addTimeout(TIMEOUT, reactor)
    assert await response.content() == b"b"
    assert [r.code for r in response.history()] == [302]
    assert server.origin.headers[-1].getRawHeaders(b"user-agent") == [b"pkgcache/test"]


@pytest_twisted.ensureDeferred
async def test_each_hop_asks_for_the_same_with_no_fragment():
    fake = FakeAgent({
        "https://m.example/a": moved("/b#part", status=303),
        "https://m.example/b": moved("https://MIRROR.example/c"),
        "https://mirror.example/c": OK,
    })
    headers = Headers({b"range": [b"bytes=10-"], b"if-none-match": [b'"e"']})
    policy = RedirectPolicyAgent(
        fake, allowed_origins(["https://m.example/", "https://mirror.example/"])
    )
    response = await policy.request(b"HEAD", b"https://m.example/a", headers)
    assert response.code == 200
    assert fake.uris == ["https://m.example/a", "https://m.example/b", "https://mirror.example/c"]
    assert [method for method, _, _ in fake.requests] == [b"HEAD"] * 3
    assert all(sent is headers for _, _, sent in fake.requests)


@pytest_twisted.ensureDeferred
async def test_http_to_https_when_https_is_a_source():
    fake = FakeAgent({"http://m.example/a": moved("https://m.example/a"),
                      "https://m.example/a": OK})
    response = await fake_get(fake, ["http://m.example/", "https://m.example/"],
                              "http://m.example/a")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_ipv6_sources():
    fake = FakeAgent({"http://[::1]:8080/a": moved("http://[::1]:8080/b"),
                      "http://[::1]:8080/b": OK})
    response = await fake_get(fake, ["http://[::1]:8080/"], "http://[::1]:8080/a")
    assert response.code == 200


@pytest.mark.parametrize("status", [300, 304, 305])
@pytest_twisted.ensureDeferred
async def test_other_3xx_answers_are_returned(status):
    fake = FakeAgent({"http://m.example/a": moved("/b", status=status)})
    response = await fake_get(fake, ["http://m.example/"], "http://m.example/a")
    assert response.code == status
    assert not response.stopped
    assert fake.uris == ["http://m.example/a"]


# -- Refused -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_another_host_is_refused(servers, agent):
    source, other = servers("127.0.0.1"), servers("127.0.0.2")
    redirect(source, "/x", other.url + "x")
    other.add("/x", b"not to be fetched")
    message = await refusal(agent, [source.url], source.url + "x")
    assert message == f"redirect to {other.url}x leaves the sources"
    assert other.origin.requests == []


@pytest_twisted.ensureDeferred
async def test_another_port_is_refused(servers, agent):
    source, other = servers(), servers()
    redirect(source, "/x", other.url + "x")
    other.add("/x", b"not to be fetched")
    assert "leaves the sources" in await refusal(agent, [source.url], source.url + "x")
    assert other.origin.requests == []


@pytest.mark.parametrize(
    "location",
    ["http://169.254.169.254/latest/meta-data/", "//localhost/x", "http://127.1/x",
     "http://m.example.evil/x", "http://m.example:8080/x"],
)
@pytest_twisted.ensureDeferred
async def test_off_source_locations_are_refused(location):
    fake = FakeAgent({"http://m.example/a": moved(location)})
    message = await fake_refusal(fake, ["http://m.example/"], "http://m.example/a")
    assert message.endswith("leaves the sources")
    assert fake.uris == ["http://m.example/a"]


@pytest_twisted.ensureDeferred
async def test_https_to_http_is_refused_even_to_a_source():
    fake = FakeAgent({"https://m.example/a": moved("http://m.example/a")})
    message = await fake_refusal(
        fake, ["https://m.example/", "http://m.example/"], "https://m.example/a"
    )
    assert message == "redirect from https to http (http://m.example/a)"
    assert fake.uris == ["https://m.example/a"]


@pytest_twisted.ensureDeferred
async def test_http_to_https_needs_an_https_source():
    fake = FakeAgent({"http://m.example/a": moved("https://m.example/a")})
    message = await fake_refusal(fake, ["http://m.example/"], "http://m.example/a")
    assert message == "redirect to https://m.example/a leaves the sources"


@pytest_twisted.ensureDeferred
async def test_six_hops_are_refused(servers, agent):
    server = servers()
    for hop in range(6):
        redirect(server, f"/{hop}", f"/{hop + 1}")
    server.add("/6", b"never reached")
    assert await refusal(agent, [server.url], server.url + "0") == "more than 5 redirects"
    assert server.count("/6") == 0


@pytest_twisted.ensureDeferred
async def test_a_loop_ends(servers, agent):
    server = servers()
    redirect(server, "/loop", "/loop")
    assert await refusal(agent, [server.url], server.url + "loop") == "more than 5 redirects"
    assert server.count("/loop") == 6


@pytest_twisted.ensureDeferred
async def test_no_location_is_refused(servers, agent):
    server = servers()
    server.add("/x", status=302)
    assert await refusal(agent, [server.url], server.url + "x") == "redirect with no Location"


@pytest_twisted.ensureDeferred
async def test_several_locations_are_refused():
    fake = FakeAgent({"http://m.example/a": (302, {b"location": [b"/b", b"/c"]})})
    message = await fake_refusal(fake, ["http://m.example/"], "http://m.example/a")
    assert message == "redirect with several Locations"


@pytest.mark.parametrize(
    "location",
    [b"http://[::1", b"http://m.example:port/", b"http://m.example:/", b"http://a b/",
     b"http://-\xc3\xa4-.example/", b"\xff\xfe", b"http://xn--/"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_locations_are_refused(location):
    fake = FakeAgent({"http://m.example/a": (302, {b"location": [location]})})
    message = await fake_refusal(fake, ["http://m.example/"], "http://m.example/a")
    assert message.endswith("which is not a URL")
    assert fake.uris == ["http://m.example/a"]


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "ftp://m.example/x", "javascript:alert(1)", "data:,x"]
)
@pytest_twisted.ensureDeferred
async def test_other_schemes_are_refused(location):
    fake = FakeAgent({"http://m.example/a": moved(location)})
    message = await fake_refusal(fake, ["http://m.example/"], "http://m.example/a")
    assert message == f"redirect to a non-http(s) URL {location}"


@pytest_twisted.ensureDeferred
async def test_other_methods_are_not_redirected():
    fake = FakeAgent({"http://m.example/a": moved("/b")})
    policy = RedirectPolicyAgent(fake, allowed_origins(["http://m.example/"]))
    with pytest.raises(RedirectRefused, match="redirect of a POST request"):
        await policy.request(b"POST", b"http://m.example/a")


@pytest_twisted.ensureDeferred
async def test_location_on_a_refused_url_is_shown_in_ascii():
    fake = FakeAgent({"http://m.example/a": (302, {b"location": [b"http://e.example/\xc3\xa4\x00"]})})
    message = await fake_refusal(fake, ["http://m.example/"], "http://m.example/a")
    assert message == "redirect to http://e.example/%C3%A4%00 leaves the sources"


# -- Redirect bodies ---------------------------------------------------------


class EndlessRedirect(Resource):
    """
    A redirect whose body starts and never ends; records each request's
    :meth:`notifyFinish`, which fails once the client closes.
    """

    isLeaf = True

    def __init__(self, location: bytes) -> None:
        super().__init__()
        self.location = location
        self.finished: list[Deferred] = []
        self.open: list[Request] = []

    def render(self, request: Request):
        self.finished.append(request.notifyFinish())
        self.open.append(request)
        request.setResponseCode(302)
        request.setHeader(b"location", self.location)
        request.write(b"x" * 256 * 1024)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_a_redirect_body_is_not_read(servers, agent):
    server = servers()
    server.add("/file", b"the file")
    endless = EndlessRedirect((server.url + "file").encode("ascii"))
    port = reactor.listenTCP(0, Site(endless), interface="127.0.0.1")
    try:
        source = f"http://127.0.0.1:{port.getHost().port}/"
        # The policy allows the source and the file's server.
        _, body = await get(agent, [source, server.url], source + "endless")
        assert body == b"the file"
        with pytest.raises(ConnectionClosed):
            # The client closed the redirect's connection.
            await endless.finished[0].addTimeout(TIMEOUT, reactor)
    finally:
        for request in endless.open:
            if request.channel is not None:
                request.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_refused_redirect_bodies_are_discarded_too():
    fake = FakeAgent({"http://m.example/a": moved("http://elsewhere.example/")})
    await fake_refusal(fake, ["http://m.example/"], "http://m.example/a")
    assert [response.stopped for response in fake.responses] == [True]


# -- Cancellation ------------------------------------------------------------


@pytest.mark.parametrize("hanging", ["/a", "/b"])
@pytest_twisted.ensureDeferred
async def test_cancel_fails_like_a_plain_agent(servers, agent, hanging):
    server = servers()
    redirect(server, "/a", "/b")
    server.add(hanging, hang=True)
    policy = RedirectPolicyAgent(agent, allowed_origins([server.url]))
    requesting = policy.request(b"GET", (server.url + "a").encode("ascii"))
    await wait_for(lambda: server.count(hanging) == 1)
    requesting.cancel()
    with pytest.raises(ResponseNeverReceived) as failed:
        await requesting
    assert [reason.check(CancelledError) for reason in failed.value.reasons] == [CancelledError]


@pytest_twisted.ensureDeferred
async def test_cancel_passes_the_wrapped_agents_failure_on():
    fake = FakeAgent({"http://m.example/a": moved("/b")})
    fake.hanging.add("http://m.example/b")
    policy = RedirectPolicyAgent(fake, allowed_origins(["http://m.example/"]))
    requesting = policy.request(b"GET", b"http://m.example/a")
    assert fake.uris == ["http://m.example/a", "http://m.example/b"]
    requesting.cancel()
    with pytest.raises(Exception) as failed:
        await requesting
    assert failed.value is fake.cancel_failure


@pytest_twisted.ensureDeferred
async def test_network_path_location_takes_its_own_port():
    # hyperlink's URL.click would keep the current URL's port, 8080.
    fake = FakeAgent({"http://m.example:8080/a": moved("//m.example/b"),
                      "http://m.example/b": OK})
    response = await fake_get(
        fake, ["http://m.example:8080/", "http://m.example/"], "http://m.example:8080/a"
    )
    assert response.code == 200
    assert fake.uris[-1] == "http://m.example/b"

"""
Shared fixtures: origin servers, a proxy in front of them, an HTTP client,
and a guard that fails any test during which an error was logged as a
failure (pytest-twisted would otherwise let a dying Deferred pass).
"""

from __future__ import annotations

import gc
import os
import sys

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.logger import globalLogPublisher, textFileLogObserver
from twisted.python.filepath import FilePath
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from pkgcache import store
from pkgcache.resource import PackageCacheResource
from pkgcache.transports import serving_transports_on
from pkgcache.service import CacheService
from tests.origin import OriginServer


if os.environ.get("PKGCACHE_TEST_LOG"):
    # Show every log event on stderr: PKGCACHE_TEST_LOG=1 pytest -s ...
    globalLogPublisher.addObserver(textFileLogObserver(sys.stderr))


@pytest.fixture(autouse=True)
def fail_on_logged_failures():
    """Fails the test if a failure was logged, including "Unhandled error in
    Deferred", which is only logged when the Deferred is garbage-collected."""
    failures: list = []

    def observe(event):
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    gc.collect()
    globalLogPublisher.removeObserver(observe)
    if failures:
        messages = [
            f"{event.get('log_format')}: {event['log_failure'].getTraceback()}"
            for event in failures
        ]
        pytest.fail("failures were logged:\n" + "\n".join(messages))


@pytest.fixture
def reads(monkeypatch) -> list:
    """Every read of a cached file, as ``(offset, length)``."""
    done: list = []
    read = store.CachedFile.read

    def record(self, offset, length):
        done.append((offset, length))
        return read(self, offset, length)

    monkeypatch.setattr(store.CachedFile, "read", record)
    return done


@pytest_twisted.async_yield_fixture
async def origins():
    """Make origin servers with ``origins()``; all stop after the test."""
    started: list[OriginServer] = []

    def make() -> OriginServer:
        server = OriginServer()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
def origin(origins) -> OriginServer:
    return origins()


@dataclass
class Proxy:
    url: str
    resource: PackageCacheResource
    cache_dir: FilePath

    def cached(self, path: str) -> FilePath:
        return self.cache_dir.preauthChild(path.lstrip("/"))

    def spools(self) -> list[str]:
        """The names in the spool directory."""
        return os.listdir(self.cache_dir.child(".pkgcache-spool").path)

    async def published(self, path: str) -> bytes:
        """The cached file's content, once it is published."""
        await wait_for(lambda: self.cached(path).exists())
        return self.cached(path).getContent()


@pytest_twisted.async_yield_fixture
async def make_proxy(tmp_path):
    """
    ``make_proxy(sources, **options)``: a :class:`PackageCacheResource` in a
    site on 127.0.0.1, caching in ``tmp_path / "cache"``.
    """
    running: list = []

    def make(sources, cache_dir: Optional[FilePath] = None, **options) -> Proxy:
        cache_dir = cache_dir or FilePath(str(tmp_path)).child("cache")
        # Named as the tests' Cache-Status expectations have it (by
        # default a node is named after the host).
        options.setdefault("node_name", "pkgcache")
        resource = PackageCacheResource(sources, cache_dir, **options)
        service = CacheService(resource)
        service.startService()
        site = Site(resource)
        # As twist's ports make them: big hits by sendfile, writes at a turn's end.
        port = serving_transports_on(reactor.listenTCP(0, site, interface="127.0.0.1"))
        running.append((port, service))
        return Proxy(f"http://127.0.0.1:{port.getHost().port}", resource, cache_dir)

    yield make
    for port, service in running:
        await port.stopListening()
        if service.running:
            await service.stopService()


class TestClient:
    """
    A plain HTTP client: a Twisted ``Agent`` with nothing added (no
    ``Accept-Encoding``, no decoding), connections closed after each response.
    """

    def __init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self._agent = Agent(reactor, pool=self.pool)

    def request(self, method: str, url: str, headers=None) -> "Deferred":
        return self._agent.request(method.encode("ascii"), url.encode("ascii"), Headers(headers))


@pytest_twisted.async_yield_fixture
async def http():
    client = TestClient()
    yield client
    await client.pool.closeCachedConnections()


async def fetch(http: TestClient, url: str, method: str = "GET", headers=None):
    """A request and its whole body: ``(response, body)``."""
    response = await http.request(method, url, headers=headers)
    body = await readBody(response)
    return response, body


def descriptors_of(path: str) -> int:
    """How many of this process's descriptors are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == path
        except FileNotFoundError:
            pass
    return count


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` on the reactor until it holds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await task.deferLater(reactor, 0.01)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds)


class _Collect(Protocol):
    def __init__(self, request: bytes) -> None:
        self._request = request
        self._data: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._data.append(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(self._data))


async def raw_request(url: str, request: bytes, timeout: float = 10.0) -> bytes:
    """
    Send ``request`` as is to the server at ``url`` (``http://host:port``)
    and return everything it answers until it closes the connection: for
    requests no well-behaved client library would send.
    """
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    endpoint = TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout)
    collector = _Collect(request)
    await connectProtocol(endpoint, collector)
    timer = reactor.callLater(timeout, collector.transport.abortConnection)
    try:
        return await collector.done
    finally:
        if timer.active():
            timer.cancel()

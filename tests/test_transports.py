"""
The serving ports' transports (:mod:`pkgcache.transports`) on real
sockets: big hits sent by ``sendfile`` (the whole file, ranges and
byte-range sets, keep-alive, a client leaving mid-file, and the
read-and-write path where the transport or the file system cannot), and
answers written at the end of the reactor turn (and what it must not
change: a close waits for what was written, a failure drops its
connection).
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.web.server import Site

from pkgcache import transports
from pkgcache.resource import PackageCacheResource
from pkgcache.responses import READ_SIZE
from pkgcache.service import PackageCacheService
from pkgcache.sources import Source
from pkgcache.transports import serving_transports_on
from tests.clients import RawConnection, SmallBufferClient, multipart_parts, open_raw, within
from tests.conftest import descriptors_of, fetch, raw_request, wait_for

PATH = "/pool/big.deb"
BIG = os.urandom(4 * READ_SIZE + 12345)


async def cached_proxy(origin, make_proxy, http, data: bytes = BIG):
    """A proxy with ``data`` cached at :data:`PATH`."""
    origin.add(PATH, data)
    proxy = make_proxy([origin.url])
    assert (await fetch(http, proxy.url + PATH))[1] == data
    await proxy.published(PATH)
    return proxy


@pytest_twisted.ensureDeferred
async def test_a_big_hit_is_sent_by_the_kernel_not_read(origin, make_proxy, http, reads):
    proxy = await cached_proxy(origin, make_proxy, http)
    response, body = await fetch(http, proxy.url + PATH)
    assert (response.code, body) == (200, BIG)
    assert response.length == len(BIG)
    assert reads == []
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_a_range_of_a_big_hit_is_sent_by_the_kernel(origin, make_proxy, http, reads):
    proxy = await cached_proxy(origin, make_proxy, http)
    start, end = 1000, 3 * READ_SIZE + 7
    response, body = await fetch(
        http, proxy.url + PATH, headers={b"range": [f"bytes={start}-{end}".encode()]}
    )
    assert (response.code, body) == (206, BIG[start : end + 1])
    assert response.headers.getRawHeaders(b"content-range") == [
        f"bytes {start}-{end}/{len(BIG)}".encode()
    ]
    assert reads == []


@pytest_twisted.ensureDeferred
async def test_a_byte_range_set_keeps_its_parts_in_order(origin, make_proxy, http, reads):
    """The part headers go through the transport's buffer, the parts by
    sendfile: each part waits for what was written before it."""
    proxy = await cached_proxy(origin, make_proxy, http)
    ranges = [(0, READ_SIZE), (2 * READ_SIZE, len(BIG) - 1)]
    spec = ",".join(f"{start}-{end}" for start, end in ranges)
    response, body = await fetch(
        http, proxy.url + PATH, headers={b"range": [f"bytes={spec}".encode()]}
    )
    assert response.code == 206
    [content_type] = response.headers.getRawHeaders(b"content-type")
    assert multipart_parts(content_type, body) == [
        (f"bytes {start}-{end}/{len(BIG)}".encode(), BIG[start : end + 1])
        for start, end in ranges
    ]
    assert reads == []


@pytest_twisted.ensureDeferred
async def test_big_hits_one_after_another_on_one_connection(origin, make_proxy, http, reads):
    """A sent file ends its response, and the next request on the
    connection is answered after it (also a small one, in one write)."""
    origin.add("/pool/small.deb", b"small")
    proxy = await cached_proxy(origin, make_proxy, http)
    await fetch(http, proxy.url + "/pool/small.deb")
    await proxy.published("pool/small.deb")
    asked = (
        f"GET {PATH} HTTP/1.1\r\nHost: x\r\n\r\n"
        "GET /pool/small.deb HTTP/1.1\r\nHost: x\r\n\r\n"
        f"GET {PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = await raw_request(proxy.url, asked)
    bodies = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        bodies.append(rest[:length])
        answer = rest[length:]
    assert bodies == [BIG, b"small", BIG]
    assert reads == [(0, len(b"small"))]  # (the small file, in one read)


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_file_closes_the_file(origin, make_proxy, http):
    # Bigger than the socket buffers on both sides can hold.
    huge = os.urandom(32 * 1024 * 1024)
    proxy = await cached_proxy(origin, make_proxy, http, huge)
    cached = proxy.cached(PATH).path
    leaving = SmallBufferClient(proxy.url + PATH, receive_buffer=16 * 1024)
    try:
        await wait_for(lambda: leaving.read(1024) > 0)
        assert descriptors_of(cached) >= 1, "the hit's file is not open"
    finally:
        leaving.close()
    await wait_for(lambda: descriptors_of(cached) == 0)
    # And the next client gets the whole file.
    assert (await fetch(http, proxy.url + PATH))[1] == huge


@pytest_twisted.ensureDeferred
async def test_a_file_system_without_sendfile_gets_reads_and_writes(
    origin, make_proxy, http, reads, monkeypatch
):
    proxy = await cached_proxy(origin, make_proxy, http)

    def unsupported(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(transports.os, "sendfile", unsupported)
    response, body = await fetch(http, proxy.url + PATH)
    assert (response.code, body) == (200, BIG)
    assert sum(length for _, length in reads) >= len(BIG)


@pytest_twisted.ensureDeferred
async def test_a_port_of_an_embedders_own_gets_reads_and_writes(origin, http, tmp_path, reads):
    """A Resource served by a port pkgcache did not make (as under TLS,
    whose connections this cannot bypass) still answers big hits."""
    origin.add(PATH, BIG)
    resource = PackageCacheResource([Source(origin.url)], str(tmp_path / "cache"))
    service = PackageCacheService(resource, [], reactor)
    service.startService()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}{PATH}"
        assert (await fetch(http, url))[1] == BIG
        await wait_for(lambda: os.path.exists(tmp_path / "cache" / PATH.lstrip("/")))
        reads.clear()
        assert (await fetch(http, url))[1] == BIG
        assert sum(length for _, length in reads) == len(BIG)
    finally:
        await port.stopListening()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_services_unix_socket_sends_files(origin, tmp_path, reads):
    origin.add(PATH, BIG)
    resource = PackageCacheResource([Source(origin.url)], str(tmp_path / "cache"))
    socket_path = str(tmp_path / "pkgcache.sock")
    service = PackageCacheService(resource, [f"unix:{socket_path}"], reactor)
    service.startService()
    try:
        request = f"GET {PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        for _ in range(2):
            connection = await connectProtocol(
                UNIXClientEndpoint(reactor, socket_path, timeout=10), RawConnection(request)
            )
            answer = await connection.closed
            assert answer.split(b"\r\n\r\n", 1)[1] == BIG
            await wait_for(lambda: os.path.exists(tmp_path / "cache" / PATH.lstrip("/")))
        assert reads == []
    finally:
        await service.stopService()


@pytest.fixture
def registered_writers(monkeypatch) -> list:
    """Every serving transport registered with the reactor for writing."""
    registered: list = []
    add_writer = reactor.addWriter

    def record(writer):
        if isinstance(writer, transports.ServingTransport):
            registered.append(writer)
        return add_writer(writer)

    monkeypatch.setattr(reactor, "addWriter", record)
    return registered


@pytest_twisted.ensureDeferred
async def test_answers_go_out_without_registering_for_writing(
    origin, make_proxy, http, registered_writers
):
    """On a keep-alive connection, each answer goes out in the one send at
    the end of its turn: the socket took it all, so the poller never
    had to be asked when it could take more."""
    origin.add("/pool/small.deb", b"small")
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + "/pool/small.deb")
    await proxy.published("/pool/small.deb")
    registered_writers.clear()
    request = b"GET /pool/small.deb HTTP/1.1\r\nHost: x\r\n\r\n"
    connection = await open_raw(proxy.url, request * 3)
    try:
        await wait_for(lambda: connection.received.count(b"small") == 3)
    finally:
        await connection.hang_up()
    assert connection.received.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert registered_writers == []


@pytest_twisted.ensureDeferred
async def test_an_answer_bigger_than_the_socket_takes_is_sent_whole(
    origin, make_proxy, http, registered_writers
):
    """What the end-of-turn send leaves is sent once the socket can take
    it, as Twisted's transport would (here: a file sent in one write to a
    client with a small buffer, read slowly)."""
    data = os.urandom(READ_SIZE)
    origin.add(PATH, data)
    proxy = make_proxy([origin.url])
    await fetch(http, proxy.url + PATH)
    await proxy.published(PATH)
    slow = SmallBufferClient(proxy.url + PATH, receive_buffer=8 * 1024)
    try:
        await slow.read_at(4 * 1024 * 1024, until=lambda: len(slow.body) >= len(data))
        assert slow.body == data
    finally:
        slow.close()
    assert registered_writers, "the socket took it all at once"


@pytest_twisted.ensureDeferred
async def test_an_answer_then_a_close(origin, make_proxy, http):
    origin.add("/pool/small.deb", b"small")
    proxy = make_proxy([origin.url])
    for _ in range(2):  # a miss, then a hit
        answer = await raw_request(proxy.url, b"GET /pool/small.deb HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(b"\r\n\r\nsmall")
        await proxy.published("/pool/small.deb")


class _ResumedIntoABug(Protocol):
    """Writes more than the transport buffers unpaused, then raises when
    the drained buffer resumes it: a bug in the producer."""

    def connectionMade(self) -> None:
        # Room for it all at once, so that the write at the turn's end
        # drains the buffer and resumes the producer.
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.transport.registerProducer(self, True)
        self.transport.write(b"x" * (self.transport.bufferSize + 1))

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        raise RuntimeError("a bug")

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_producer_raising_at_the_turns_end_drops_its_connection(
    fail_on_logged_failures
):
    """As the reactor does for a writer that raises: logged, and the
    connection dropped (not left open and silent); the port serves on."""
    factory = ServerFactory()
    factory.protocol = _ResumedIntoABug
    broken = serving_transports_on(reactor.listenTCP(0, factory, interface="127.0.0.1"))
    factory_ok = ServerFactory()
    factory_ok.protocol = lambda: _Answering(b"fine")
    fine = serving_transports_on(reactor.listenTCP(0, factory_ok, interface="127.0.0.1"))
    try:
        dropped = await open_raw(f"http://127.0.0.1:{broken.getHost().port}", b"")
        answered = await open_raw(f"http://127.0.0.1:{fine.getHost().port}", b"")
        assert await within(10, answered.closed, "the other connection was not answered") == b"fine"
        await within(10, dropped.closed, "the connection was not dropped")
        [logged] = fail_on_logged_failures
        assert logged["log_failure"].check(RuntimeError)
        fail_on_logged_failures.clear()
    finally:
        await broken.stopListening()
        await fine.stopListening()


class _Answering(Protocol):
    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connectionMade(self) -> None:
        self.transport.write(self._answer)
        self.transport.loseConnection()


class _WritesSendsAndCloses(Protocol):
    """Writes ``head``, sends ``file``, and asks to close at once."""

    def __init__(self, head: bytes, file, close: str) -> None:
        self._head = head
        self._file = file
        self._close = close

    def connectionMade(self) -> None:
        self.transport.write(self._head)
        size = os.fstat(self._file.fileno()).st_size
        self.transport.send_file(self._file.fileno(), 0, size, _NoticesNothing())
        getattr(self.transport, self._close)()


class _NoticesNothing:
    def file_progressed(self, count: int) -> None:
        pass

    def file_sent(self) -> None:
        pass

    def file_unsendable(self) -> None:
        pass


@pytest.mark.parametrize("close", ["loseConnection", "loseWriteConnection"])
@pytest_twisted.ensureDeferred
async def test_a_close_asked_for_while_a_file_is_sent_waits_for_it(close, tmp_path):
    """(Much written before the file, so that the reactor's own write
    drains it: then a close it acted on would cut the file off.)"""
    head = os.urandom(8 * 1024 * 1024)
    data = os.urandom(300_000)
    (tmp_path / "file").write_bytes(data)
    with open(tmp_path / "file", "rb") as file:
        factory = ServerFactory.forProtocol(lambda: _WritesSendsAndCloses(head, file, close))
        port = serving_transports_on(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        try:
            connection = await open_raw(f"http://127.0.0.1:{port.getHost().port}", b"")
            received = await within(20, connection.closed, "the connection was not closed")
        finally:
            await port.stopListening()
    assert received == head + data


class _SaysByeAndCloses(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"bye")
        self.transport.loseConnection()
        self.factory.writing_at_once.append(self.transport in reactor.getWriters())


@pytest_twisted.ensureDeferred
async def test_a_closing_connection_is_among_the_reactors_writers_at_once():
    """A connection that reads no more and waits only for the turn's end
    would be missed by a shutdown's disconnectAll (its request never told
    that the connection went)."""
    factory = ServerFactory.forProtocol(_SaysByeAndCloses)
    factory.writing_at_once = []
    port = serving_transports_on(reactor.listenTCP(0, factory, interface="127.0.0.1"))
    try:
        connection = await open_raw(f"http://127.0.0.1:{port.getHost().port}", b"")
        assert await within(10, connection.closed, "the connection was not closed") == b"bye"
    finally:
        await port.stopListening()
    assert factory.writing_at_once == [True]

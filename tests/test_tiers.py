"""
Tiers of ``twist pkgcache`` processes, as users run them (``tests/test_via.py``
proves the same in process): offices' nodes whose source is a datacenter's
node, whose source is the counting origin of ``tests/origin.py``; and two
nodes misconfigured as each other's source.

- many clients on every office asking for the same files, one of them a
  few MiB streamed through both tiers: every body whole, one origin
  download per file, the datacenter asked once per office, and the
  client's ``Cache-Status`` with the datacenter's entry before the
  office's;
- a loop (A's source is B, B's is A): a request to A is answered within a
  second, each node having seen it once, and both nodes answer the next
  request as quickly.

The nodes are ``tests/test_balancers.py``'s (each in a session of its own,
killed at teardown whatever happened); every wait is for an event (a port
answering, a line in an access log, the origin holding a body back) with a
deadline.
"""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from tests.clients import start_reading, within
from tests.conftest import fetch
from tests.origin import Gate
from tests.test_balancers import Node, clients_get_everything, sha256, wait_until
from tests.test_socket_activation import processes  # noqa: F401 - a fixture

#: Small files, and one large enough to come in many chunks (the origin
#: writes 16 KiB at a time) and to be held back half-way.
FILES = 6
SIZE = 64 * 1024
BIG = "/distfiles/big-1.0.iso"
BIG_SIZE = 4 * 1024 * 1024
HELD_AT = 1024 * 1024
OFFICES = 3
#: Clients at once on each office, each on a keep-alive connection of its
#: own, each asking for every file in an order of its own.
CLIENTS = 8

#: The Cache-Status entries a tier may give a file it forwards (RFC 9211),
#: under its node name: its own download, stored; or someone else's download
#: it joined; or its stored copy.
def miss(name: bytes) -> bytes:
    return name + b"; fwd=miss; fwd-status=200; stored"


def joined(name: bytes) -> bytes:
    return name + b"; fwd=miss; fwd-status=200; stored; collapsed"


def hit(name: bytes) -> bytes:
    return name + b"; hit"


def node(processes, name: str, source: str) -> Node:
    return Node(processes, name, source, options=("--node-name", name))


def entries(header: bytes) -> list[bytes]:
    return [entry.strip() for entry in header.split(b",")]


def via_names(headers) -> list[bytes]:
    """The ``received-by`` of each ``Via`` entry, in order (RFC 9110 7.6.3)."""
    return [entry.split()[1] for line in headers.getRawHeaders(b"via", [])
            for entry in line.split(b",")]


async def started(http, *nodes: Node) -> None:
    for each in nodes:
        each.start()
    for each in nodes:
        await each.ready(http)


@pytest_twisted.ensureDeferred
async def test_offices_behind_a_datacenter_node_make_one_origin_download_per_file(
    origin, processes, http
):
    files = {f"/distfiles/f{index}-1.0.tar.gz": os.urandom(SIZE) for index in range(FILES)}
    for path, data in files.items():
        origin.add(path, data)
    files[BIG] = os.urandom(BIG_SIZE)
    gate = Gate()
    origin.add(BIG, files[BIG], gate=gate, pause_at=HELD_AT)
    datacenter = node(processes, "dc", origin.url)
    offices = [node(processes, f"office{number}", datacenter.url + "/")
               for number in range(1, OFFICES + 1)]
    await started(http, datacenter, *offices)

    # -- the big file streams through both tiers: a client of an office has
    # its first bytes while the origin holds back the rest.
    first, reader = await start_reading(http, offices[0].url + BIG)
    await within(10, reader.first_byte, "the tiers held back the first bytes")
    await wait_until(lambda: reader.received > 0 and gate.reached == 1, 10,
                     "the first bytes, and the origin holding back the rest")
    assert reader.received <= HELD_AT and not reader.done.called

    # -- every client of every office asks for every file (the big one
    # still held as they start: those that come to it early join the
    # downloads under way at each tier).
    seen: dict[str, list] = {office.name: [] for office in offices}
    crowd = DeferredList([
        Deferred.fromCoroutine(clients_get_everything(
            office.url, files, CLIENTS, seed=number, seen=seen[office.name]))
        for number, office in enumerate(offices)
    ], consumeErrors=True)
    gate.open()
    assert sha256(await within(30, reader.done, "the big file did not come")) == sha256(files[BIG])
    for success, result in await within(60, crowd, "the clients did not finish"):
        if not success:
            result.raiseException()
    assert {path: origin.count(path) for path in files} == {path: 1 for path in files}
    seen[offices[0].name].append((BIG, first.headers))

    # -- what each client was told: an office's hit, or what the office
    # forwarded, with the datacenter's entry first and the office's last.
    # A tier's own download is a miss; so the office's entry is a miss for the
    # one request that made its download of a file, joined or hit for the
    # others, and under each office's miss the datacenter's entry is a miss
    # for one office and joined or hit for the others, which only the order
    # datacenter-then-office allows.
    upstream_of_misses: dict[str, list[bytes]] = {path: [] for path in files}
    for office in offices:
        assert len(seen[office.name]) == CLIENTS * len(files) + (office is offices[0])
        misses = []
        for path, headers in seen[office.name]:
            (status,) = headers.getRawHeaders(b"cache-status")
            *upstream, own = entries(status)
            name = office.name.encode()
            assert via_names(headers)[-1:] == [name], headers
            if own == hit(name):
                assert upstream == [], status
                continue
            assert own in (miss(name), joined(name)) and len(upstream) == 1, status
            assert upstream[0] in (miss(b"dc"), joined(b"dc"), hit(b"dc")), status
            if own == miss(name):
                misses.append(path)
                upstream_of_misses[path].append(upstream[0])
        assert sorted(misses) == sorted(files), f"{office.name}: not one download per file"
    for path, upstream in upstream_of_misses.items():
        assert upstream.count(miss(b"dc")) == 1 and len(upstream) == OFFICES, (path, upstream)

    # -- the datacenter was asked once per office for each file (its access
    # log is written within a second).
    expected = OFFICES * len(files)
    await wait_until(lambda: len(datacenter.served()) >= expected, 10,
                     "the datacenter's access log to show every office's requests")
    asked = datacenter.served()
    assert sorted(path for path, _ in asked) == sorted(path for path in files
                                                       for _ in range(OFFICES))
    for path in files:
        outcomes = [outcome for asked_for, outcome in asked if asked_for == path]
        assert outcomes.count("miss") == 1 and set(outcomes) <= {"miss", "coalesced", "hit"}, \
            (path, outcomes)


@pytest_twisted.ensureDeferred
async def test_the_client_sees_both_tiers_in_via(origin, processes, http):
    path = "/distfiles/foo-1.0.tar.gz"
    origin.add(path, os.urandom(SIZE))
    datacenter = node(processes, "dc", origin.url)
    office = node(processes, "office1", datacenter.url + "/")
    await started(http, datacenter, office)
    response, body = await within(10, fetch(http, office.url + path), "no answer")
    assert response.code == 200 and body == origin.origin.files[path].data
    assert response.headers.getRawHeaders(b"cache-status") == [
        miss(b"dc") + b", " + miss(b"office1")
    ]
    assert via_names(response.headers) == [b"dc", b"office1"]


async def loop(processes, http) -> tuple[Node, Node]:
    """Node ``a`` whose source is node ``b``, whose source is ``a``."""
    a = node(processes, "a", "")
    b = node(processes, "b", a.url + "/")
    a.source = b.url + "/"
    await started(http, a, b)
    return a, b


PATH = "/distfiles/looped-1.0.tar.gz"


@pytest_twisted.ensureDeferred
async def test_two_nodes_that_are_each_others_source_answer_within_a_second(processes, http):
    a, b = await loop(processes, http)
    response, body = await within(1, fetch(http, a.url + PATH), "the loop went round")
    assert response.code == 508, (response.code, body)
    # Neither node hangs nor keeps going round: the next request to each
    # is answered as quickly.
    later = {each.name: f"/distfiles/next-{each.name}-1.0.tar.gz" for each in (a, b)}
    for each in (a, b):
        response, body = await within(1, fetch(http, each.url + later[each.name]),
                                      f"{each.name} did not answer the next request")
        assert response.code == 508, (response.code, body)

    # Each node saw each request once, and the node asked first once more:
    # A asked B, B asked A, A refused with 508 (its own name in the Via),
    # and the 508 went back to the client.  No more than that.
    def logged(each: Node, path: str) -> list[int]:
        return sorted(status for asked, status, _ in each.requests() if asked == path)

    expected = {
        (a.name, PATH): 2, (b.name, PATH): 1,
        (a.name, later[a.name]): 2, (b.name, later[a.name]): 1,
        (b.name, later[b.name]): 2, (a.name, later[b.name]): 1,
    }

    def all_logged() -> bool:
        return all(len(logged(each, path)) >= count for (name, path), count in expected.items()
                   for each in (a, b) if each.name == name)

    await wait_until(all_logged, 10, "both access logs to show every request")
    for first, second, path in ((a, b, PATH), (a, b, later[a.name]), (b, a, later[b.name])):
        # The node asked first: the refusal of the request that came back,
        # and its answer to the client; the other: its answer to the first.
        assert logged(first, path) == [508, 508], (first.name, path, first.requests())
        assert logged(second, path) == [508], (second.name, path, second.requests())


@pytest_twisted.ensureDeferred
async def test_a_loop_is_answered_508_loop_detected(processes, http):
    a, _ = await loop(processes, http)
    response, body = await within(1, fetch(http, a.url + PATH), "the loop went round")
    assert (response.code, response.phrase) == (508, b"Loop Detected"), (response.code, body)

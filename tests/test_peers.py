"""
Siblings (``--peer``) over real sockets: a node asks its peers for a miss
before the origin, with ``only-if-cached``, and copies a peer's file
instead of downloading it again; a dead peer, a peer without the file and
the node itself in its own peer list all end at the origin, once.  Behind
the shipped balancer recipes (real nginx and HAProxy), the keys a balancer
moves (a node replaced with an empty disk, a node joining) are copied
between the nodes, not downloaded again.
"""

from __future__ import annotations

import os
import shutil

import pytest
import pytest_twisted
from twisted.python.filepath import FilePath

from tests.clients import sha256
from tests.conftest import fetch, wait_for
from tests.test_balancers import (  # noqa: F401 - processes is a fixture
    BALANCERS,
    SIZE,
    Node,
    behind_a_balancer,
    clients_get_everything,
    processes,
    wait_until,
)
from tests.test_twist import free_port, twist  # noqa: F401 - twist is a fixture

PATH = "/distfiles/foo-1.0.tar.gz"


@pytest_twisted.ensureDeferred
async def test_a_miss_is_copied_from_the_peer_that_holds_it(origin, make_proxy, tmp_path, http):
    data = os.urandom(3_000_000)
    origin.add(PATH, data)
    holder = make_proxy([origin.url], FilePath(str(tmp_path / "holder")), node_name="node-2")
    response, body = await fetch(http, holder.url + PATH)
    assert sha256(body) == sha256(data)
    await holder.published(PATH)
    newcomer = make_proxy(
        [origin.url], FilePath(str(tmp_path / "newcomer")), node_name="node-1", peers=[holder.url + "/"]
    )
    response, body = await fetch(http, newcomer.url + PATH)
    assert (response.code, sha256(body)) == (200, sha256(data))
    assert origin.count(PATH) == 1
    # Which tier answered: the peer's hit, then this node's stored miss.
    cache_status = response.headers.getRawHeaders(b"cache-status")[0].decode()
    assert cache_status == "node-2; hit, node-1; fwd=miss; fwd-status=200; stored"
    assert response.headers.getRawHeaders(b"via") == [b"1.1 node-2, 1.1 node-1"]
    # Stored: asked again, the newcomer answers from its own cache.
    await newcomer.published(PATH)
    response, body = await fetch(http, newcomer.url + PATH)
    assert (sha256(body), origin.count(PATH)) == (sha256(data), 1)
    assert response.headers.getRawHeaders(b"cache-status") == [b"node-1; hit"]


@pytest_twisted.ensureDeferred
async def test_without_a_peer_that_has_it_the_origin_is_asked_once(
    origin, make_proxy, tmp_path, http
):
    """A peer that does not hold the file (504) and one that is down
    (refused): the origin, once, and neither peer fetched it."""
    data = os.urandom(100_000)
    origin.add(PATH, data)
    empty = make_proxy([origin.url], FilePath(str(tmp_path / "empty")), node_name="node-2")
    dead = f"http://127.0.0.1:{free_port()}/"
    node = make_proxy(
        [origin.url], FilePath(str(tmp_path / "node")), node_name="node-1", peers=[dead, empty.url + "/"]
    )
    response, body = await fetch(http, node.url + PATH)
    assert (response.code, sha256(body)) == (200, sha256(data))
    assert origin.count(PATH) == 1
    assert not empty.cached(PATH).exists()
    peers = node.resource.metrics.peer_requests
    assert peers.labels(dead, "error")._value.get() == 1
    assert peers.labels(empty.url + "/", "miss")._value.get() == 1


@pytest_twisted.ensureDeferred
async def test_nodes_given_the_same_peer_list_including_themselves(origin, twist, tmp_path, http):
    """
    As an operator writes it: the one list of every node's URL on every
    node.  A node asking itself is answered 508 and skips itself; the
    file still comes from the node that has it, and the origin is asked
    once in all.
    """
    data = os.urandom(500_000)
    origin.add(PATH, data)
    ports = [free_port(), free_port()]
    peers = [arg for port in ports for arg in ("--peer", f"http://127.0.0.1:{port}/")]
    nodes = [
        twist("--source", origin.url, "--cache-dir", str(tmp_path / f"cache-{index}"),
              "--node-name", f"node-{index}", "--access-log", str(tmp_path / f"access-{index}"),
              *peers, port=port)
        for index, port in enumerate(ports, start=1)
    ]
    for node in nodes:
        await node.ready(http)
    first, second = nodes
    response, body = await fetch(http, first.url + PATH)
    assert (response.code, sha256(body)) == (200, sha256(data))
    await wait_for(lambda: (tmp_path / "cache-1" / PATH.lstrip("/")).exists())
    response, body = await fetch(http, second.url + PATH)
    assert (response.code, sha256(body)) == (200, sha256(data))
    assert origin.count(PATH) == 1
    assert response.headers.getRawHeaders(b"cache-status")[0].startswith(b"node-1; hit, node-2; ")

    # node-1 asked itself first and refused itself (508), then node-2
    # (504: not there), then the origin; node-2 asked node-1 (200).
    def statuses(index: int) -> list[str]:
        log = tmp_path / f"access-{index}"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split('" ')[1].split()[0] for line in lines if f"GET {PATH} " in line]

    await wait_for(lambda: len(statuses(1)) == 3 and len(statuses(2)) == 2)
    assert sorted(statuses(1)) == ["200", "200", "508"]  # its client, node-2's probe, itself
    assert sorted(statuses(2)) == ["200", "504"]  # its client, node-1's probe
    assert response.headers.getRawHeaders(b"via") == [b"1.1 node-1, 1.1 node-2"]


# -- behind a balancer ----------------------------------------------------------


@pytest.mark.parametrize("balancer_class", BALANCERS)
@pytest_twisted.ensureDeferred
async def test_keys_the_balancer_moves_are_copied_between_peers(
    balancer_class, origin, processes, http  # noqa: F811 - processes is a fixture
):
    """
    Three nodes behind the shipped recipe, each given the others as
    --peer.  A node killed and replaced by one with an empty disk, then a
    fourth node joining: the files they take over are copied from the
    nodes that hold them, so the origin is asked once per file, plus once
    for each file of the dead node while it was out (no node held those).
    """
    files = {f"/dist/p-{index:03d}.bin": os.urandom(SIZE) for index in range(60)}
    for path, data in files.items():
        origin.add(path, data)
    names = ("node-1", "node-2", "node-3", "node-4")
    nodes = [Node(processes, name, origin.url) for name in names]

    def with_peers(node: Node, peers: list[Node]) -> None:
        node.options = ("--node-name", node.name, *(
            arg for peer in peers if peer is not node for arg in ("--peer", peer.url + "/")
        ))

    for node in nodes[:3]:
        with_peers(node, nodes[:3])
    with_peers(nodes[3], nodes[:3])
    cluster = nodes[:3]
    balancer = await behind_a_balancer(processes, http, cluster, balancer_class)

    def downloads() -> dict[str, int]:
        return {path: origin.count(path) for path in files}

    def published() -> bool:
        return all(any(node.holds(path) for node in cluster) for path in files)

    await clients_get_everything(balancer.url, files, 8, seed=1)
    await wait_until(published, 10, "every file published")
    assert downloads() == {path: 1 for path in files}
    owner = {path: next(node for node in cluster if node.holds(path)) for path in files}

    # -- node-3 dies: its files are downloaded once more, by the nodes that
    # take them over (no peer holds them).
    victim = cluster[2]
    moved = sorted(path for path in files if owner[path] is victim)
    assert moved, "node-3 got no file"
    victim.kill()
    await clients_get_everything(balancer.url, files, 4, seed=2)
    await wait_until(lambda: balancer.marked_down(victim), 30, "the balancer to take node-3 out")
    await clients_get_everything(balancer.url, files, 2, seed=3)
    await wait_until(lambda: all(any(node.holds(path) for node in cluster[:2]) for path in moved),
                     10, "the moved files published by the survivors")
    expected = {path: 2 if path in moved else 1 for path in files}
    assert downloads() == expected

    # -- it is replaced by a node with an empty disk, on its address: it
    # takes its files back, copying each from the survivor that holds it.
    shutil.rmtree(victim.cache)
    victim.cache.mkdir()
    victim.start()
    await victim.ready(http)
    await balancer.taken_back(http, victim, files, moved[0])
    await clients_get_everything(balancer.url, files, 4, seed=4)
    await wait_until(lambda: all(victim.holds(path) for path in moved), 10,
                     "node-3 to hold its files again")
    assert downloads() == expected

    # -- a fourth node joins: the files it takes over are copied too.
    joining = nodes[3]
    joining.start()
    await joining.ready(http)
    await balancer.reconfigure(http, nodes)
    await clients_get_everything(balancer.url, files, 4, seed=5)
    taken = [path for path in files if joining.holds(path)]
    assert taken, "the new node got no file"
    assert downloads() == expected

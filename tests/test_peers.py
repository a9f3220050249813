"""
Siblings (``--peer``) over real sockets: a node asks its peers for a miss
before the origin, with ``only-if-cached``, and copies a peer's file
instead of downloading it again; a dead peer, a peer without the file and
the node itself in its own peer list all end at the origin, once.
"""

from __future__ import annotations

import os

import pytest_twisted
from twisted.python.filepath import FilePath

from tests.clients import sha256
from tests.conftest import fetch, wait_for
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
    assert cache_status == "pkgcache; hit, pkgcache; fwd=miss; fwd-status=200; stored"
    # Stored: asked again, the newcomer answers from its own cache.
    await newcomer.published(PATH)
    response, body = await fetch(http, newcomer.url + PATH)
    assert (sha256(body), origin.count(PATH)) == (sha256(data), 1)
    assert response.headers.getRawHeaders(b"cache-status") == [b"pkgcache; hit"]


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
              "--node-name", f"node-{index}", *peers, port=port)
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
    assert response.headers.getRawHeaders(b"cache-status")[0].startswith(b"pkgcache; hit, ")
    assert response.headers.getRawHeaders(b"via") == [b"1.1 node-2"]

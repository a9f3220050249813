"""
``Via`` between tiers of pkgcache nodes (an office's whose source is a
datacenter's): each node names itself in the ``Via`` of what it sends and
serves, a tier makes one origin download however many offices ask, and a
loop (two nodes that are each other's source) fails within a second with
508 at the node that sees its own name come back, instead of going round.
"""

from __future__ import annotations

import os

import pytest_twisted

from pkgcache.sources import Source
from tests.clients import within
from tests.conftest import fetch

PATH = "/distfiles/ab/foo-1.0.tar.gz"


@pytest_twisted.ensureDeferred
async def test_offices_behind_a_datacenter_node_make_one_origin_download(
    origin, make_proxy, http, tmp_path
):
    data = os.urandom(300_000)
    origin.add(PATH, data)
    from twisted.python.filepath import FilePath

    datacenter = make_proxy([Source(origin.url)], FilePath(str(tmp_path / "dc")), node_name="dc")
    offices = [
        make_proxy([Source(datacenter.url + "/")], FilePath(str(tmp_path / f"office{number}")),
                   node_name=f"office{number}")
        for number in (1, 2)
    ]
    statuses = []
    for office in offices:
        for _ in range(2):
            response, body = await fetch(http, office.url + PATH)
            assert response.code == 200 and body == data
            statuses.append(response.headers.getRawHeaders(b"cache-status")[0])
            await office.published(PATH)
            await datacenter.published(PATH)
        assert response.headers.getRawHeaders(b"via") == [b"1.1 " + office.resource.node]
    assert origin.count(PATH) == 1
    # Each tier's entry is kept, the one nearer the origin first (RFC 9211).
    assert statuses == [
        b"dc; fwd=miss; fwd-status=200; stored, office1; fwd=miss; fwd-status=200; stored",
        b"office1; hit",
        b"dc; hit, office2; fwd=miss; fwd-status=200; stored",
        b"office2; hit",
    ]


@pytest_twisted.ensureDeferred
async def test_a_request_that_passed_this_node_is_508(origin, make_proxy, http):
    node = make_proxy([Source(origin.url)], node_name="dc")
    for via in ([b"1.1 dc"], [b"1.1 office, 1.1 dc"],
                [b"HTTP/1.1 office (pkgcache), 1.1 dc (pkgcache)"],
                [b"1.1 dc", b"1.1 office"]):  # (on two lines: either may name it)
        response, body = await fetch(http, node.url + PATH, headers={b"via": via})
        assert response.code == 508 and response.phrase == b"Loop Detected", via
        assert b"already passed through dc" in body
        # Marked, so that the node that asked passes it on as a loop.
        assert response.headers.getRawHeaders(b"cache-status") == [b"dc; detail=loop"]
    response, _ = await fetch(http, node.url + PATH, headers={b"via": [b"1.1 dc-2, 1.1 adc"]})
    assert response.code == 404, "another node's name is not this one's"
    assert origin.count(PATH) == 1


@pytest_twisted.ensureDeferred
async def test_two_nodes_that_are_each_others_source_fail_at_once(make_proxy, http, tmp_path):
    from twisted.python.filepath import FilePath

    # B's address is known once it listens: A's source, made first, is
    # set to B then (A's first request is after that).
    first = make_proxy([Source("http://127.0.0.1:1/")], FilePath(str(tmp_path / "a")), node_name="a")
    second = make_proxy([Source(first.url + "/")], FilePath(str(tmp_path / "b")), node_name="b")
    first.resource.upstream.sources = [Source(second.url + "/")]
    response, body = await within(1, fetch(http, first.url + PATH), "the loop went round")
    assert (response.code, response.phrase) == (508, b"Loop Detected")
    # A asked B, B asked A, and A refused: its own name was in the Via.
    answers = second.resource.metrics.registry.get_sample_value(
        "pkgcache_upstream_requests_total", {"source": first.url + "/", "status": "508"}
    )
    assert answers == 1
    assert b"loop detected (HTTP 508)" in body
